"""The exercises of lesson 12 (notebooks/12_loftq.ipynb): one LoftQ round: quantise what the adapter
does not carry, then the best rank-r correction.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _nf4_round_trip(w: Tensor) -> Tensor:
    from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4

    return dequantize_nf4(*quantize_nf4(w, 64, double_quant=False), torch.float32)  # as LoftQ and peft


def _loftq_inputs(g: torch.Generator) -> dict:
    d_out, d_in = (int(torch.randint(8, 40, (1,), generator=g)) for _ in range(2))
    r = int(torch.randint(1, 6, (1,), generator=g))
    return {"W": torch.randn(d_out, d_in, generator=g), "A": 0.3 * torch.randn(r, d_in, generator=g),
            "B": 0.3 * torch.randn(d_out, r, generator=g), "quantize": _nf4_round_trip}


def _loftq_step(W: Tensor, A: Tensor, B: Tensor, quantize) -> tuple[Tensor, Tensor, Tensor]:
    from peftlab.quant.loftq import low_rank

    Q = quantize(W - B @ A)  # quantise what the adapter does not carry
    B_new, A_new = low_rank(W - Q, A.shape[0])  # the best rank-r part of what Q misses
    return Q, A_new, B_new


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "loftq_step",
        "loftq_step(W, A, B, quantize) -> (Q, A_new, B_new): one LoftQ round. Q = quantize(W - B A); "
        "B_new A_new = the best rank-r approximation of W - Q, with B_new = U_r √S_r and A_new = √S_r V_rᵀ.",
        _loftq_step,
        _loftq_inputs,
        "Quantise what the adapter does not carry; then the adapter takes the best rank-r "
        "approximation of what the quantiser missed (Eckart-Young: a truncated SVD), with the square "
        "root of the singular values split evenly between B_new and A_new.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
