"""One exercise: what the learner writes, the reference answer, seeded inputs, a hint, and what
the answer may not use (checked by :func:`peftlab.exercises.check`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Exercise:
    """An exercise and its checker's settings; ``reference(**make_inputs(g))`` is the right answer."""

    name: str
    task: str  # what the learner must write, shown by describe()
    reference: Callable
    make_inputs: Callable[[torch.Generator], dict]  # seeded random arguments
    hint: str  # shown when the answer is wrong: a direction, never the answer's code
    atol: float = 1e-5
    forbid_ops: tuple[str, ...] = ()  # torch functions the idea excludes, by name ("kron")
    forbid_names: tuple[str, ...] = ()  # names the answer may not read (peftlab's own constants)
    dense: Callable[[dict], tuple[int, int, int]] | None = None  # (d_out, d_in, r): no d_out x d_in
    # matrix may be built from the factors, and no SVD of anything larger than r x r


__all__ = ["Exercise"]
