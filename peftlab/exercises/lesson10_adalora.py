"""The exercises of lesson 10 (notebooks/10_adalora.ipynb): AdaLoRA's rank budget schedule and its
importance EMAs.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _budget_inputs(g: torch.Generator) -> dict:
    total = int(torch.randint(10, 200, (1,), generator=g))
    tinit, tfinal = (int(torch.randint(0, total // 4, (1,), generator=g)) for _ in range(2))
    init_r = int(torch.randint(2, 17, (1,), generator=g))
    return {"step": int(torch.randint(0, total + 1, (1,), generator=g)), "init_r": init_r,
            "target_r": int(torch.randint(1, init_r + 1, (1,), generator=g)),
            "n_layers": int(torch.randint(1, 60, (1,), generator=g)),
            "tinit": tinit, "tfinal": tfinal, "total_step": total}


def _adalora_budget(step: int, init_r: int, target_r: int, n_layers: int, tinit: int, tfinal: int,
                    total_step: int) -> int:
    from peftlab.methods.adalora import AdaLoRAConfig, RankAllocator

    config = AdaLoRAConfig(total_step=total_step, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal)
    return RankAllocator(config, [f"layer{k}" for k in range(n_layers)]).budget(step)[0]


def _importance_inputs(g: torch.Generator) -> dict:
    shape = tuple(int(v) for v in torch.randint(1, 9, (2,), generator=g))
    return {"w": torch.randn(shape, generator=g), "grad": torch.randn(shape, generator=g),
            "ibar": torch.rand(shape, generator=g), "ubar": torch.rand(shape, generator=g),
            "beta1": 0.85, "beta2": float(torch.rand(1, generator=g)) * 0.9 + 0.05}


def _adalora_importance(w: Tensor, grad: Tensor, ibar: Tensor, ubar: Tensor, beta1: float,
                        beta2: float) -> tuple[Tensor, Tensor]:
    now = (w * grad).abs()  # I = |w · ∂L/∂w|
    ibar = beta1 * ibar + (1 - beta1) * now
    return ibar, beta2 * ubar + (1 - beta2) * (now - ibar).abs()  # Ū uses the new Ī, as peft does


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "adalora_budget",
        "adalora_budget(step, init_r, target_r, n_layers, tinit, tfinal, total_step) -> the total rank b(t) "
        "AdaLoRA allows at this step: init_r · n_layers up to tinit, then a cubic fall to target_r · n_layers "
        "at total_step - tfinal, then target_r · n_layers (an int, rounded down).",
        _adalora_budget,
        _budget_inputs,
        "Three phases: the full budget up to and including tinit, the target budget after "
        "total_step - tfinal, and in between the excess over the target shrinks with the cube of the "
        "share of the middle phase still to go. Budgets are ranks times layers; round down at the end.",
        atol=0,
    ),
    Exercise(
        "adalora_importance",
        "adalora_importance(w, grad, ibar, ubar, beta1, beta2) -> (new Ī, new Ū): the sensitivity "
        "I = |w · grad|, its EMA Ī with beta1, and the EMA Ū of |I - Ī| with beta2 (using the new Ī).",
        _adalora_importance,
        _importance_inputs,
        "Both are exponential moving averages (new = beta · old + (1 - beta) · value). Order matters: "
        "update Ī first, and measure the deviation of the sensitivity from that updated Ī.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
