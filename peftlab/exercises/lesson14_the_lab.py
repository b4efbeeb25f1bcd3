"""The exercises of lesson 14 (notebooks/14_the_lab.ipynb): LoRA's trainable total over the layers
it adapts.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch

from peftlab.exercises.exercise import Exercise


def _target_shapes_inputs(g: torch.Generator) -> dict:
    n = int(torch.randint(1, 15, (1,), generator=g))
    shapes = [tuple(int(v) for v in torch.randint(1, 1025, (2,), generator=g)) for _ in range(n)]
    return {"shapes": shapes, "r": int(torch.randint(1, 65, (1,), generator=g))}


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "lora_trainable_total",
        "lora_trainable_total(shapes, r) -> trainable numbers of LoRA rank r on every layer in shapes, "
        "a list of (d_in, d_out) pairs (one per adapted layer).",
        lambda shapes, r: sum(r * (d_in + d_out) for d_in, d_out in shapes),
        _target_shapes_inputs,
        "Each layer adds A (r x d_in) and B (d_out x r); add up over the layers.",
        atol=0,
    ),
)


__all__ = ["LESSON_EXERCISES"]
