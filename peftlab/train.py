"""One readable training loop for adapters: ``peftlab.train(model, data)``.

References:
    AdamW: Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization,
        https://arxiv.org/abs/1711.05101
    Warmup then cosine decay: Goyal et al. 2017, https://arxiv.org/abs/1706.02677 (warmup) and
        Loshchilov & Hutter 2017, SGDR, https://arxiv.org/abs/1608.03983 (cosine)
    Gradient checkpointing: Chen et al. 2016, Training Deep Nets with Sublinear Memory Cost,
        https://arxiv.org/abs/1604.06174
    Gradient accumulation that divides by the whole step's token count (not each micro-batch's):
        https://huggingface.co/blog/gradient_accumulation
    QLoRA (training adapters on a 4-bit base): Dettmers et al. 2023, https://arxiv.org/abs/2305.14314

One optimizer step of the loop below:

    for each of grad_accum micro-batches:
        loss_sum = cross-entropy summed over the micro-batch's targets
        (loss_sum / targets in the whole step).backward()     # gradients add up across micro-batches
    grad_norm = clip the gradient norm to max_grad_norm
    if the loss or grad_norm is not finite: stop WITHOUT applying the step
    optimizer.step(); scheduler.step(); method step hooks (AdaLoRA); zero the gradients
    record = {step, loss, lr, grad_norm, step_time_s, tokens_per_s, memory_mb, ...}
    every callback(record, model); checkpoint; look at the stop flag

Data order comes from the seed alone: sample i of the endless stream is row ``order(epoch)[i % n]``
with ``epoch = i // n``, each epoch a permutation from its own seeded ``torch.Generator``. Any
step's batch can be found without replaying the steps before it, which makes resuming exact.

How a run ends (``TrainResult.stop_reason``):
    "completed"       all ``steps`` done
    "stopped"         the ``stop`` flag was set, or a callback returned "stop"
    "nan"             a non-finite loss or gradient norm; that step is NOT applied, so the adapter
                      keeps its last good values (a warning says so)
    "interrupted"     KeyboardInterrupt (Ctrl-C, the notebook's stop button). train() saves a
                      checkpoint when ``out_dir`` is set and RETURNS the result instead of
                      re-raising: in a notebook ``result = train(...)`` then still holds the
                      history and the model. (An interrupt that lands inside ``optimizer.step()``
                      may leave that one step half applied.)
    "callback_error"  a callback raised. train() saves a checkpoint when ``out_dir`` is set, then
                      raises :class:`peftlab.errors.TrainingError` naming the callback, chained to
                      the original exception, with the result (model + history) as ``err.result``:
                      a bug in a plotting callback must not pass silently, nor cost the run.

With ``out_dir``, checkpoints ``out_dir/checkpoint-000012/`` hold ``adapter/`` (PEFT format, via
peftlab.io), ``trainer_state.pt`` (trainable weights, optimizer, scheduler, RNG states, settings)
and ``history.json``; each is written to a temporary folder and renamed into place, so a crash
never leaves a half-written checkpoint. ``train(..., resume_from=out_dir)`` continues from the
newest one; with the same settings (``steps`` included: it shapes the schedule) the loss curve is
the one an uninterrupted run gives.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import AdapterFileError, ConfigError, DataError, TrainingError
from peftlab.evaluation import evaluate as evaluate_task
from peftlab.memory import peak_memory_mb, reset_peak_memory
from peftlab.models import keep_4bit_trainable
from peftlab.state import peek

STOP_REASONS = ("completed", "stopped", "nan", "interrupted", "callback_error")
IGNORE_INDEX = -100  # label value that cross-entropy skips: prompt tokens and padding
_MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "label")

Callback = Callable[[dict, nn.Module], Any]


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


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


def train(
    model: nn.Module,
    data: Any = None,
    *,
    task: Any = None,
    tokenizer: Any = None,
    steps: int = 30,
    lr: float = 2e-4,
    batch_size: int = 4,
    max_length: int = 128,
    grad_accum: int = 1,
    warmup_ratio: float = 0.1,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    gradient_checkpointing: bool = False,
    bf16: bool = False,
    seed: int = 0,
    callbacks: Callback | Sequence[Callback] = (),
    stop: StopFlag | None = None,
    out_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    eval_data: Any = None,
    eval_every: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the model's trainable parameters (its adapter) for ``steps`` optimizer steps.

    Args:
        model: an adapted model (``peftlab.adapt``, reference or peft backend; 4-bit bases too),
            causal LM or sequence classification. Trained in place.
        data: a DatasetDict (its "train" split is used), a raw Dataset (question/answer or text
            columns: causal LM; text + label: classification; needs ``tokenizer``) or a Dataset
            already tokenized (an ``input_ids`` column). May be omitted when ``task`` is given.
        task: a :class:`peftlab.tasks.Task` or its name: trains on its framed training split
            (unless ``data`` is given) and measures its metric (``peftlab.evaluate`` on the
            task's small fixed held-out slice, ``task.live_eval_limit`` rows) every
            ``eval_every`` steps and after the last step; the step's record gets
            ``task_<metric>`` (e.g. ``task_accuracy``).
        steps: optimizer steps; each sees ``batch_size * grad_accum`` rows.
        lr: peak learning rate, reached after ``warmup_ratio * steps`` steps, then cosine to 0.
        max_grad_norm: clip the global gradient norm to this (None or 0: measure, do not clip).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30%
            more time).
        bf16: run forward and backward under bfloat16 autocast (adapter weights stay fp32).
        seed: fixes the data order, dropout and everything random: same seed, same loss curve.
        callbacks: ``callback(record, model)`` after every step; return "stop" to end training.
        stop: anything with ``.is_set()`` (e.g. ``threading.Event``); training ends cleanly after
            the step during which it was set.
        out_dir: where checkpoints go; ``checkpoint_every``: also every that many steps.
        resume_from: a checkpoint folder, or an ``out_dir`` (its newest checkpoint is used).
        eval_data: evaluated every ``eval_every`` steps and after the last step; the record of
            that step gets ``eval_loss`` (and ``eval_accuracy`` for classification).
        progress: show a tqdm progress bar (``TQDM_DISABLE=1`` also hides it).
    """
    settings = {k: v for k, v in locals().items() if k not in ("model", "data", "tokenizer", "callbacks",
                                                                "stop", "eval_data", "task")}
    task = _resolve_task(task)
    if task is not None:
        settings["task"] = f"{task.name} ({task.framing})"
        data = task.training_data() if data is None else data
    if data is None:
        raise ConfigError("train() got no data. Expected a dataset (data=...) or a task (task='sentiment'); "
                          "see peftlab.list_tasks() and peftlab.list_datasets().")
    settings = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in settings.items()}
    _check_settings(steps, batch_size, grad_accum, lr, warmup_ratio, checkpoint_every, eval_every)
    max_length = fit_context(model, max_length)
    callbacks = (callbacks,) if callable(callbacks) else tuple(callbacks)
    classification = is_classification(model)
    if not classification and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            f"train() frames data for decoder-only language models (next tokens) and classifiers; "
            f"{type(model).__name__} is an encoder-decoder, whose labels are the decoder's targets, "
            "which peftlab does not frame yet. Expected a causal LM or a sequence classifier; try "
            "transformers' Seq2SeqTrainer on the adapted model (peftlab.adapt, save_adapter and "
            "estimate_memory work on it), or a decoder-only model."
        )
    dataset = prepare_dataset(data, tokenizer, max_length, classification, split="train")
    eval_set = None if eval_data is None else prepare_dataset(eval_data, tokenizer, max_length, classification)
    if classification:
        for part in (dataset, eval_set) if eval_set is not None else (dataset,):
            check_labels(part, model)
    pad_id = pad_token_id(tokenizer, model)
    device = model_device(model)
    bf16 = _bf16_usable(bf16, device)
    keep_4bit_trainable(model)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            "The model has no trainable parameters, so there is nothing to train. Expected an "
            "adapted model; try model = peftlab.adapt(model, 'lora') first."
        )
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup_steps = int(warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, steps))

    torch.manual_seed(seed)  # dropout; the data order has its own generators (see _EpochOrder)
    random.seed(seed)
    start_step, history = 0, []
    if resume_from is not None:
        start_step, history = _load_checkpoint(resume_from, model, optimizer, scheduler, settings)
    order = _EpochOrder(len(dataset), seed)

    was_training = model.training
    model.train()  # dropout on; and HF models only checkpoint activations in training mode
    checkpointing_was_off = gradient_checkpointing and _enable_checkpointing(model)
    out = Path(out_dir) if out_dir is not None else None
    reason, message, failure = "completed", f"Completed {steps} steps.", None
    checkpoint, last_saved, last_eval, task_eval = None, None, None, None
    step, step_rng, partial_rng = start_step, None, None
    bar = _progress_bar(steps, start_step, progress)
    reset_peak_memory(device)
    start_memory = peak_memory_mb(device)  # right after a reset, the peak is what is resident now
    t_start = time.perf_counter()
    try:
        for step in range(start_step, steps):
            # the RNG as this step starts: a step cut short (NaN, Ctrl-C) has drawn dropout masks
            # from it, and a resumed run must draw them again from here to give the same curve
            step_rng = rng_state()
            reset_peak_memory(device)
            t0 = time.perf_counter()
            first = step * grad_accum * batch_size  # index of this step's first sample in the stream
            micro_batches = [
                _to_device(collate_rows(dataset, order.rows(first + m * batch_size, batch_size), pad_id), device)
                for m in range(grad_accum)
            ]
            n_targets = sum(count_targets(b, classification) for b in micro_batches)
            if n_targets == 0:
                raise DataError(
                    f"Step {step + 1} has no target tokens: every label is masked (-100), often "
                    f"because max_length={max_length} truncates the answers away. Expected some "
                    "tokens to learn from; try a larger max_length."
                )
            loss_total, n_tokens = 0.0, 0
            for batch in micro_batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss_sum = summed_loss(logits_of(model, batch), batch["labels"], classification)
                # divide by the WHOLE step's count: 2 x 2 == 1 x 4; a method's own loss term
                # (AdaLoRA's regulariser) counts once per step
                (loss_sum / n_targets + method_loss(model) / grad_accum).backward()
                loss_total += loss_sum.item()
                n_tokens += int(batch["attention_mask"].sum())
            loss = loss_total / n_targets
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)  # drop the bad gradients; weights untouched
                reason, partial_rng = "nan", step_rng
                message = (
                    f"Step {step + 1} gave a non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                    f"training stopped without applying it, so the adapter keeps the values of step "
                    f"{step}. Try a lower lr (now {lr:g}), max_grad_norm=1.0, or bf16=False."
                )
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                break
            lr_now = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            run_step_hooks(model, step)  # e.g. AdaLoRA's rank allocation: reads this step's gradients
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": loss,
                "lr": lr_now,
                "grad_norm": grad_norm,
                "step_time_s": dt,
                "tokens": n_tokens,
                "tokens_per_s": n_tokens / dt,
                "memory_mb": peak_memory_mb(device),
                "epoch": (first + grad_accum * batch_size) / len(dataset),
            }
            if eval_set is not None and (step + 1 == steps or (eval_every and (step + 1) % eval_every == 0)):
                # no gradients or saved activations: a whole step's rows fit in one batch
                last_eval = evaluate(model, eval_set, batch_size=batch_size * grad_accum,
                                     max_length=max_length, bf16=bf16, pad_id=pad_id)
                record.update({f"eval_{k}": v for k, v in last_eval.items() if k != "examples"})
            if task is not None and (step + 1 == steps or (eval_every and (step + 1) % eval_every == 0)):
                task_eval = evaluate_task(model, task, tokenizer=tokenizer, limit=task.live_eval_limit)
                record.update({f"task_{k}": task_eval[k] for k in task.metrics})
            history.append(record)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

            for callback in callbacks:
                try:
                    answer = callback(record, model)
                except Exception as exc:  # noqa: BLE001 (re-raised below as TrainingError)
                    failure = (callback_name(callback), exc)
                    break
                if answer == "stop":
                    reason, message = "stopped", f"{callback_name(callback)} asked to stop after step {step + 1}."
            if failure is not None:
                reason = "callback_error"
                message = (f"Callback {failure[0]} raised {type(failure[1]).__name__}: {failure[1]} "
                           f"(after step {step + 1}); training stopped.")
                break
            if out is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                checkpoint = _save_checkpoint(out, model, optimizer, scheduler, history, settings)
                last_saved = step + 1
            if reason == "stopped":
                break
            if stop is not None and stop.is_set():
                reason, message = "stopped", f"Stop flag set; stopped after step {step + 1}."
                break
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        if step_rng is not None and len(history) == step:  # inside a step, not after it
            partial_rng = step_rng
        reason, message = "interrupted", f"Interrupted after step {len(history)}."
    except BaseException:
        # An unexpected error (out of memory, a shape mismatch, ...): keep what was trained so far.
        if out is not None and len(history) > start_step:
            rng = step_rng if step_rng is not None and len(history) == step else None
            _save_checkpoint(out, model, optimizer, scheduler, history, settings, rng)
        raise
    finally:
        bar.close()
        if checkpointing_was_off:
            _disable_checkpointing(model)
        model.train(was_training)

    elapsed = time.perf_counter() - t_start
    if out is not None and history and last_saved != len(history):
        checkpoint = _save_checkpoint(out, model, optimizer, scheduler, history, settings, partial_rng)
    if checkpoint is not None:
        message += f" Checkpoint: {checkpoint}"
    run_records = history[start_step:]
    result = TrainResult(
        model=model,
        history=history,
        final_loss=history[-1]["loss"] if history else math.nan,
        time_s=elapsed,
        peak_memory_mb=max((r["memory_mb"] for r in run_records), default=start_memory),
        start_memory_mb=start_memory,
        stop_reason=reason,
        message=message,
        checkpoint=checkpoint,
        eval=last_eval,
        task_eval=task_eval,
        settings=settings,
    )
    if failure is not None:
        error = TrainingError(
            f"{message} The model keeps the adapter of the last finished step and the history is "
            "kept: read them from this exception's .result (and the checkpoint, if out_dir was "
            "given). Fix the callback and resume with train(..., resume_from=...)."
        )
        error.result = result
        raise error from failure[1]
    return result


# --------------------------------------------------------------------------------------------
# Loss, learning-rate schedule, evaluation
# --------------------------------------------------------------------------------------------
def _resolve_task(task: Any):
    """A task name -> its Task; a Task (or None) as it is."""
    if isinstance(task, str):
        from peftlab.tasks import load_task

        return load_task(task)
    return task


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine down to 0.

    The first warmup step already uses lr / warmup_steps (not 0), so no step is wasted.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def method_loss(model: nn.Module) -> Tensor | float:
    """Loss terms a method adds to the task loss (AdaLoRA's orthogonality regulariser): the sum of
    ``term(model)`` over the model state's ``loss_terms`` ({name: term}, set by the method's builder)."""
    state = peek(model)
    return sum((term(model) for term in (state.loss_terms.values() if state else ())), 0.0)


def run_step_hooks(model: nn.Module, step: int) -> None:
    """``hook(model, step)`` for each of the model state's ``after_step`` hooks, after
    ``optimizer.step()`` and before the gradients are zeroed; ``step`` counts from 0 (AdaLoRA's
    update_and_allocate)."""
    state = peek(model)
    for hook in (state.after_step.values() if state else ()):
        hook(model, step)


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's logits for a batch: (B, T, V) for a causal LM, (B, C) for a classifier."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def summed_loss(logits: Tensor, labels: Tensor, classification: bool) -> Tensor:
    """Cross-entropy SUMMED over the batch's targets (next tokens, or one label per row)."""
    if classification:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    logits = logits[:, -labels.shape[1]:]  # soft-prompt methods prepend virtual-token positions
    # position t predicts token t + 1
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # (B * (T-1), V)
        labels[:, 1:].reshape(-1),  # (B * (T-1),)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_targets(batch: dict[str, Tensor], classification: bool) -> int:
    """How many terms :func:`summed_loss` adds up: rows (classification) or unmasked next tokens."""
    labels = batch["labels"]
    return labels.shape[0] if classification else int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int = 128,
    bf16: bool = False,
    max_batches: int | None = None,
    pad_id: int | None = None,
) -> dict[str, float]:
    """Mean loss per target over ``data`` (and accuracy for classification), in eval mode.

    ``data`` as for :func:`train`; of a DatasetDict the "validation" split is used, else "test".
    Returns ``{"loss": ..., "examples": n}`` plus ``"accuracy"`` for classification models.
    """
    classification = is_classification(model)
    dataset = prepare_dataset(data, tokenizer, max_length, classification)
    pad_id = pad_token_id(tokenizer, model) if pad_id is None else pad_id
    device = model_device(model)
    keep_4bit_trainable(model)  # an eval forward must not strip autograd from 4-bit layers
    was_training = model.training
    model.eval()
    loss_total, targets, correct, seen = 0.0, 0, 0, 0
    try:
        for i, start in enumerate(range(0, len(dataset), batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            rows = list(range(start, min(start + batch_size, len(dataset))))
            batch = _to_device(collate_rows(dataset, rows, pad_id), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16_usable(bf16, device)):
                logits = logits_of(model, batch)
                loss_total += summed_loss(logits, batch["labels"], classification).item()
                if classification:
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
            targets += count_targets(batch, classification)
            seen += len(rows)
    finally:
        model.train(was_training)
    result = {"loss": loss_total / max(targets, 1), "examples": seen}
    if classification:
        result["accuracy"] = correct / max(seen, 1)
    return result


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def fit_context(model: nn.Module, max_length: int) -> int:
    """``max_length`` capped at the model's context (``max_position_embeddings``), with a warning:
    BERT-style absolute positions fail past it, RoPE models silently leave what they learned."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and max_length > context:
        warnings.warn(
            f"max_length={max_length} is longer than the model's context of {context} tokens "
            f"(max_position_embeddings); texts are cut to {context} tokens instead. Pass "
            f"max_length<={context} to silence this.",
            UserWarning, stacklevel=3,
        )
        return context
    return max_length


def is_classification(model: nn.Module) -> bool:
    """Sequence classification (one label per row) or causal LM (next tokens)? From the class."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(type(m).__name__.endswith("ForSequenceClassification") for m in (model, inner))


def prepare_dataset(data: Any, tokenizer: Any, max_length: int, classification: bool,
                    split: str | None = None) -> Any:
    """A tokenized ``datasets.Dataset`` holding only the columns the model takes."""
    if isinstance(data, Mapping):  # a DatasetDict (a dict of splits)
        splits = [split] if split else ["validation", "test"]
        name = next((s for s in splits if s in data), None)
        if name is None:
            raise DataError(
                f"The DatasetDict has the splits {list(data)}, none of {splits}. Expected a "
                f"{' or '.join(repr(s) for s in splits)} split; try passing the Dataset itself."
            )
        data = data[name]
    if not hasattr(data, "column_names"):
        raise DataError(
            f"Cannot train on a {type(data).__name__}. Expected a datasets.Dataset or DatasetDict; "
            "try peftlab.load_dataset('chatterbot-qa') or datasets.Dataset.from_list(rows)."
        )
    if len(data) == 0:
        raise DataError("The dataset is empty (0 rows). Expected at least one row; check the "
                        "filter or file that built it, or try peftlab.load_dataset('chatterbot-qa').")
    columns = set(data.column_names)
    if "input_ids" not in columns:
        if tokenizer is None:
            raise DataError(
                f"The dataset is not tokenized (columns: {sorted(columns)}) and no tokenizer was "
                "given. Expected tokenizer=...; try train(model, data, tokenizer=tokenizer)."
            )
        from peftlab import data as peftlab_data

        if classification:
            if not {"text", "label"} <= columns:
                raise DataError(
                    f"A classification model needs 'text' and 'label' columns; this dataset has "
                    f"{sorted(columns)}. Try peftlab.load_dataset('rotten-tomatoes')."
                )
            data = peftlab_data.tokenize_classification(data, tokenizer, max_length)
        elif {"question", "answer"} <= columns or "text" in columns:
            data = peftlab_data.tokenize_causal_lm(data, tokenizer, max_length)
        else:
            raise DataError(
                f"A causal LM needs 'question' + 'answer' or 'text' columns; this dataset has "
                f"{sorted(columns)}. Try peftlab.load_dataset('chatterbot-qa')."
            )
    keep = [c for c in _MODEL_COLUMNS if c in data.column_names]
    if classification and not {"label", "labels"} & set(keep):
        raise DataError("A classification model needs a 'label' or 'labels' column in the tokenized data.")
    return data.select_columns(keep)


def check_labels(dataset: Any, model: nn.Module) -> None:
    """Every class id must have an output of the classifier, else cross-entropy fails deep inside."""
    column = "labels" if "labels" in dataset.column_names else "label"
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    labels = dataset[column]
    if num_labels is not None and (min(labels) < 0 or max(labels) >= num_labels):
        raise DataError(
            f"The data has class ids from {min(labels)} to {max(labels)}, but the model's classifier "
            f"has {num_labels} outputs. Expected ids in 0..{num_labels - 1}; load the model with "
            f"num_labels={max(labels) + 1}, e.g. peftlab.load_model(name, num_labels={max(labels) + 1})."
        )


class _EpochOrder:
    """Row of the dataset for sample i of an endless, seeded, epoch-by-epoch shuffled stream."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}  # keep one epoch
        return self._cache[epoch]

    def rows(self, start: int, count: int) -> list[int]:
        return [self._epoch(i // self.n)[i % self.n] for i in range(start, start + count)]


def collate_rows(dataset: Any, rows: Iterable[int], pad_id: int) -> dict[str, Tensor]:
    """Pad the rows into tensors (peftlab.data.collate) and make sure ``labels`` is there."""
    from peftlab.data import collate

    batch = dict(collate([dataset[i] for i in rows], pad_id))
    if "labels" not in batch and "label" in batch:
        batch["labels"] = batch.pop("label")
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "labels" not in batch:  # plain text: learn every real token, never the padding
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return batch


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def pad_token_id(tokenizer: Any, model: nn.Module) -> int:
    """The id used for padding (masked out anyway): the tokenizer's pad, else its EOS, else 0."""
    for owner, names in ((tokenizer, ("pad_token_id", "eos_token_id")),
                         (getattr(model, "config", None), ("pad_token_id", "eos_token_id"))):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


# --------------------------------------------------------------------------------------------
# Devices, precision, memory
# --------------------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _bf16_usable(bf16: bool, device: torch.device) -> bool:
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("This GPU has no bfloat16 support; training in fp32 instead (bf16=False).", stacklevel=3)
        return False
    return bf16


def _enable_checkpointing(model: nn.Module) -> bool:
    """Turn on activation checkpointing (use_reentrant=False); True if it was off before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner, "is_activation_checkpointing", False):
        return False
    enable = getattr(inner, "activation_checkpointing_enable", None) or getattr(
        inner, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(inner).__name__} does not support gradient checkpointing. Expected a "
            "transformers model that does; try gradient_checkpointing=False."
        )
    # Non-reentrant checkpointing lets gradients reach the adapters even though the frozen
    # embedding's output does not require grad; transformers also enables input grads here.
    enable({"use_reentrant": False})
    return True


def _disable_checkpointing(model: nn.Module) -> None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    disable = getattr(inner, "activation_checkpointing_disable", None) or inner.gradient_checkpointing_disable
    disable()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every random generator training draws from (dropout, data-independent sampling)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _save_checkpoint(out_dir: Path, model: nn.Module, optimizer, scheduler, history: list[dict],
                     settings: dict, rng: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint-<step>/`` atomically (temporary folder, then rename).

    ``rng``: the generators' state to resume from (default: now); after a step cut short, the
    state at that step's start."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{len(history):06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); a checkpoint is an ordinary folder
    try:
        state = {
            "step": len(history),
            "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng if rng is not None else rng_state(),
            "settings": settings,
        }
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "history.json").write_text(json.dumps(history, indent=1))
        _save_adapter_folder(model, tmp / "adapter")
        if final.exists():  # e.g. a rerun into the same out_dir: swap, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=out_dir))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_adapter_folder(model: nn.Module, path: Path) -> None:
    """The adapter in PEFT format, for people and tools; resuming reads trainer_state.pt."""
    try:
        from peftlab.io import save_adapter
    except ImportError:
        return
    try:
        save_adapter(model, path)
    except Exception as exc:  # noqa: BLE001 (the weights are safe in trainer_state.pt already)
        warnings.warn(
            f"The checkpoint's adapter/ folder was not written ({type(exc).__name__}: {exc}); the "
            "trainable weights are in trainer_state.pt, so resuming still works.",
            RuntimeWarning, stacklevel=3,
        )


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint, else the newest ``checkpoint-*`` inside it."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    found = sorted(path.glob("checkpoint-*/trainer_state.pt")) if path.is_dir() else []
    if not found:
        raise AdapterFileError(
            f"No checkpoint at {path}. Expected a folder holding trainer_state.pt, or an out_dir "
            "with checkpoint-* folders; try the out_dir of the run you want to continue."
        )
    return found[-1].parent


def _load_checkpoint(path, model: nn.Module, optimizer, scheduler, settings: dict) -> tuple[int, list[dict]]:
    folder = find_checkpoint(path)
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state["trainable"]) != set(trainable):
        missing = sorted(set(trainable) - set(state["trainable"]))[:3]
        extra = sorted(set(state["trainable"]) - set(trainable))[:3]
        raise AdapterFileError(
            f"The checkpoint {folder} does not fit this model: its trainable parameters differ "
            f"(model only: {missing}; checkpoint only: {extra}). Expected the same base model, "
            "method and hyperparameters as the run that wrote it; try adapting the model the same way."
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    changed = [k for k in ("steps", "lr", "batch_size", "grad_accum", "seed", "warmup_ratio", "max_length")
               if state["settings"].get(k) != settings.get(k)]
    if changed:
        warnings.warn(
            f"Resuming with different {', '.join(changed)} than the run that wrote {folder.name}: "
            "the loss curve will not match an uninterrupted run.", stacklevel=3,
        )
    history = json.loads((folder / "history.json").read_text())
    return state["step"], history


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _check_settings(steps, batch_size, grad_accum, lr, warmup_ratio, checkpoint_every, eval_every) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer.")
    for name, value in (("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer or None.")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr={lr!r} is invalid. Expected a positive number; try 2e-4 for LoRA.")
    if not (0.0 <= warmup_ratio < 1.0):
        raise ConfigError(f"warmup_ratio={warmup_ratio!r} is invalid. Expected a number in [0, 1); try 0.1.")


def callback_name(callback: Callable) -> str:
    name = getattr(callback, "__qualname__", None) or type(callback).__name__
    return f"{getattr(callback, '__module__', '') or ''}.{name}".lstrip(".")


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    disabled = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return tqdm(total=total, initial=initial, disable=not enabled or disabled, desc="train", unit="step")


class _CallableModule(types.ModuleType):
    """``peftlab.train`` names both this module and the function :func:`train`. Importing the
    module (``from peftlab.train import evaluate``) makes Python bind the package attribute
    ``peftlab.train`` to the module, so the module forwards calls: ``peftlab.train(model, data)``
    works whichever of the two the attribute holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["train", "evaluate", "TrainResult", "lr_factor", "STOP_REASONS", "find_checkpoint"]
