"""The exercises of lesson 0 (notebooks/00_start_here.ipynb): what the parameters of a training run
cost in memory (fp32 with AdamW).

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch

from peftlab.exercises.exercise import Exercise


def _training_bytes_inputs(g: torch.Generator) -> dict:
    n_params = int(torch.randint(1, 10**9, (1,), generator=g))
    return {"n_params": n_params, "n_trainable": int(torch.randint(0, n_params + 1, (1,), generator=g))}


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "adamw_training_bytes",
        "adamw_training_bytes(n_params, n_trainable) -> bytes that fp32 training with AdamW keeps for the "
        "parameters: every weight, plus a gradient and AdamW's two moments for each trainable one "
        "(activations not counted).",
        lambda n_params, n_trainable: 4 * n_params + 12 * n_trainable,
        _training_bytes_inputs,
        "fp32 is 4 bytes a number. Frozen weights need only themselves; a trainable weight also has a "
        "gradient and two moments (exp_avg, exp_avg_sq): 4 numbers in all.",
        atol=0,
    ),
)


__all__ = ["LESSON_EXERCISES"]
