"""Every lesson's exercises in one table, in the order of the course: ``EXERCISES[name]``."""

from __future__ import annotations

from peftlab.errors import UnknownNameError, closest
from peftlab.exercises import (
    lesson00_start_here,
    lesson01_lora_from_scratch,
    lesson02_rank_and_spectra,
    lesson03_qlora_and_nf4,
    lesson04_dora,
    lesson05_loha_and_lokr,
    lesson06_oft_and_boft,
    lesson07_ia3_and_bitfit,
    lesson08_soft_prompts,
    lesson09_bottleneck_and_llama_adapter,
    lesson10_adalora,
    lesson11_many_adapters,
    lesson12_loftq,
    lesson13_method_shootout,
    lesson14_the_lab,
    lesson15_notebook_to_cluster,
    lesson16_dpo_with_an_adapter,
    lesson17_deploying_and_serving,
    lesson18_choosing_rank_alpha_lr,
    lesson19_learning_and_forgetting,
)
from peftlab.exercises.exercise import Exercise

# one module per lesson, named lessonNN_<notebook>: in name order, the course's order (the order
# of EXERCISES, and of its error message)
LESSONS = tuple(module for name, module in sorted(globals().items()) if name.startswith("lesson"))

EXERCISES: dict[str, Exercise] = {e.name: e for lesson in LESSONS for e in lesson.LESSON_EXERCISES}


def get_exercise(name: str) -> Exercise:
    """The exercise called ``name``, or an error that suggests the closest name."""
    if name not in EXERCISES:
        raise UnknownNameError(
            f"No exercise called {name!r}.{closest(name, EXERCISES)} Expected one of: {', '.join(EXERCISES)}."
        )
    return EXERCISES[name]


__all__ = ["LESSONS", "EXERCISES", "get_exercise"]
