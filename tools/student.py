"""Learner notebooks: the course with its answers blanked, the way nbgrader's ClearSolutions does it.

    python tools/student.py            # notebooks/NN_*.ipynb -> notebooks/learner/NN_*.ipynb (make student)
    python tools/student.py --check    # exit 1, naming the files, if notebooks/learner is out of date

In the course notebooks (the solution versions, which nbval tests) every answer sits between
nbgrader's delimiters, in a cell marked as a solution cell (``metadata.nbgrader.solution``):

    def lora_forward(x, W, A, B, alpha, r):
        ### BEGIN SOLUTION
        return x @ W.T + (alpha / r) * (x @ A.T) @ B.T
        ### END SOLUTION

The learner version replaces each region with nbgrader's stub, indented like the delimiter
(``# YOUR CODE HERE`` / ``raise NotImplementedError()`` in code, ``YOUR ANSWER HERE`` in text), or
with the cell's own stub where ``metadata.peftlab.stub`` gives one (a prediction: ``prediction =
None``). Outputs and execution counts are cleared, the Colab badge points at the learner file, and
paths to files beside the lessons (``study/``) are made relative to ``notebooks/learner/``.
Checkers (``peftlab.exercises.check``) answer an unsolved stub with a message, not a traceback.
nbgrader itself can use the same notebooks: the delimiters and the cell metadata are its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks"
TARGET = SOURCE / "learner"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
TEXT_STUB = "YOUR ANSWER HERE"
NOTE = ("> **Learner version.** The answers of this lesson's exercises are blank: write them where it "
        "says `YOUR CODE HERE` (or `YOUR ANSWER HERE`) and run the checker cell below each one. The "
        "solution version, with every output, is [`../{name}`](../{name}).")
_SIBLING_PATHS = ('"study/',)  # files the lessons read beside them; learner notebooks sit one folder down


def clear_regions(source: str, stub: str) -> tuple[str, int]:
    """``source`` with every solution region replaced by ``stub`` (indented as its BEGIN line)."""
    out, regions, inside = [], 0, False
    for line in source.split("\n"):
        if line.strip() == BEGIN:
            if inside:
                raise ValueError(f"a {BEGIN!r} inside another solution region")
            inside, regions = True, regions + 1
            indent = line[: line.index(BEGIN)]
            out.extend(indent + stub_line for stub_line in stub.split("\n"))
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"an {END!r} without its {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"a {BEGIN!r} without its {END!r}")
    return "\n".join(out), regions


def learner_version(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """A copy of a course notebook with its answers blanked and its outputs cleared."""
    nb = nbformat.from_dict(nb)
    for index, cell in enumerate(nb.cells):
        stub = cell.metadata.get("peftlab", {}).get("stub") or (CODE_STUB if cell.cell_type == "code" else TEXT_STUB)
        cell.source, regions = clear_regions(cell.source, stub)
        if regions and not cell.metadata.get("nbgrader", {}).get("solution"):
            raise ValueError(f"{name}, cell {index}: a solution region in a cell not marked as a solution cell "
                             "(metadata.nbgrader.solution); nbgrader would refuse it")
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            for path in _SIBLING_PATHS:
                cell.source = cell.source.replace(path, path[0] + "../" + path[1:])
        elif index == 0:
            cell.source = cell.source.replace(f"/notebooks/{name}", f"/notebooks/learner/{name}")
    note = nbformat.v4.new_markdown_cell(NOTE.format(name=name))
    note.id = "learner-note"
    nb.cells.insert(1, note)
    nb.metadata.pop("widgets", None)
    return nb


def lessons() -> list[Path]:
    return sorted(SOURCE.glob("[0-9][0-9]_*.ipynb"))


def build() -> dict[str, str]:
    """Every learner notebook's file name and text."""
    return {path.name: nbformat.writes(learner_version(nbformat.read(path, 4), path.name)) + "\n"
            for path in lessons()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether notebooks/learner is up to date")
    args = parser.parse_args(argv)
    built = build()
    stale = [name for name, text in built.items()
             if not (TARGET / name).exists() or (TARGET / name).read_text(encoding="utf-8") != text]
    extra = sorted(p.name for p in TARGET.glob("*.ipynb") if p.name not in built) if TARGET.exists() else []
    if args.check:
        if stale or extra:
            print("notebooks/learner is out of date (run `make student`):", ", ".join(stale + extra))
            return 1
        print(f"notebooks/learner: {len(built)} learner notebooks, up to date")
        return 0
    TARGET.mkdir(exist_ok=True)
    for name in extra:
        (TARGET / name).unlink()
    for name in stale:
        (TARGET / name).write_text(built[name], encoding="utf-8")
    print(f"notebooks/learner: wrote {len(stale)} of {len(built)} learner notebooks"
          + (f", removed {', '.join(extra)}" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
