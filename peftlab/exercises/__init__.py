"""Exercises with checkers, for the course notebooks.

A learner writes a function; ``check(name, their_function)`` runs it and the reference on several
seeded random inputs and says precisely what is wrong: the wrong shape, the wrong dtype, an
exception, or how far the values are off and for which input. Nothing is printed but the verdict.

    from peftlab import exercises

    def lora_forward(x, W, A, B, alpha, r):
        return x @ W.T + (alpha / r) * (x @ A.T) @ B.T

    exercises.check("lora_forward", lora_forward)   # -> "✓ lora_forward: correct on 5 random cases"

One module per lesson holds that lesson's exercises (``lesson01_lora_from_scratch.py``, ...);
``catalog.py`` collects them into :data:`EXERCISES`, ``checker.py`` runs them (``watch.py``
catches an answer that skips the exercise's idea) and ``predict.py`` judges predictions.
"""

from __future__ import annotations

from peftlab.exercises.catalog import EXERCISES
from peftlab.exercises.checker import check, describe
from peftlab.exercises.exercise import Exercise
from peftlab.exercises.predict import predicted

__all__ = ["EXERCISES", "Exercise", "check", "describe", "predicted"]
