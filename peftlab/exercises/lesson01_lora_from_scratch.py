"""The exercises of lesson 1 (notebooks/01_lora_from_scratch.ipynb): LoRA's forward, its ΔW and its
parameter count, and NF4's absmax quantisation.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _lora_inputs(g: torch.Generator) -> dict:
    d_in, d_out, r = (int(torch.randint(4, 24, (1,), generator=g)) for _ in range(3))
    r = max(1, min(r, d_in - 1, d_out - 1))  # below both sizes: a (d_out, d_in) product is ΔW
    return {
        "x": torch.randn(3, d_in, generator=g),
        "W": torch.randn(d_out, d_in, generator=g),
        "A": torch.randn(r, d_in, generator=g),
        "B": torch.randn(d_out, r, generator=g),
        "alpha": float(torch.randint(1, 32, (1,), generator=g)),
        "r": r,
    }


def _lora_forward(x: Tensor, W: Tensor, A: Tensor, B: Tensor, alpha: float, r: int) -> Tensor:
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T


def _lora_delta(x: Tensor, W: Tensor, A: Tensor, B: Tensor, alpha: float, r: int) -> Tensor:
    return (alpha / r) * B @ A


def _count_inputs(g: torch.Generator) -> dict:
    return {k: int(torch.randint(1, 4096, (1,), generator=g)) for k in ("d_in", "d_out")} | {
        "r": int(torch.randint(1, 65, (1,), generator=g))
    }


def _absmax_inputs(g: torch.Generator) -> dict:
    return {"w": torch.randn(int(torch.randint(1, 5, (1,), generator=g)) * 64, generator=g), "blocksize": 64}


def _absmax_quantize(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    from peftlab.quant.nf4 import NF4_CODE

    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax[:, None]
    codes = (scaled[..., None] - NF4_CODE).abs().argmin(dim=-1)
    return codes.reshape(-1).to(torch.uint8), absmax


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "lora_forward",
        "lora_forward(x, W, A, B, alpha, r) -> h = x W^T + (alpha / r) (x A^T) B^T, for x of shape (n, d_in).",
        _lora_forward,
        _lora_inputs,
        "Rows of x are examples, so every linear map multiplies x by its weight transposed. Send x "
        "through A first (d_in -> r), then through B (r -> d_out), and scale by alpha / r: that way no "
        "d_out x d_in matrix is ever built.",
        dense=lambda inputs: (inputs["B"].shape[0], inputs["A"].shape[1], inputs["A"].shape[0]),
    ),
    Exercise(
        "lora_delta_weight",
        "lora_delta_weight(x, W, A, B, alpha, r) -> ΔW = (alpha / r) B A, shape (d_out, d_in).",
        _lora_delta,
        _lora_inputs,
        "ΔW has W's shape (d_out, d_in): B is (d_out, r) and A is (r, d_in).",
    ),
    Exercise(
        "lora_param_count",
        "lora_param_count(d_in, d_out, r) -> the number of trainable numbers LoRA adds to one layer.",
        lambda d_in, d_out, r: r * (d_in + d_out),
        _count_inputs,
        "A is r x d_in and B is d_out x r.",
        atol=0,
    ),
    Exercise(
        "nf4_absmax_quantize",
        "nf4_absmax_quantize(w, blocksize) -> (codes uint8 of len(w), absmax per block): scale each block "
        "by its largest |value|, then pick the nearest of the 16 NF4 code values.",
        _absmax_quantize,
        _absmax_inputs,
        "Work on rows of blocksize values. A row's scale is its largest absolute value; divided by it, "
        "every value lies in [-1, 1]. Then each value's code is the index of the nearest of the 16 "
        "entries of peftlab.quant.nf4.NF4_CODE (compare every value with every entry by broadcasting).",
        atol=0,
    ),
)


__all__ = ["LESSON_EXERCISES"]
