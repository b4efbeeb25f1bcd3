"""The exercises of lesson 9 (notebooks/09_bottleneck_and_llama_adapter.ipynb): a Houlsby bottleneck
adapter and LLaMA-Adapter's gated prompt attention.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _houlsby_inputs(g: torch.Generator) -> dict:
    d, r = int(torch.randint(4, 24, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
    return {"h": torch.randn(3, d, generator=g), "W_down": torch.randn(r, d, generator=g),
            "b_down": torch.randn(r, generator=g), "W_up": torch.randn(d, r, generator=g),
            "b_up": torch.randn(d, generator=g), "s": float(torch.randint(1, 5, (1,), generator=g))}


def _houlsby_forward(h: Tensor, W_down: Tensor, b_down: Tensor, W_up: Tensor, b_up: Tensor, s: float) -> Tensor:
    return h + s * (torch.relu(h @ W_down.T + b_down) @ W_up.T + b_up)


def _prompt_attention_inputs(g: torch.Generator) -> dict:
    T, K, d = (int(torch.randint(2, 12, (1,), generator=g)) for _ in range(3))
    return {"q": torch.randn(T, d, generator=g), "k_p": torch.randn(K, d, generator=g),
            "v_p": torch.randn(K, d, generator=g), "gate": float(torch.randn(1, generator=g))}


def _prompt_attention(q: Tensor, k_p: Tensor, v_p: Tensor, gate: float) -> Tensor:
    return gate * torch.softmax(q @ k_p.T / math.sqrt(q.shape[-1]), dim=-1) @ v_p


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "houlsby_adapter",
        "houlsby_forward(h, W_down, b_down, W_up, b_up, s) -> h + s · up(relu(down(h))), where "
        "down(h) = h W_down^T + b_down (d -> r) and up(z) = z W_up^T + b_up (r -> d); h is (n, d).",
        _houlsby_forward,
        _houlsby_inputs,
        "Rows of h are examples, so each linear layer multiplies by its weight transposed and adds its "
        "bias. Down-project, ReLU, up-project, scale by s, and add h back (the residual).",
    ),
    Exercise(
        "gated_prompt_attention",
        "prompt_attention(q, k_p, v_p, gate) -> gate · softmax(q k_p^T / sqrt(d)) v_p: T queries "
        "(T, d) attend over K prompt keys and values (K, d) with their own softmax, scaled by gate.",
        _prompt_attention,
        _prompt_attention_inputs,
        "Score every query against every prompt key, scaled by the square root of the head size: a "
        "(T, K) matrix. The softmax runs over the K prompts; the weighted sum of the prompt values is "
        "then scaled by the gate.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
