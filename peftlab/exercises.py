"""Exercises with checkers, for the course notebooks.

A learner writes a function; ``check(name, their_function)`` runs it and the reference on several
seeded random inputs and says precisely what is wrong: the wrong shape, the wrong dtype, an
exception, or how far the values are off and for which input. Nothing is printed but the verdict.

    from peftlab import exercises

    def lora_forward(x, W, A, B, alpha, r):
        return x @ W.T + (alpha / r) * (x @ A.T) @ B.T

    exercises.check("lora_forward", lora_forward)   # -> "✓ lora_forward: correct on 5 random cases"
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from peftlab.errors import UnknownNameError, closest


@dataclass(frozen=True)
class Exercise:
    name: str
    task: str  # what the learner must write, shown by describe()
    reference: Callable
    make_inputs: Callable[[torch.Generator], dict]  # seeded random arguments
    hint: str  # shown when the answer is wrong
    atol: float = 1e-5


def _lora_inputs(g: torch.Generator) -> dict:
    d_in, d_out, r = (int(torch.randint(4, 24, (1,), generator=g)) for _ in range(3))
    r = max(1, min(r, d_in, d_out))
    return {
        "x": torch.randn(3, d_in, generator=g),
        "W": torch.randn(d_out, d_in, generator=g),
        "A": torch.randn(r, d_in, generator=g),
        "B": torch.randn(d_out, r, generator=g),
        "alpha": float(torch.randint(1, 32, (1,), generator=g)),
        "r": r,
    }


def _lora_forward(x: Tensor, W: Tensor, A: Tensor, B: Tensor, alpha: float, r: int) -> Tensor:
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T


def _lora_delta(x: Tensor, W: Tensor, A: Tensor, B: Tensor, alpha: float, r: int) -> Tensor:
    return (alpha / r) * B @ A


def _count_inputs(g: torch.Generator) -> dict:
    return {k: int(torch.randint(1, 4096, (1,), generator=g)) for k in ("d_in", "d_out")} | {
        "r": int(torch.randint(1, 65, (1,), generator=g))
    }


def _absmax_inputs(g: torch.Generator) -> dict:
    return {"w": torch.randn(int(torch.randint(1, 5, (1,), generator=g)) * 64, generator=g), "blocksize": 64}


def _absmax_quantize(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    from peftlab.quant.nf4 import NF4_CODE

    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax[:, None]
    codes = (scaled[..., None] - NF4_CODE).abs().argmin(dim=-1)
    return codes.reshape(-1).to(torch.uint8), absmax


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in [
        Exercise(
            "lora_forward",
            "lora_forward(x, W, A, B, alpha, r) -> h = x W^T + (alpha / r) (x A^T) B^T, for x of shape (n, d_in).",
            _lora_forward,
            _lora_inputs,
            "Rows of x are examples, so the base output is x @ W.T; the update goes through A first "
            "(d_in -> r), then B (r -> d_out), scaled by alpha / r.",
        ),
        Exercise(
            "lora_delta_weight",
            "lora_delta_weight(x, W, A, B, alpha, r) -> ΔW = (alpha / r) B A, shape (d_out, d_in).",
            _lora_delta,
            _lora_inputs,
            "ΔW has W's shape (d_out, d_in): B is (d_out, r) and A is (r, d_in).",
        ),
        Exercise(
            "lora_param_count",
            "lora_param_count(d_in, d_out, r) -> the number of trainable numbers LoRA adds to one layer.",
            lambda d_in, d_out, r: r * (d_in + d_out),
            _count_inputs,
            "A is r x d_in and B is d_out x r.",
            atol=0,
        ),
        Exercise(
            "nf4_absmax_quantize",
            "nf4_absmax_quantize(w, blocksize) -> (codes uint8 of len(w), absmax per block): scale each block "
            "by its largest |value|, then pick the nearest of the 16 NF4 code values.",
            _absmax_quantize,
            _absmax_inputs,
            "Reshape to (-1, blocksize), divide by each block's max |w|, then argmin |scaled - NF4_CODE| "
            "over the 16 codes (peftlab.quant.nf4.NF4_CODE).",
            atol=0,
        ),
    ]
}


def describe(name: str) -> str:
    """The task text of an exercise."""
    return _get(name).task


def check(name: str, fn: Callable, cases: int = 5, seed: int = 0) -> bool:
    """Compare ``fn`` with the reference on ``cases`` seeded random inputs; print the verdict."""
    exercise = _get(name)
    g = torch.Generator().manual_seed(seed)
    for case in range(cases):
        inputs = exercise.make_inputs(g)
        expected = exercise.reference(**inputs)
        try:
            got = fn(**inputs)
        except Exception as err:  # the learner's code: report, never crash the notebook
            frame = traceback.extract_tb(err.__traceback__)[-1]
            print(f"✗ {name}: raised {type(err).__name__}: {err} (line {frame.lineno}) on case {case}: "
                  f"{_shapes(inputs)}.\n  Hint: {exercise.hint}")
            return False
        problem = _compare(got, expected, exercise.atol)
        if problem:
            print(f"✗ {name}: {problem} on case {case}: {_shapes(inputs)}.\n  Hint: {exercise.hint}")
            return False
    print(f"✓ {name}: correct on {cases} random cases")
    return True


def _compare(got, expected, atol: float) -> str | None:
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
    return ", ".join(f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v}" for k, v in inputs.items())


def _get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise UnknownNameError(
            f"No exercise called {name!r}.{closest(name, EXERCISES)} Expected one of: {', '.join(EXERCISES)}."
        )
    return EXERCISES[name]
