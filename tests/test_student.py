"""The learner notebooks (``make student``, tools/student.py): up to date, free of answers, and their
unsolved checker cells fail with a message, not a traceback; the solutions still pass.

Each exercise cell is run on its own, with the imports the lessons make before it, so this takes
seconds where running the lessons takes minutes.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import student  # noqa: E402

LESSONS = student.lessons()
PREAMBLE = """
import math
import torch
import torch.nn.functional as F
from torch import nn
import peftlab
from peftlab import exercises
from peftlab.quant import nf4
from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4
"""


def _exercise_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and "exercises.check(" in c.source]


def _run(source: str) -> str:
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(PREAMBLE, namespace)
        exec(compile(source, "<cell>", "exec"), namespace)  # an exception here fails the test
    return out.getvalue()


def test_the_learner_notebooks_are_up_to_date():
    assert student.main(["--check"]) == 0, "run `make student` and commit notebooks/learner"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_a_learner_notebook_holds_no_answer_and_no_output(path):
    solution = nbformat.read(path, 4)
    learner = nbformat.read(student.TARGET / path.name, 4)
    text = "\n".join(c.source for c in learner.cells)
    assert student.BEGIN not in text and student.END not in text
    assert all(not c.get("outputs") for c in learner.cells if c.cell_type == "code")
    regions = re.findall(rf"{re.escape(student.BEGIN)}\n(.*?)\n\s*{re.escape(student.END)}",
                         "\n".join(c.source for c in solution.cells), flags=re.S)
    assert regions, f"{path.name} has no marked answer"
    for region in regions:
        for line in region.split("\n"):
            if len(line.strip()) > 12:  # a line of the answer, not a bare `return x`
                assert line.strip() not in text, f"{path.name}: the learner version still holds {line.strip()!r}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_unsolved_checkers_answer_with_a_message_and_the_solutions_pass(path):
    solution = _exercise_cells(nbformat.read(path, 4))
    learner = _exercise_cells(nbformat.read(student.TARGET / path.name, 4))
    assert len(solution) == len(learner) >= 1
    for answered, blank in zip(solution, learner):
        name = re.search(r'exercises\.check\("(\w+)"', answered.source).group(1)
        assert f"✓ {name}: correct" in _run(answered.source)
        verdict = _run(blank.source)
        assert f"✗ {name}: not written yet" in verdict, verdict
        assert "Traceback" not in verdict


def test_clear_regions_keeps_the_indent_and_refuses_broken_markers():
    source = "def f(x):\n    # the idea\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\nf(1)"
    cleared, regions = student.clear_regions(source, student.CODE_STUB)
    assert regions == 1
    assert cleared == "def f(x):\n    # the idea\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nf(1)"
    with pytest.raises(ValueError, match="without its"):
        student.clear_regions("### BEGIN SOLUTION\nx = 1", student.CODE_STUB)
    with pytest.raises(ValueError, match="inside another"):
        student.clear_regions("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", student.CODE_STUB)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_every_lesson_has_an_open_exercise_whose_blank_prediction_is_answered_softly(path):
    learner = nbformat.read(student.TARGET / path.name, 4).cells
    verdicts = [i for i, c in enumerate(learner) if c.cell_type == "code" and "exercises.predicted(" in c.source]
    assert verdicts, f"{path.name}: no predict-then-measure exercise (exercises.predicted)"
    for i in verdicts:
        blank = learner[i - 1].source
        assert "prediction = None" in blank and "NotImplementedError" not in blank, blank
        namespace: dict = {}
        exec(compile(blank, "<prediction cell>", "exec"), namespace)  # the stub runs and leaves None
        assert namespace["prediction"] is None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from peftlab import exercises

        assert not exercises.predicted("anything", None, 1.0)
    assert "no prediction yet" in out.getvalue()
