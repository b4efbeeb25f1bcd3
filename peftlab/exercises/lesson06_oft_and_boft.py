"""The exercises of lesson 6 (notebooks/06_oft_and_boft.ipynb): OFT's Cayley transform and its
block-diagonal rotation.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _cayley_inputs(g: torch.Generator) -> dict:
    b = int(torch.randint(2, 9, (1,), generator=g))
    return {"params": 0.5 * torch.randn(b * (b - 1) // 2, generator=g, dtype=torch.float64), "b": b}


def _cayley_rotation(params: Tensor, b: int) -> Tensor:
    rows, cols = torch.triu_indices(b, b, offset=1)
    upper = params.new_zeros(b, b)
    upper[rows, cols] = params
    Q = upper - upper.T  # skew-symmetric
    eye = torch.eye(b, dtype=params.dtype)
    return (eye - Q) @ torch.linalg.inv(eye + Q)


def _oft_block_inputs(g: torch.Generator) -> dict:
    n, b, d_out = (int(torch.randint(1, 5, (1,), generator=g)) + extra for extra in (0, 1, 1))
    return {"x": torch.randn(3, n * b, generator=g), "W0": torch.randn(d_out, n * b, generator=g),
            "blocks": torch.linalg.qr(torch.randn(n, b, b, generator=g)).Q}


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "oft_cayley",
        "cayley_rotation(params, b) -> the (b, b) orthogonal block R = (I - Q)(I + Q)^-1, where Q is "
        "skew-symmetric (Q = -Q^T) with its strict upper triangle filled row by row from params "
        "(b(b-1)/2 numbers, the order of torch.triu_indices(b, b, offset=1)).",
        _cayley_rotation,
        _cayley_inputs,
        "Build Q first: a zero b x b matrix with params in its strict upper triangle (torch.triu_indices "
        "lists those positions in the right order), minus its own transpose. The Cayley transform then "
        "needs an identity of params' dtype and one inverse (or a solve).",
        atol=1e-9,
    ),
    Exercise(
        "oft_block_forward",
        "oft_forward(x, W0, blocks) -> h = x R W0^T for x of shape (n, d_in), where R = "
        "block_diag(blocks[0], ..., blocks[-1]) and blocks has shape (n_blocks, b, b), n_blocks · b = d_in.",
        lambda x, W0, blocks: x @ torch.block_diag(*blocks) @ W0.T,
        _oft_block_inputs,
        "The rotation acts on the input features before W0. Rows of x are examples, so a row vector is "
        "multiplied by R from the left: cut each row into n_blocks chunks of b features, turn chunk i "
        "with blocks[i], put the chunks back together, then apply W0 as a linear layer does.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
