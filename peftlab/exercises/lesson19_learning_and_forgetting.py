"""The exercises of lesson 19 (notebooks/19_learning_and_forgetting.ipynb): how much each of the
leading singular directions of a tuned weight W + ΔW resembles the pre-trained W's (the test of
intruder dimensions, Shuttleworth et al. 2024).

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _similarity_inputs(g: torch.Generator) -> dict:
    d_out, d_in = (int(torch.randint(6, 30, (1,), generator=g)) for _ in range(2))
    r = int(torch.randint(1, 4, (1,), generator=g))
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    delta = torch.randn(d_out, r, generator=g, dtype=torch.float64) @ torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return {"W": W, "W_tuned": W + 2.0 * delta, "top_k": int(torch.randint(1, 6, (1,), generator=g))}


def _intruder_similarity(W: Tensor, W_tuned: Tensor, top_k: int) -> Tensor:
    U = torch.linalg.svd(W, full_matrices=False).U  # W's left singular vectors, unit columns
    U_tuned = torch.linalg.svd(W_tuned, full_matrices=False).U[:, :top_k]  # the tuned weight's leading ones
    return (U_tuned.T @ U).abs().max(dim=1).values  # (top_k,): the best |cosine| of each with any of W's


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "intruder_similarity",
        "intruder_similarity(W, W_tuned, top_k) -> (top_k,): for each of the top_k leading left singular vectors "
        "of W_tuned (largest singular value first), its largest |cosine similarity| with any left singular "
        "vector of W. Below 0.5, the direction is an intruder.",
        _intruder_similarity,
        _similarity_inputs,
        "torch.linalg.svd(M, full_matrices=False) returns U, S, Vh with unit-length columns in U, sorted by "
        "singular value. The cosines of every pair of columns are one matrix product, U_tuned^T U; a singular "
        "vector's sign is arbitrary, so compare absolute values, and keep each row's maximum.",
        atol=1e-8,
    ),
)


__all__ = ["LESSON_EXERCISES"]
