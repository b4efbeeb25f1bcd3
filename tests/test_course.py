"""Every lesson in notebooks/ has the course's parts: badge, goals, install cell, equation, exercise
with a checker, a compare-with-production section and a summary; the README lists every lesson.

nbval runs the lessons (make test); this file checks what running them cannot.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peftlab import exercises

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _bundled() -> list[str]:
    lines = (ROOT / "requirements" / "bundled.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _cells(path: Path) -> tuple[str, list[str]]:
    cells = json.loads(path.read_text())["cells"]
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return markdown, ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_the_course_has_its_twenty_lessons():
    assert [p.name[:2] for p in LESSONS] == [f"{i:02d}" for i in range(20)]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_has_every_part(path):
    markdown, code = _cells(path)
    assert markdown.startswith(f"# {path.name[:2]} · ")
    assert f"colab.research.google.com/github/peftlab/peftlab/blob/main/notebooks/{path.name}" in markdown
    assert "**Learning goals.**" in markdown
    assert "$" in markdown, "the equation, in LaTeX"
    assert re.search(r"(?im)^#+ .*compare with production", markdown)
    assert re.search(r"(?im)^#+ summary", markdown)
    assert any("import peftlab" in cell for cell in code)
    install = code[0]
    assert 'if "google.colab" in sys.modules' in install and "git+https://github.com/peftlab/peftlab" in install
    pip_lines = "".join(line for line in install.splitlines(keepends=True) if '"pip"' in line or line.startswith(" " * 20))
    assert not re.search(r'"torch[=<>"]', pip_lines), "the Colab cell must never reinstall torch"
    missing = [pkg for pkg in _bundled() if f'"{pkg}"' not in install]
    assert not missing, f"the Colab cell does not install {missing} (requirements/bundled.txt)"
    checked = re.findall(r'exercises\.check\("(\w+)"', "\n".join(code))
    assert checked, "at least one exercise with a checker"
    assert set(checked) <= set(exercises.EXERCISES)


def test_readme_lists_every_lesson():
    readme = (ROOT / "README.md").read_text()
    for path in LESSONS:
        assert re.search(rf"(?m)^\| {path.name[:2]} ", readme), f"{path.name} is not in the README's course table"
