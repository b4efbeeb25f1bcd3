"""The training loop, step by step: ``peftlab.train(model, data)``.

    train(...)             TrainSettings from the arguments; the task's data; the checks
      _set_up              the data framed, the optimizer and schedule, the seeds, a resume
      _loop                for each step until the last or a stop:
        _accumulate          grad_accum forward/backward passes; the gradients add up
        _apply               clip; the optimizer step and its record, or a NaN stop
        _after_step          eval and task metrics, history, callbacks, checkpoint, stop flag
      _finish              the last checkpoint, the TrainResult (or a callback's TrainingError)

The state of one call lives in a :class:`_Run`: what the set-up fixed, and how it is going.
Warnings about the call itself (a resume with other settings, a NaN stop, no bfloat16) point at
the caller's line of train(); their ``stacklevel`` comments name the frames in between.

Reference: AdamW, Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization,
https://arxiv.org/abs/1711.05101
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import ConfigError, DataError, TrainingError
from peftlab.evaluation import evaluate as evaluate_task
from peftlab.memory import peak_memory_mb, reset_peak_memory
from peftlab.models import keep_4bit_trainable
from peftlab.train.batches import TrainData, fit_context, frame_data
from peftlab.train.checkpoints import load_checkpoint, rng_state, save_checkpoint
from peftlab.train.device import bf16_usable, disable_checkpointing, enable_checkpointing, model_device
from peftlab.train.loss import count_targets, evaluate, logits_of, lr_factor, method_loss, run_step_hooks, summed_loss
from peftlab.train.lorafa import lorafa_optimizer
from peftlab.train.loraplus import loraplus_param_groups
from peftlab.train.settings import Callback, StopFlag, TrainResult, TrainSettings


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
    loraplus_lr_ratio: float | None = None,
    lora_fa: bool = False,
    report_to: str | Sequence[str] | None = None,
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
        loraplus_lr_ratio: LoRA+ (https://arxiv.org/abs/2402.12354): every B-like tensor learns at
            ``loraplus_lr_ratio * lr`` (peft's groups: peftlab/train/loraplus.py); None: one lr.
        lora_fa: LoRA-FA (https://arxiv.org/abs/2308.03303): every LoRA's A is frozen and B's
            gradient projected, as peft's LoRA-FA optimiser does (peftlab/train/lorafa.py).
        report_to: log the config, the adapter's parameter count and every step's metrics to
            "trackio" (a local store; ``peftlab runs`` lists it), "tensorboard" (under
            ``out_dir/runs``), "all", or a list of them (peftlab/tracking.py); None: nowhere.
    """
    settings = TrainSettings(
        steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, grad_accum=grad_accum,
        warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
        gradient_checkpointing=gradient_checkpointing, bf16=bf16, seed=seed, out_dir=out_dir,
        checkpoint_every=checkpoint_every, resume_from=resume_from, eval_every=eval_every, progress=progress,
        loraplus_lr_ratio=loraplus_lr_ratio, lora_fa=lora_fa,
    )
    task = _resolve_task(task)
    data = _training_data(data, task)
    settings.check()
    max_length = fit_context(model, max_length)  # warns the caller when it is past the model's context
    from peftlab.tracking import start as start_tracking

    tracker = start_tracking(report_to, model, settings.as_dict(task))
    if tracker is not None:  # one more callback: each step's record goes to the trackers
        callbacks = [*([callbacks] if callable(callbacks) else callbacks), tracker.on_step]
    try:
        run = _set_up(model, data, settings, max_length, task=task, tokenizer=tokenizer, eval_data=eval_data,
                      callbacks=callbacks, stop=stop)
        return _loop(run)
    finally:
        if tracker is not None:
            tracker.close()


@dataclass
class _Run:
    """One call of train(): what the set-up fixed, then how it is going (filled in step by step)."""

    model: nn.Module
    settings: TrainSettings
    settings_dict: dict  # settings.as_dict(task): what checkpoints and TrainResult.settings hold
    task: Any  # a peftlab.tasks.Task, or None
    tokenizer: Any
    callbacks: tuple[Callback, ...]
    stop: StopFlag | None
    data: TrainData
    device: torch.device
    bf16: bool  # autocast on: asked for, and the device has bfloat16
    params: list[nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    out: Path | None  # out_dir
    start_step: int  # steps done before this call (a resume)
    history: list[dict]  # one record per applied step, a resumed run's earlier ones first
    # how it is going
    reason: str = "completed"  # one of STOP_REASONS
    message: str = ""
    failure: tuple[str, Exception] | None = None  # (the callback's name, what it raised)
    checkpoint: Path | None = None  # newest checkpoint written
    last_saved: int | None = None  # the steps that checkpoint holds
    last_eval: dict | None = None  # the last evaluate() on eval_data
    task_eval: dict | None = None  # the last task metrics
    # the RNG as the current step started: a step cut short (NaN, Ctrl-C) has drawn dropout masks
    # from it, and a resumed run must draw them again from here to give the same curve
    step_rng: dict | None = None
    partial_rng: dict | None = None  # step_rng of a step cut short, for the last checkpoint


def _resolve_task(task: Any):
    """A task name -> its Task; a Task (or None) as it is."""
    if isinstance(task, str):
        from peftlab.tasks import load_task

        return load_task(task)
    return task


def _training_data(data: Any, task: Any) -> Any:
    """``data``, else the task's framed training split; a clear error when there is neither."""
    if task is not None:
        data = task.training_data() if data is None else data
    if data is None:
        raise ConfigError("train() got no data. Expected a dataset (data=...) or a task (task='sentiment'); "
                          "see peftlab.list_tasks() and peftlab.list_datasets().")
    return data


def _set_up(model: nn.Module, data: Any, settings: TrainSettings, max_length: int, *, task: Any,
            tokenizer: Any, eval_data: Any, callbacks: Callback | Sequence[Callback],
            stop: StopFlag | None) -> _Run:
    """Frame the data, make the optimizer and schedule, seed everything, restore a checkpoint."""
    callbacks = (callbacks,) if callable(callbacks) else tuple(callbacks)
    framed = frame_data(model, data, eval_data, tokenizer, max_length, settings.seed)
    device = model_device(model)
    bf16 = bf16_usable(settings.bf16, device, stacklevel=4)  # _set_up <- train <- the caller
    keep_4bit_trainable(model)

    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "The model has no trainable parameters, so there is nothing to train. Expected an "
            "adapted model; try model = peftlab.adapt(model, 'lora') first."
        )
    if settings.lora_fa:  # freezes A first: params are what stays trainable
        optimizer = lorafa_optimizer(model, settings.lr, settings.weight_decay)
    else:
        groups = [p for p in model.parameters() if p.requires_grad] if settings.loraplus_lr_ratio is None \
            else loraplus_param_groups(model, settings.lr, settings.loraplus_lr_ratio, settings.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    steps, warmup_steps = settings.steps, int(settings.warmup_ratio * settings.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, steps))

    torch.manual_seed(settings.seed)  # dropout; the data order has its own generators (EpochOrder)
    random.seed(settings.seed)
    settings_dict = settings.as_dict(task)
    start_step, history = 0, []
    if settings.resume_from is not None:
        start_step, history = load_checkpoint(settings.resume_from, model, optimizer, scheduler, settings_dict,
                                              stacklevel=4)  # _set_up <- train <- the caller
    return _Run(model=model, settings=settings, settings_dict=settings_dict, task=task, tokenizer=tokenizer,
                callbacks=callbacks, stop=stop, data=framed, device=device, bf16=bf16, params=params,
                optimizer=optimizer, scheduler=scheduler,
                out=Path(settings.out_dir) if settings.out_dir is not None else None,
                start_step=start_step, history=history, message=f"Completed {steps} steps.")


def _loop(run: _Run) -> TrainResult:
    """The steps from ``run.start_step`` on, until the last one or a stop; then the result.

    However the steps end (NaN, a stop, Ctrl-C, an error), the model gets its mode back and
    what was trained is kept: Ctrl-C returns the result, an error saves a checkpoint first."""
    model, settings = run.model, run.settings
    was_training = model.training
    model.train()  # dropout on; and HF models only checkpoint activations in training mode
    checkpointing_was_off = settings.gradient_checkpointing and enable_checkpointing(model)
    step = run.start_step
    bar = _progress_bar(settings.steps, run.start_step, settings.progress)
    reset_peak_memory(run.device)
    start_memory = peak_memory_mb(run.device)  # right after a reset, the peak is what is resident now
    t_start = time.perf_counter()
    try:
        for step in range(run.start_step, settings.steps):
            run.step_rng = rng_state()
            reset_peak_memory(run.device)
            t0 = time.perf_counter()
            loss, n_tokens = _accumulate(run, step)
            record = _apply(run, step, loss, n_tokens, t0)
            if record is None or not _after_step(run, step, record, bar):
                break
    except KeyboardInterrupt:
        run.optimizer.zero_grad(set_to_none=True)
        if run.step_rng is not None and len(run.history) == step:  # inside a step, not after it
            run.partial_rng = run.step_rng
        run.reason, run.message = "interrupted", f"Interrupted after step {len(run.history)}."
    except BaseException:
        # An unexpected error (out of memory, a shape mismatch, ...): keep what was trained so far.
        if run.out is not None and len(run.history) > run.start_step:
            rng = run.step_rng if run.step_rng is not None and len(run.history) == step else None
            save_checkpoint(run.out, model, run.optimizer, run.scheduler, run.history, run.settings_dict, rng)
        raise
    finally:
        bar.close()
        if checkpointing_was_off:
            disable_checkpointing(model)
        model.train(was_training)
    return _finish(run, time.perf_counter() - t_start, start_memory)


def _accumulate(run: _Run, step: int) -> tuple[float, int]:
    """Forward and backward over the step's ``grad_accum`` micro-batches (the gradients add up).

    Returns the step's loss (per target, over the whole step) and how many tokens it saw."""
    settings, classification = run.settings, run.data.classification
    micro_batches = run.data.micro_batches(step, settings.batch_size, settings.grad_accum, run.device)
    n_targets = sum(count_targets(b, classification) for b in micro_batches)
    if n_targets == 0:
        raise DataError(
            f"Step {step + 1} has no target tokens: every label is masked (-100), often "
            f"because max_length={run.data.max_length} truncates the answers away. Expected some "
            "tokens to learn from; try a larger max_length."
        )
    loss_total, n_tokens = 0.0, 0
    for batch in micro_batches:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            loss_sum = summed_loss(logits_of(run.model, batch), batch["labels"], classification)
        # divide by the WHOLE step's count: 2 x 2 == 1 x 4; a method's own loss term
        # (AdaLoRA's regulariser) counts once per step
        (loss_sum / n_targets + method_loss(run.model) / settings.grad_accum).backward()
        loss_total += loss_sum.item()
        n_tokens += int(batch["attention_mask"].sum())
    return loss_total / n_targets, n_tokens


def _apply(run: _Run, step: int, loss: float, n_tokens: int, t0: float) -> dict | None:
    """Clip the gradients and take the optimizer step; returns the step's record.

    A non-finite loss or gradient norm is not applied: the gradients are dropped, the adapter
    keeps its last good values, and None comes back with the run's reason set to "nan"."""
    settings = run.settings
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, settings.max_grad_norm or math.inf))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)  # drop the bad gradients; weights untouched
        run.reason, run.partial_rng = "nan", run.step_rng
        run.message = (
            f"Step {step + 1} gave a non-finite loss ({loss}) or gradient norm ({grad_norm}); "
            f"training stopped without applying it, so the adapter keeps the values of step "
            f"{step}. Try a lower lr (now {settings.lr:g}), max_grad_norm=1.0, or bf16=False."
        )
        warnings.warn(run.message, RuntimeWarning, stacklevel=4)  # _apply <- _loop <- train <- the caller
        return None
    lr_now = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.optimizer.step()
    run.scheduler.step()
    run_step_hooks(run.model, step)  # e.g. AdaLoRA's rank allocation: reads this step's gradients
    run.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    first = step * settings.grad_accum * settings.batch_size  # this step's first sample in the stream
    return {
        "step": step + 1,
        "loss": loss,
        "lr": lr_now,
        "grad_norm": grad_norm,
        "step_time_s": dt,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / dt,
        "memory_mb": peak_memory_mb(run.device),
        "epoch": (first + settings.grad_accum * settings.batch_size) / len(run.data.dataset),
    }


def _after_step(run: _Run, step: int, record: dict, bar: Any) -> bool:
    """After an applied step: measure, keep the record, run the callbacks, checkpoint, look at
    the stop flag. Returns whether training goes on."""
    settings = run.settings
    if step + 1 == settings.steps or (settings.eval_every and (step + 1) % settings.eval_every == 0):
        _measure(run, record)
    run.history.append(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    bar.update(1)
    _run_callbacks(run, step, record)
    if run.failure is not None:
        return False
    if run.out is not None and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0:
        run.checkpoint = save_checkpoint(run.out, run.model, run.optimizer, run.scheduler, run.history,
                                         run.settings_dict)
        run.last_saved = step + 1
    if run.reason == "stopped":
        return False
    if run.stop is not None and run.stop.is_set():
        run.reason, run.message = "stopped", f"Stop flag set; stopped after step {step + 1}."
        return False
    return True


def _measure(run: _Run, record: dict) -> None:
    """``eval_<name>`` (evaluate on eval_data) and ``task_<metric>`` (the task's live slice) into the record."""
    settings, data = run.settings, run.data
    if data.eval_set is not None:
        # no gradients or saved activations: a whole step's rows fit in one batch
        run.last_eval = evaluate(run.model, data.eval_set, batch_size=settings.batch_size * settings.grad_accum,
                                 max_length=data.max_length, bf16=run.bf16, pad_id=data.pad_id)
        record.update({f"eval_{k}": v for k, v in run.last_eval.items() if k != "examples"})
    if run.task is not None:
        run.task_eval = evaluate_task(run.model, run.task, tokenizer=run.tokenizer, limit=run.task.live_eval_limit)
        record.update({f"task_{k}": run.task_eval[k] for k in run.task.metrics})


def _run_callbacks(run: _Run, step: int, record: dict) -> None:
    """``callback(record, model)`` for each; "stop" asks to stop, an exception ends the run
    (``run.failure``; :func:`_finish` raises it as a TrainingError)."""
    for callback in run.callbacks:
        try:
            answer = callback(record, run.model)
        except Exception as exc:  # noqa: BLE001 (re-raised by _finish as TrainingError)
            run.failure = (callback_name(callback), exc)
            break
        if answer == "stop":
            run.reason, run.message = "stopped", f"{callback_name(callback)} asked to stop after step {step + 1}."
    if run.failure is not None:
        name, exc = run.failure
        run.reason = "callback_error"
        run.message = (f"Callback {name} raised {type(exc).__name__}: {exc} "
                       f"(after step {step + 1}); training stopped.")


def _finish(run: _Run, elapsed: float, start_memory: float) -> TrainResult:
    """The last checkpoint (unless it is written already), then the result; after a callback's
    error, a TrainingError that carries the result instead."""
    history = run.history
    if run.out is not None and history and run.last_saved != len(history):
        run.checkpoint = save_checkpoint(run.out, run.model, run.optimizer, run.scheduler, history,
                                         run.settings_dict, run.partial_rng)
    message = run.message + (f" Checkpoint: {run.checkpoint}" if run.checkpoint is not None else "")
    result = TrainResult(
        model=run.model,
        history=history,
        final_loss=history[-1]["loss"] if history else math.nan,
        time_s=elapsed,
        peak_memory_mb=max((r["memory_mb"] for r in history[run.start_step:]), default=start_memory),
        start_memory_mb=start_memory,
        stop_reason=run.reason,
        message=message,
        checkpoint=run.checkpoint,
        eval=run.last_eval,
        task_eval=run.task_eval,
        settings=run.settings_dict,
    )
    if run.failure is not None:
        error = TrainingError(
            f"{message} The model keeps the adapter of the last finished step and the history is "
            "kept: read them from this exception's .result (and the checkpoint, if out_dir was "
            "given). Fix the callback and resume with train(..., resume_from=...)."
        )
        error.result = result
        raise error from run.failure[1]
    return result


def callback_name(callback: Callable) -> str:
    """``module.qualname`` of a callback, for messages."""
    name = getattr(callback, "__qualname__", None) or type(callback).__name__
    return f"{getattr(callback, '__module__', '') or ''}.{name}".lstrip(".")


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    disabled = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return tqdm(total=total, initial=initial, disable=not enabled or disabled, desc="train", unit="step")
