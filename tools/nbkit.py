"""The cells of a lesson builder (tools/build_lesson*.py): markdown, code, exercises and predictions.

    cells = Cells()
    cells.md("# 19 · ...")
    cells.code("print(1)", tags=("nbval-ignore-output",))
    cells.code(answer, solution="ex-name")                   # nbgrader's solution-cell metadata
    cells.code(guess, solution="predict-name", stub="# YOUR PREDICTION HERE (replace None above)")
"""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell


class Cells(list):
    """A notebook's cells in order, as ``nbformat`` cells."""

    def md(self, text: str) -> None:
        self.append(new_markdown_cell(text.strip()))

    def code(self, text: str, tags: tuple[str, ...] = (), solution: str | None = None, stub: str | None = None) -> None:
        cell = new_code_cell(text.strip())
        if tags:
            cell.metadata["tags"] = list(tags)
        if solution:  # an exercise: nbgrader's solution-cell metadata (tools/student.py blanks the answer)
            cell.metadata["nbgrader"] = {"grade": False, "grade_id": solution, "locked": False,
                                         "schema_version": 3, "solution": True}
        if stub:  # what the learner version holds instead of the answer
            cell.metadata["peftlab"] = {"stub": stub}
        self.append(cell)
