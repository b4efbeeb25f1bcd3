"""Stored notebook outputs compared the way a reader sees them, on any machine.

nbval compares a cell's stored outputs with a fresh run as exact strings (after the regex
sanitizers in ``nbval_sanitize.cfg``) and plotly figures as whole JSON values, float bytes
included. Float results are rounded differently on another CPU (AVX-512 or AVX2, x86 or ARM, one
thread or many: each picks other matmul kernels and summation orders), so a number printed to its
last digit, or a figure's float64 data, could only be reproduced on the machine that recorded it.
``notebooks/conftest.py`` puts these two rules in front of nbval's own comparison:

- **Text**: the text around numbers must be equal; an integer must be equal; a number with a
  fractional part (``0.094``, ``9.4%``, ``1.6e-05``) may differ by one unit of its last printed
  digit, the most that rounding a value a hair away can change it. A training loss that moved
  (2.64 vs 2.71) still fails: such numbers belong in a cell whose output is not compared
  (tag ``nbval-ignore-output``) and which asserts what must hold instead.
- **Figures** (``application/vnd.plotly.v1+json``): the structure must be equal (trace types,
  names, modes, every key, array shapes, titles and labels); numeric data may differ by 1% of the
  array's range, less than a reader can see on a plot. A cell tagged ``nbval-figure-structure``
  (a figure of a training run) compares the structure only.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

import numpy as np

PLOTLY = "application/vnd.plotly.v1+json"
STRUCTURE_ONLY_TAG = "nbval-figure-structure"
VISIBLE = 0.01  # of an array's range: a difference a reader cannot see on a plot

# A number with a fractional part or an exponent; integers (counts, shapes) are left in the text.
_DECIMAL = re.compile(r"(?<![\w.])([-+]?\d+\.\d+(?:[eE][-+]?\d+)?|[-+]?\d+[eE][-+]?\d+)(?![\w.])")


def _last_digit_unit(number: str) -> float:
    """One unit of the last printed digit: 0.001 for '0.094', 1e-06 for '1.6e-05'."""
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def texts_match(expected: str, got: str) -> bool:
    """Equal text, equal integers, decimals within one unit of their last printed digit."""
    if expected == got:
        return True
    a, b = _DECIMAL.split(expected), _DECIMAL.split(got)
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b)):
        if i % 2 == 0:  # the text between numbers
            if x != y:
                return False
        elif abs(float(x) - float(y)) > 1.0001 * max(_last_digit_unit(x), _last_digit_unit(y)):
            return False
    return True


def _decode(value: Any) -> Any:
    """plotly's typed arrays ({'dtype': 'f8', 'bdata': base64, 'shape': ...}) -> numpy arrays."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            shape = value["shape"]
            array = array.reshape([int(n) for n in str(shape).split(",")] if isinstance(shape, str) else shape)
        return array
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return np.asarray(value, dtype=float)
    return value


def figure_differences(expected: Any, got: Any, structure_only: bool = False, path: str = "") -> list[str]:
    """Where two plotly figure dicts differ more than a reader could see (empty: they match)."""
    expected, got = _decode(expected), _decode(got)
    if isinstance(expected, np.ndarray) or isinstance(got, np.ndarray):
        if not (isinstance(expected, np.ndarray) and isinstance(got, np.ndarray)):
            return [f"{path}: an array and a {type(got if isinstance(expected, np.ndarray) else expected).__name__}"]
        if expected.shape != got.shape:
            return [f"{path}: shape {expected.shape} stored, {got.shape} now"]
        if structure_only or expected.size == 0 or expected.dtype.kind not in "fiu":
            return [] if structure_only or np.array_equal(expected, got) else [f"{path}: values differ"]
        ref = expected.astype(float)
        finite = ref[np.isfinite(ref)]
        span = float(finite.max() - finite.min()) if finite.size else 0.0
        scale = max(span, float(np.abs(finite).max()) if finite.size else 0.0, 1e-12)
        same_gaps = np.array_equal(np.isfinite(ref), np.isfinite(got.astype(float)))
        worst = float(np.nanmax(np.abs(ref - got))) if same_gaps and finite.size else 0.0
        if not same_gaps or worst > VISIBLE * (span if span > 0 else scale):
            return [f"{path}: values differ by up to {worst:.3g} (a reader sees {VISIBLE * scale:.3g})"]
        return []
    if isinstance(expected, dict) and isinstance(got, dict):
        if expected.keys() != got.keys():
            return [f"{path}: keys {sorted(expected.keys() ^ got.keys())} in one only"]
        return [d for key in expected if key != "uid"
                for d in figure_differences(expected[key], got[key], structure_only, f"{path}.{key}")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(expected)} items stored, {len(got)} now"]
        return [d for i, (x, y) in enumerate(zip(expected, got))
                for d in figure_differences(x, y, structure_only, f"{path}[{i}]")]
    if isinstance(expected, float) or isinstance(got, float):
        if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
            if structure_only or math.isclose(expected, got, rel_tol=VISIBLE, abs_tol=1e-12):
                return []
        return [f"{path}: {expected!r} stored, {got!r} now"]
    if isinstance(expected, str) and isinstance(got, str):
        if structure_only:
            expected, got = _DECIMAL.sub("<n>", expected), _DECIMAL.sub("<n>", got)
        return [] if texts_match(expected, got) else [f"{path}: {expected!r} stored, {got!r} now"]
    return [] if expected == got else [f"{path}: {expected!r} stored, {got!r} now"]
