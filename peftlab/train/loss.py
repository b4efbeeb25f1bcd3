"""The objective: the loss a step minimises, the learning-rate schedule, and evaluation.

References:
    Warmup then cosine decay: Goyal et al. 2017, https://arxiv.org/abs/1706.02677 (warmup) and
        Loshchilov & Hutter 2017, SGDR, https://arxiv.org/abs/1608.03983 (cosine)
    Gradient accumulation that divides by the whole step's token count (not each micro-batch's):
        https://huggingface.co/blog/gradient_accumulation

The loss is cross-entropy SUMMED over the targets (:func:`summed_loss`) and divided by the whole
step's count of targets (:func:`count_targets`) by the loop, so 2 micro-batches of 2 rows give
the gradient of 1 batch of 4. A method adds its own terms (AdaLoRA's regulariser) through the
model state's ``loss_terms`` and runs its after-step work through ``after_step``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.models import keep_4bit_trainable
from peftlab.state import peek
from peftlab.train.batches import (IGNORE_INDEX, collate_rows, is_classification, pad_token_id, prepare_dataset,
                                   to_device)
from peftlab.train.device import bf16_usable, model_device


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
            batch = to_device(collate_rows(dataset, rows, pad_id), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_usable(bf16, device)):
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
