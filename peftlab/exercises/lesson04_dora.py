"""The exercises of lesson 4 (notebooks/04_dora.ipynb): DoRA's weight: a magnitude times a
normalised direction.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _dora_inputs(g: torch.Generator) -> dict:
    d_in, d_out, r = (int(torch.randint(4, 24, (1,), generator=g)) for _ in range(3))
    r = max(1, min(r, d_in, d_out))
    return {"W0": torch.randn(d_out, d_in, generator=g), "A": torch.randn(r, d_in, generator=g),
            "B": 0.3 * torch.randn(d_out, r, generator=g), "m": 0.5 + torch.rand(d_out, generator=g),
            "scaling": float(torch.randint(1, 5, (1,), generator=g))}


def _dora_weight(W0: Tensor, A: Tensor, B: Tensor, m: Tensor, scaling: float) -> Tensor:
    V = W0 + scaling * B @ A  # (d_out, d_in)
    return (m / V.norm(dim=1)).unsqueeze(1) * V  # one norm per output unit: a row here


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "dora_weight",
        "dora_weight(W0, A, B, m, scaling) -> W' = m ⊙ V / ||V||_c with V = W0 + scaling · B A, shape "
        "(d_out, d_in); ||V||_c is the L2 norm of each output unit's weights (one per row here).",
        _dora_weight,
        _dora_inputs,
        "First the direction V: W0 plus the scaled low-rank update. An output unit's weights are one "
        "row of V, so there is one norm per row; divide each row by its norm and multiply it by its "
        "magnitude. A factor per row needs shape (d_out, 1) to broadcast.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
