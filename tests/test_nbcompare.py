"""The rules nbval compares stored notebook outputs by (tests/nbcompare.py), on hand-made cases."""

from __future__ import annotations

import base64

import numpy as np

from nbcompare import figure_differences, texts_match


def test_text_around_numbers_and_integers_must_be_equal():
    assert texts_match("trainable params: 2,442,240", "trainable params: 2,442,240")
    assert not texts_match("trainable params: 2,442,240", "trainable params: 2,442,241")
    assert not texts_match("210 adapted layers", "211 adapted layers")
    assert not texts_match("the loss fell: True", "the loss fell: False")
    assert not texts_match("error 0.094", "error 0.094 more")


def test_decimals_may_differ_by_one_unit_of_their_last_digit():
    assert texts_match("relative error 0.094", "relative error 0.095")
    assert texts_match("9.4%   12.7%", "9.5%   12.6%")
    assert texts_match("max |d| = 1.6e-05", "max |d| = 1.7e-05")
    assert texts_match("NF4 : -1.000 +0.000", "NF4 : -1.000 -0.000")
    assert not texts_match("relative error 0.094", "relative error 0.096")
    assert not texts_match("losses: [3.5, 2.72, 2.27, 2.64]", "losses: [3.5, 2.72, 2.26, 2.71]")
    assert not texts_match("max |d| = 1.6e-05", "max |d| = 1.6e-04")


def _typed(values, dtype="f8"):
    return {"dtype": dtype, "bdata": base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()}


def _figure(y, name="loss", title="Loss"):
    return {"data": [{"type": "scatter", "mode": "lines", "name": name, "uid": "abc",
                      "x": _typed([1, 2, 3, 4], "i4"), "y": _typed(y)}],
            "layout": {"title": {"text": title}, "yaxis": {"range": [0.0, 4.0]}}}


def test_figures_match_within_what_a_reader_can_see():
    stored = _figure([3.88, 3.14, 2.94, 1.58])
    assert figure_differences(stored, _figure([3.88, 3.14, 2.94, 1.58])) == []
    assert figure_differences(stored, _figure([3.8801, 3.1399, 2.94, 1.5802])) == []  # rounding
    assert figure_differences(stored, _figure([3.88, 3.14, 2.64, 1.58]))  # a visible move
    assert figure_differences(stored, _figure([3.88, 3.14, 2.94]))  # a point fewer
    assert figure_differences(stored, _figure([3.88, 3.14, 2.94, 1.58], name="held-out"))
    assert figure_differences(stored, _figure([3.88, 3.14, 2.94, 1.58], title="Accuracy"))


def test_structure_only_ignores_values_but_not_shape_or_labels():
    stored = _figure([3.88, 3.14, 2.94, 1.58])
    moved = _figure([3.5, 2.7, 2.2, 2.6])
    assert figure_differences(stored, moved, structure_only=True) == []
    assert figure_differences(stored, moved)
    assert figure_differences(stored, _figure([3.5, 2.7, 2.2]), structure_only=True)
    assert figure_differences(stored, _figure([3.5, 2.7, 2.2, 2.6], name="other"), structure_only=True)
