"""The exercises of lesson 11 (notebooks/11_many_adapters.ipynb): combining LoRA adapters:
concatenated factors (peft's 'cat') and a TIES merge; serving them: a mixed batch in gather form.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _cat_inputs(g: torch.Generator) -> dict:
    n, r, d_in, d_out = (int(torch.randint(lo, hi, (1,), generator=g))
                         for lo, hi in ((2, 5), (1, 5), (4, 20), (4, 20)))
    return {"As": torch.randn(n, r, d_in, generator=g), "Bs": torch.randn(n, d_out, r, generator=g),
            "weights": torch.randn(n, generator=g), "scalings": 0.5 + torch.rand(n, generator=g)}


def _lora_cat(As: Tensor, Bs: Tensor, weights: Tensor, scalings: Tensor) -> tuple[Tensor, Tensor]:
    A = torch.cat([w * s * A_i for A_i, w, s in zip(As, weights, scalings)], dim=0)  # (n·r, d_in)
    B = torch.cat(list(Bs), dim=1)  # (d_out, n·r)
    return A, B


def _ties_inputs(g: torch.Generator) -> dict:
    n, d = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(8, 40, (1,), generator=g))
    return {"tensors": torch.randn(n, d, generator=g), "weights": 0.25 + torch.rand(n, generator=g),
            "density": (0.2, 0.5, 0.8)[int(torch.randint(0, 3, (1,), generator=g))]}


def _ties_merge(tensors: Tensor, weights: Tensor, density: float) -> Tensor:
    from peftlab.compose import merge_tensors

    return merge_tensors("ties", list(tensors), weights, density)


def _gather_inputs(g: torch.Generator) -> dict:
    n, r, d_in, d_out, batch, tokens = (int(torch.randint(lo, hi, (1,), generator=g))
                                        for lo, hi in ((2, 6), (1, 6), (4, 16), (4, 16), (2, 9), (1, 5)))
    A = torch.randn(n + 1, r, d_in, generator=g)
    B = torch.randn(n + 1, d_out, r, generator=g)
    A[0], B[0] = 0.0, 0.0  # slot 0: no adapter
    scaling = torch.cat([torch.zeros(1), 0.5 + torch.rand(n, generator=g)])
    return {"x": torch.randn(batch, tokens, d_in, generator=g), "A": A, "B": B, "scaling": scaling,
            "index": torch.randint(0, n + 1, (batch,), generator=g)}


def _gather_lora(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, index: Tensor) -> Tensor:
    from peftlab.inject.gather import Stack, gathered

    return gathered(x, Stack(A, B, scaling), index)


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "lora_cat_combine",
        "cat_combine(As, Bs, weights, scalings) -> (A_cat, B_cat), for n LoRA adapters As (n, r, d_in), "
        "Bs (n, d_out, r): A_cat stacks w_i · s_i · A_i on top of each other (n·r, d_in), B_cat puts the "
        "B_i side by side (d_out, n·r), so that B_cat A_cat = Σ_i w_i s_i B_i A_i exactly (peft's 'cat').",
        _lora_cat,
        _cat_inputs,
        "A block product: B's side by side times A's stacked is the sum of the B_i A_i. Each adapter's "
        "weight and scaling must appear once in its term, so put them on one factor only.",
    ),
    Exercise(
        "ties_merge",
        "ties_merge(tensors, weights, density) -> (d,): TIES-merge n flat tensors (n, d) with weights (n,). "
        "1) trim: in each tensor keep its int(density · d) largest |entries|, zero the rest; 2) elect: per "
        "entry, the sign of the sum of the trimmed tensors (a sum of 0 elects +); 3) disjoint mean: add "
        "weights[i] · trimmed[i] over the tensors whose entry has the elected sign, and divide by how many "
        "they are (at least 1).",
        _ties_merge,
        _ties_inputs,
        "Three passes, as the task says. Trim: per tensor, the positions of its k largest magnitudes "
        "(torch.topk on absolute values), zero elsewhere. Elect: per entry, the sign of the sum over "
        "the trimmed tensors. Mean: per entry, only the tensors whose sign matches (a trimmed 0 never "
        "matches) count, in the weighted sum and in the divisor.",
    ),
    Exercise(
        "gather_lora",
        "gather_lora(x, A, B, scaling, index) -> (batch, T, d_out): the LoRA updates of a mixed batch in "
        "gather form. x is (batch, T, d_in); A (L+1, r, d_in), B (L+1, d_out, r) and scaling (L+1,) are the "
        "stacked adapters (slot 0 all zeros: no adapter); row i uses slot index[i], so its update is "
        "scaling[a] · (x_i A[a]ᵀ) B[a]ᵀ with a = index[i]. No loop over rows or adapters.",
        _gather_lora,
        _gather_inputs,
        "Index the stacks with the index tensor: A[index] is (batch, r, d_in), one matrix per row. Then a "
        "batched matmul per factor (torch.bmm, or einsum 'btd,brd->btr' then 'btr,bor->bto'), and the "
        "scaling of each row's slot, shaped (batch, 1, 1) to broadcast.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
