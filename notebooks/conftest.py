"""nbval, machine-independent: stored outputs compared as a reader sees them (tests/nbcompare.py).

nbval's own comparison runs first; where it finds a difference, the cell still passes if every
output matches under the rules in ``tests/nbcompare.py`` (decimals to one unit of their last
printed digit, figures by structure and by data within 1% of each array's range). Paths are
sanitized wherever the repository and the temporary folder live.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from nbval import plugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nbcompare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The learner notebooks (tools/student.py) have blank answers and no outputs: tests/test_student.py
# checks them; nbval runs the solution versions.
collect_ignore = ["learner"]
_nbval_compare = plugin.IPyNbCell.compare_outputs
_nbval_sanitize = plugin.IPyNbCell.sanitize
# This checkout and this machine's temporary folder, wherever they are (nbval_sanitize.cfg's
# regexes cover the paths stored by the machine that recorded the notebooks).
_LOCAL_PATHS = [(re.escape(str(REPO)) + r"/", "<REPO>/"),
                (re.escape(str(Path(tempfile.gettempdir()).resolve())) + r"/[\w./-]+", "<TMPPATH>")]


_STORE_VARIABLES = ("TRACKIO_DIR", "PEFTLAB_RUNS_DIR")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Each notebook's kernel gets its own empty run store (trackio, the Lab's runs table), set
    before the kernel starts: a lesson's stored output never shows runs that other tests or
    lessons made, and nothing is written into the home directory."""
    notebook = getattr(item, "parent", None)
    if notebook is not None and getattr(notebook, "_peftlab_store", None) is None:
        notebook._peftlab_store = tempfile.mkdtemp(prefix="peftlab-runs-")
        notebook._peftlab_env = {k: os.environ.get(k) for k in _STORE_VARIABLES}
        os.environ["TRACKIO_DIR"] = os.environ["PEFTLAB_RUNS_DIR"] = notebook._peftlab_store


def pytest_runtest_teardown(item, nextitem):
    """After a notebook's last cell the process gets back the store it had (tests/conftest.py's):
    a test file that runs after a notebook in the same pytest worker finds its own store."""
    notebook = getattr(item, "parent", None)
    saved = getattr(notebook, "_peftlab_env", None)
    if saved is not None and getattr(nextitem, "parent", None) is not notebook:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _grouped(cell, outputs) -> dict[str, list]:
    """nbval's grouping: every compared key (MIME types flattened) -> its sanitized values."""
    skip = cell.parent.skip_compare
    groups = defaultdict(list)
    for output in plugin.transform_streams_for_comparison(outputs):
        for key, value in output.items():
            if key in skip:
                continue
            items = value.items() if key == "data" else [(key, value)]
            for k, v in items:
                if k not in skip:
                    groups[k].append(cell.sanitize(v))
    return groups


def _visibly_equal(cell, test, ref) -> tuple[bool, list[str]]:
    got, stored = _grouped(cell, test), _grouped(cell, ref)
    if got.keys() != stored.keys() or any(len(got[k]) != len(stored[k]) for k in stored):
        return False, []
    structure_only = nbcompare.STRUCTURE_ONLY_TAG in cell.cell.metadata.get("tags", [])
    problems = []
    for key in stored:
        for expected, value in zip(stored[key], got[key]):
            if key == nbcompare.PLOTLY:
                problems += nbcompare.figure_differences(expected, value, structure_only)
            elif isinstance(expected, str) and isinstance(value, str):
                if not nbcompare.texts_match(expected, value):
                    problems.append(f"{key} differs beyond the last printed digit")
            elif expected != value:
                problems.append(f"{key} differs")
    return not problems, problems


def compare_outputs(self, test, ref, skip_compare=None):
    if _nbval_compare(self, test, ref, skip_compare):
        return True
    same, problems = _visibly_equal(self, test, ref)
    if same:
        self.comparison_traceback = []
        return True
    self.comparison_traceback += [f"  {p}" for p in problems[:20]]
    return False


def sanitize(self, s):
    if isinstance(s, str):
        for pattern, replacement in _LOCAL_PATHS:
            s = re.sub(pattern, replacement, s)
    return _nbval_sanitize(self, s)


plugin.IPyNbCell.compare_outputs = compare_outputs
plugin.IPyNbCell.sanitize = sanitize
