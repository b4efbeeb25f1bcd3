"""The exercises of lesson 17 (notebooks/17_deploying_and_serving.ipynb): merge a LoRA update into a
stored weight, rounding once; measure how much of an update a stored weight kept.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _merge_inputs(g: torch.Generator) -> dict:
    d_out, d_in = (int(torch.randint(4, 40, (1,), generator=g)) for _ in range(2))
    r = int(torch.randint(1, 6, (1,), generator=g))
    dtype = (torch.float32, torch.bfloat16)[int(torch.randint(0, 2, (1,), generator=g))]
    W = torch.randn(d_out, d_in, generator=g).to(dtype)
    return {"W": W, "A": 0.1 * torch.randn(r, d_in, generator=g), "B": 0.1 * torch.randn(d_out, r, generator=g),
            "scaling": float(torch.rand((), generator=g) * 2 + 0.5)}


def _merge_lora(W: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    merged = W.float() + scaling * (B.float() @ A.float())  # (d_out, d_in), the sum in float32
    return merged.to(W.dtype)  # rounded once, to the format the model stores


def _retained_inputs(g: torch.Generator) -> dict:
    shape = tuple(int(torch.randint(2, 30, (1,), generator=g)) for _ in range(2))
    delta = torch.randn(shape, generator=g)
    kept = (torch.rand(shape, generator=g) < 0.4).float()  # a stored change that kept some entries
    return {"delta": delta, "change": kept * delta + 0.1 * torch.randn(shape, generator=g)}


def _retained_fraction(delta: Tensor, change: Tensor) -> Tensor:
    delta, change = delta.double(), change.double()
    return (change * delta).sum() / (delta * delta).sum()  # the share of ΔW along ΔW itself


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "merge_lora",
        "merge_lora(W, A, B, scaling) -> a tensor like W: the merged weight W + scaling · B A, in W's dtype "
        "(float32 or bfloat16). Add in float32 and round once to W's dtype, as peft's merge does.",
        _merge_lora,
        _merge_inputs,
        "The update B A has W's shape (d_out, d_in). Do the addition with everything in float32, and cast "
        "only the sum back to W.dtype: rounding the update to bfloat16 first, then the sum again, rounds twice.",
        atol=1e-6,
    ),
    Exercise(
        "retained_fraction",
        "retained_fraction(delta, change) -> a scalar tensor: how much of the update ΔW = delta a stored "
        "change carries, <change, ΔW> / <ΔW, ΔW> (1: all of it; 0: none). Sum in float64.",
        _retained_fraction,
        _retained_inputs,
        "Project the change onto the direction of ΔW: the inner product of the two (a sum over every entry), "
        "divided by ΔW's own squared norm.",
        atol=1e-9,
    ),
)


__all__ = ["LESSON_EXERCISES"]
