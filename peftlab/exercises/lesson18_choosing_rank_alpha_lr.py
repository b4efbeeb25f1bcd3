"""The exercises of lesson 18 (notebooks/18_choosing_rank_alpha_lr.ipynb): the first update of a
LoRA whose B starts at zero, under Adam, at a given scale (alpha / r or rsLoRA's alpha / sqrt(r)).

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _update_inputs(g: torch.Generator) -> dict:
    r, d_in, d_out = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 9), (3, 40), (3, 40)))
    return {"A": torch.randn(r, d_in, generator=g) / d_in**0.5, "grad_B": torch.randn(d_out, r, generator=g),
            "lr": (0.1, 0.3, 1.0)[int(torch.randint(0, 3, (1,), generator=g))], "scaling": float(torch.rand((), generator=g) * 4 + 0.1)}


def _first_lora_update(A: Tensor, grad_B: Tensor, lr: float, scaling: float) -> Tensor:
    # Adam's first step: m / sqrt(v) = g / |g| = sign(g), so B moves by -lr * sign(grad_B)
    return scaling * (-lr * torch.sign(grad_B)) @ A  # (d_out, d_in)


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "first_lora_update",
        "first_lora_update(A, grad_B, lr, scaling) -> ΔW (d_out, d_in): the change of the layer's weight after "
        "one Adam step from B = 0 (no weight decay, eps negligible), ΔW = scaling · B_new A.",
        _first_lora_update,
        _update_inputs,
        "Adam's first step divides the (bias-corrected) first moment by the square root of the second: that is "
        "g / |g|, the sign of the gradient. So every entry of B moves by -lr · sign(grad_B), whatever the "
        "gradient's size; ΔW is then scaling times the new B times A.",
        atol=1e-6,
    ),
)


__all__ = ["LESSON_EXERCISES"]
