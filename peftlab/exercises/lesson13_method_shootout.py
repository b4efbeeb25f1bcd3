"""The exercises of lesson 13 (notebooks/13_method_shootout.ipynb): the trainable numbers one
adapted layer gets, method by method.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch

from peftlab.exercises.exercise import Exercise


_COUNT_METHODS = ("lora", "dora", "loha", "vera")


def _per_layer_inputs(g: torch.Generator) -> dict:
    return {"method": _COUNT_METHODS[int(torch.randint(0, len(_COUNT_METHODS), (1,), generator=g))],
            "d_in": int(torch.randint(1, 4096, (1,), generator=g)),
            "d_out": int(torch.randint(1, 4096, (1,), generator=g)),
            "r": int(torch.randint(1, 65, (1,), generator=g))}


def _per_layer_count(method: str, d_in: int, d_out: int, r: int) -> int:
    from peftlab.methods import get_method

    spec = get_method(method)
    return spec.params_per_layer(d_in, d_out, spec.config(r=r))


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "per_layer_count",
        "per_layer_count(method, d_in, d_out, r) -> trainable numbers one adapted (d_out x d_in) layer "
        "gets, for method in 'lora' (A, B), 'dora' (LoRA + one magnitude per output), 'loha' (two LoRA "
        "pairs, multiplied elementwise) and 'vera' (frozen shared random A, B; trains d and b vectors).",
        _per_layer_count,
        _per_layer_inputs,
        "Count the shapes of what each method trains. LoRA: A reads d_in features into r, B writes r "
        "into d_out. DoRA adds one magnitude per output unit. LoHa has two LoRA pairs. VeRA freezes "
        "and shares A and B and trains one scale per row of A and one per output.",
        atol=0,
    ),
)


__all__ = ["LESSON_EXERCISES"]
