"""What :func:`peftlab.train` is asked (:class:`TrainSettings`) and what it gives back
(:class:`TrainResult`).

The settings are the numbers of a run apart from the model and the data: a checkpoint records them
(``trainer_state.pt``), a resume compares them with its own (``steps`` shapes the schedule, ``seed``
the data order), and ``TrainResult.settings`` shows them as a dict in the order train() takes them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from peftlab.errors import ConfigError
from peftlab.train.loraplus import check_loraplus_ratio

STOP_REASONS = ("completed", "stopped", "nan", "interrupted", "callback_error")

Callback = Callable[[dict, nn.Module], Any]


def check_counts(**counts: Any) -> None:
    """Refuse any of ``counts`` (name=value) that is not a positive integer."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer.")


def check_lr(lr: Any, suggestion: str) -> None:
    """Refuse a learning rate that is not a positive finite number; ``suggestion`` is what to try."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr={lr!r} is invalid. Expected a positive number; try {suggestion}.")


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class TrainSettings:
    """train()'s arguments apart from the model, the data and the callbacks (train() holds the
    defaults; see its docstring for each one's meaning)."""

    steps: int  # optimizer steps; each sees batch_size * grad_accum rows
    lr: float  # peak learning rate, reached after warmup_ratio * steps steps, then cosine to 0
    batch_size: int  # rows per micro-batch
    max_length: int  # tokens per row as asked (train() caps it at the model's context)
    grad_accum: int  # micro-batches per optimizer step
    warmup_ratio: float  # share of the steps spent warming up, in [0, 1)
    max_grad_norm: float | None  # clip the global gradient norm to this (None or 0: measure only)
    weight_decay: float  # AdamW's decoupled weight decay
    gradient_checkpointing: bool  # recompute activations in the backward pass
    bf16: bool  # bfloat16 autocast as asked (train() falls back to fp32 where the GPU lacks it)
    seed: int  # data order, dropout and everything random
    out_dir: str | os.PathLike | None  # where checkpoints go
    checkpoint_every: int | None  # also checkpoint every that many steps
    resume_from: str | os.PathLike | None  # a checkpoint folder, or an out_dir
    eval_every: int | None  # measure eval_data / the task every that many steps (and after the last)
    progress: bool  # show a tqdm progress bar
    loraplus_lr_ratio: float | None = None  # LoRA+: B's lr = ratio x lr (train/loraplus.py); None: off
    lora_fa: bool = False  # LoRA-FA: A frozen, B's gradient projected (train/lorafa.py)

    def check(self) -> None:
        """Refuse a setting the loop cannot run with, before any data is tokenized."""
        check_counts(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum)
        for name, value in (("checkpoint_every", self.checkpoint_every), ("eval_every", self.eval_every)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer or None.")
        check_loraplus_ratio(self.loraplus_lr_ratio)
        if not isinstance(self.lora_fa, bool):
            raise ConfigError(f"lora_fa={self.lora_fa!r} is invalid. Expected True (A frozen, LoRA-FA) or False.")
        if self.lora_fa and self.loraplus_lr_ratio is not None:
            raise ConfigError("lora_fa=True freezes A, so LoRA+'s ratio of B's lr to A's has nothing to act on. "
                              "Expected one of them; try loraplus_lr_ratio=None with lora_fa=True.")
        check_lr(self.lr, "2e-4 for LoRA")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise ConfigError(f"warmup_ratio={self.warmup_ratio!r} is invalid. Expected a number in [0, 1); "
                              "try 0.1.")

    def as_dict(self, task: Any = None) -> dict:
        """The settings as a checkpoint and ``TrainResult.settings`` hold them: in train()'s order,
        paths as strings, then ``task`` as "name (framing)" when training on a task."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if task is not None:
            values["task"] = f"{task.name} ({task.framing})"
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}


@dataclass(repr=False)
class TrainResult:
    """What :func:`train` returns: the trained model and everything measured on the way."""

    model: nn.Module  # the same object that was passed in, now trained
    history: list[dict]  # one record per optimizer step (earlier runs' steps too after a resume)
    final_loss: float  # loss of the last applied step (nan if no step was applied)
    time_s: float  # wall time of this call
    peak_memory_mb: float  # largest per-step peak of this call (CPU: process RSS; CUDA: allocated)
    start_memory_mb: float  # what was resident when training began (weights, data, ...), same unit
    stop_reason: str  # one of STOP_REASONS
    message: str = ""  # one line saying why training ended
    checkpoint: Path | None = None  # newest checkpoint folder written, if out_dir was given
    eval: dict | None = None  # last evaluate() result on eval_data
    task_eval: dict | None = None  # last task metrics (peftlab.evaluate on the task's live slice)
    settings: dict = field(default_factory=dict)  # the arguments train() ran with

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history]

    def __repr__(self) -> str:  # the default would print the whole model
        return (
            f"TrainResult(steps={len(self.history)}, final_loss={self.final_loss:.4f}, "
            f"time_s={self.time_s:.1f}, peak_memory_mb={self.peak_memory_mb:.0f}, "
            f"stop_reason={self.stop_reason!r})"
        )
