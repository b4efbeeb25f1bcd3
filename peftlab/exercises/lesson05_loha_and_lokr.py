"""The exercises of lesson 5 (notebooks/05_loha_and_lokr.ipynb): LoHa's Hadamard product of two low-
rank products, and LoKr's Kronecker product.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _loha_inputs(g: torch.Generator) -> dict:
    d_in, d_out, r = (int(torch.randint(4, 24, (1,), generator=g)) for _ in range(3))
    r = max(1, min(r, 6))
    shapes = {"w1a": (d_out, r), "w1b": (r, d_in), "w2a": (d_out, r), "w2b": (r, d_in)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()} | {
        "scaling": float(torch.randint(1, 5, (1,), generator=g)) / 4}


def _loha_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scaling: float) -> Tensor:
    return scaling * (w1a @ w1b) * (w2a @ w2b)


def _kron_inputs(g: torch.Generator) -> dict:
    a, c, b, d = (int(torch.randint(1, 7, (1,), generator=g)) for _ in range(4))
    return {"W1": torch.randn(a, c, generator=g), "W2": torch.randn(b, d, generator=g)}


def _kronecker(W1: Tensor, W2: Tensor) -> Tensor:
    return torch.kron(W1, W2)


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "loha_delta_weight",
        "loha_delta_weight(w1a, w1b, w2a, w2b, scaling) -> ΔW = scaling · (w1a w1b) ⊙ (w2a w2b), shape "
        "(d_out, d_in); w1a, w2a are (d_out, r), w1b, w2b are (r, d_in).",
        _loha_delta,
        _loha_inputs,
        "Each pair (w1a, w1b) and (w2a, w2b) is a LoRA-style low-rank product of shape (d_out, d_in); "
        "LoHa combines the two products entry by entry (the Hadamard product), not as a matrix product.",
        atol=1e-4,
    ),
    Exercise(
        "kronecker",
        "kronecker(W1, W2) -> W1 ⊗ W2 of shape (a·b, c·d) for W1 (a, c) and W2 (b, d): block (i, j) is "
        "W1[i, j] · W2. Write it without torch.kron.",
        _kronecker,
        _kron_inputs,
        "Block (i, j) is W1[i, j] times all of W2. Give each factor two singleton axes so that broadcasting "
        "multiplies every entry of W1 with every entry of W2 in a 4-d tensor, then reshape it to "
        "(a·b, c·d); which axes you interleave decides whether the blocks come out in the right places.",
        forbid_ops=("kron",),
        atol=1e-6,
    ),
)


__all__ = ["LESSON_EXERCISES"]
