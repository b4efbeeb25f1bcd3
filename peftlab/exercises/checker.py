"""``check(name, fn)``: run the learner's function and the reference on seeded random inputs and
print one verdict that says precisely what is wrong (shape, dtype, an exception, how far off)."""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable

import torch
from torch import Tensor

from peftlab.exercises.catalog import get_exercise
from peftlab.exercises.watch import Watch


def describe(name: str) -> str:
    """The task text of an exercise."""
    return get_exercise(name).task


def check(name: str, fn: Callable, cases: int = 5, seed: int = 0) -> bool:
    """Run ``fn`` and the reference on ``cases`` seeded random inputs; print the verdict.

    The answer must also keep to the exercise's idea: it may not call into peftlab (the checker's own
    reference included: write it yourself), nor use what the exercise excludes (``torch.kron`` where
    the point is to build the Kronecker product, a dense ΔW where the point is never to form it).
    An unwritten answer (``raise NotImplementedError()``, the learner notebooks' stub) gets a
    message, not a traceback.
    """
    exercise = get_exercise(name)
    if getattr(fn, "__module__", "") and str(fn.__module__).split(".")[0] == "peftlab":
        print(f"✗ {name}: that is peftlab's own {getattr(fn, '__qualname__', 'function')}; the exercise is to "
              f"write it yourself.\n  {exercise.task}")
        return False
    names = _names_read(fn) & set(exercise.forbid_names)
    if names:
        print(f"✗ {name}: your function reads {', '.join(sorted(names))}, the answer itself; build it from "
              f"the definition instead.\n  Hint: {exercise.hint}")
        return False
    g = torch.Generator().manual_seed(seed)
    for case in range(cases):
        inputs = exercise.make_inputs(g)
        expected = exercise.reference(**inputs)
        watch = Watch(exercise, inputs)
        try:
            with watch:
                got = fn(**inputs)
        except NotImplementedError:
            print(f"✗ {name}: not written yet. Replace `raise NotImplementedError()` with your code, run the "
                  f"cell again.\n  {exercise.task}")
            return False
        except Exception as err:  # the learner's code: report, never crash the notebook
            frame = traceback.extract_tb(err.__traceback__)[-1]
            print(f"✗ {name}: raised {type(err).__name__}: {err} (line {frame.lineno}) on case {case}: "
                  f"{_shapes(inputs)}.\n  Hint: {exercise.hint}")
            return False
        if watch.problem:
            print(f"✗ {name}: {watch.problem} (case {case}: {_shapes(inputs)}).\n  Hint: {exercise.hint}")
            return False
        problem = _compare(got, expected, exercise.atol)
        if problem:
            print(f"✗ {name}: {problem} on case {case}: {_shapes(inputs)}.\n  Hint: {exercise.hint}")
            return False
    print(f"✓ {name}: correct on {cases} random cases")
    return True


def _names_read(fn: Callable) -> set[str]:
    """Every global or attribute name ``fn``'s code (nested functions included) refers to."""
    code = getattr(fn, "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return names


def _compare(got, expected, atol: float) -> str | None:
    """What is wrong with ``got`` (shape, type, values beyond ``atol``), or None when it matches."""
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} values, got {type(got).__name__}"
        for i, (a, b) in enumerate(zip(got, expected)):
            problem = _compare(a, b, atol)
            if problem:
                return f"item {i}: {problem}"
        return None
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        diff = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
        if not math.isfinite(diff) or diff > atol:
            return f"values differ from the reference by up to {diff:.3g} (allowed {atol:g})"
        return None
    if got != expected:
        return f"got {got!r}, expected {expected!r}"
    return None


def _shapes(inputs: dict) -> str:
    """The inputs of a case, tensors by their shape: ``x=(3, 8), r=2``."""
    return ", ".join(f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v}" for k, v in inputs.items())


__all__ = ["check", "describe"]
