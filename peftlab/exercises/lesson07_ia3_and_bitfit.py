"""The exercises of lesson 7 (notebooks/07_ia3_and_bitfit.ipynb): merging IA3's scales into the
weight, and counting BitFit's biases in BERT.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _ia3_inputs(g: torch.Generator) -> dict:
    d_in, d_out = (int(torch.randint(2, 12, (1,), generator=g)) for _ in range(2))
    feedforward = bool(torch.randint(0, 2, (1,), generator=g))
    return {"W": torch.randn(d_out, d_in, generator=g), "b": torch.randn(d_out, generator=g),
            "l": 1 + 0.3 * torch.randn(d_in if feedforward else d_out, generator=g), "feedforward": feedforward}


def _ia3_merged_weight(W: Tensor, b: Tensor, l: Tensor, feedforward: bool) -> tuple[Tensor, Tensor]:
    if feedforward:  # h = W (l ⊙ x) + b: l scales W's columns, the bias stays
        return W * l, b
    return l[:, None] * W, l * b  # h = l ⊙ (W x + b): l scales W's rows and the bias


def _bert_size_inputs(g: torch.Generator) -> dict:
    return {"n_layers": int(torch.randint(1, 25, (1,), generator=g)),
            "d": 32 * int(torch.randint(1, 33, (1,), generator=g)),
            "d_ff": 128 * int(torch.randint(1, 33, (1,), generator=g))}


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "ia3_merge",
        "ia3_merged_weight(W, b, l, feedforward) -> (W', b') with W' x + b' equal to the IA3 layer: "
        "l ⊙ (W x + b) when feedforward is False (l has d_out entries), W (l ⊙ x) + b when True "
        "(l has d_in entries). W is (d_out, d_in).",
        _ia3_merged_weight,
        _ia3_inputs,
        "An output scale multiplies whole output units: W's rows, and the bias too. An input scale "
        "multiplies input features, W's columns; the bias is added after W and never sees the input.",
    ),
    Exercise(
        "bitfit_bert_count",
        "bert_bitfit_count(n_layers, d, d_ff) -> how many numbers BitFit trains in a BERT encoder: the "
        "biases of query, key, value, attention output (d each), intermediate (d_ff) and output (d) "
        "and of the two LayerNorms (d each) in every layer, plus the embedding LayerNorm's and the "
        "pooler's biases (d each). The classifier head is not counted.",
        lambda n_layers, d, d_ff: n_layers * (7 * d + d_ff) + 2 * d,
        _bert_size_inputs,
        "Walk through one encoder layer and list every bias vector with its size: the attention's "
        "projections and output, the feed-forward's two linear layers (one widens to d_ff, one narrows "
        "back), the LayerNorms. Then the ones outside the layers the task names.",
        atol=0,
    ),
)


__all__ = ["LESSON_EXERCISES"]
