"""One readable training loop for adapters: ``peftlab.train(model, data)``.

The package, one concern per module (this file re-exports the public names):

    loop.py          train() and its named steps: set up, accumulate, apply, after-step, finish
    settings.py      TrainSettings (the frozen settings), TrainResult, STOP_REASONS
    batches.py       framing the data: tokenize, check, pad, the seeded epoch order
    loss.py          the summed cross-entropy, method loss terms and step hooks, lr schedule, evaluate
    device.py        the model's device, bfloat16 autocast, activation checkpointing
    checkpoints.py   atomic checkpoints, resuming, RNG states

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

With ``out_dir``, train() writes checkpoints that a crash cannot leave half-written, and
``train(..., resume_from=out_dir)`` continues from the newest one with the loss curve an
uninterrupted run gives: their layout is in peftlab/train/checkpoints.py.
"""

from __future__ import annotations

import sys
import types
from typing import Any

# Every name ``from peftlab.train import ...`` reached when this was one file stays importable here.
from peftlab.evaluation import evaluate as evaluate_task  # noqa: F401
from peftlab.memory import peak_memory_mb, reset_peak_memory
from peftlab.train.batches import (IGNORE_INDEX, EpochOrder, TrainData, check_labels, collate_rows, fit_context,
                                   frame_data, is_classification, pad_token_id, prepare_dataset, start_data)
from peftlab.train.checkpoints import find_checkpoint, rng_state
from peftlab.train.device import model_device
from peftlab.train.loop import callback_name, train
from peftlab.train.loss import count_targets, evaluate, logits_of, lr_factor, method_loss, run_step_hooks, summed_loss
from peftlab.train.settings import STOP_REASONS, Callback, StopFlag, TrainResult, TrainSettings

_EpochOrder = EpochOrder  # the name tests/test_train.py imports


class _CallableModule(types.ModuleType):
    """``peftlab.train`` names both this module and the function :func:`train`. Importing the
    module (``from peftlab.train import evaluate``) makes Python bind the package attribute
    ``peftlab.train`` to the module, so the module forwards calls: ``peftlab.train(model, data)``
    works whichever of the two the attribute holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["train", "evaluate", "TrainResult", "lr_factor", "STOP_REASONS", "find_checkpoint", "start_data"]
