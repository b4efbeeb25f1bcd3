"""A user's file: ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` rows into a Dataset.

The columns say the task: ``text`` and ``label`` (classification), ``question`` and ``answer``
(instruction tuning), or ``text`` alone (language modelling). Every row is checked, and string
labels become class ids (sorted names, so the same file always gives the same ids).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

from peftlab.data.splits import to_dataset
from peftlab.errors import DataError


def _read_csv(path: Path, delimiter: str = ",") -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
        return [dict(r) for r in csv.DictReader(f, delimiter=delimiter)]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}, line {number} is not valid JSON ({exc.msg}). Expected one JSON "
                        'object per line, e.g. {"text": "great film", "label": "positive"}.'
                    ) from None
    return rows


def _read_json(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8") or "[]")
    return data if isinstance(data, list) else data.get("data", [])


# file suffix -> reader of its rows (load_dataset treats a name with one of these suffixes as a file)
READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".csv": _read_csv, ".tsv": lambda p: _read_csv(p, "\t"), ".jsonl": _read_jsonl,
    ".json": _read_json,
}


# what the error messages say a file (or a hub dataset) must hold
EXPECTED_COLUMNS = ("columns 'text' and 'label' (classification), 'question' and 'answer' "
             "(instruction tuning), or 'text' alone (language modelling)")


def read_file(path: Path, columns: dict[str, str] | None):
    """The rows of a user's file as a Dataset, columns renamed by ``columns`` and checked."""
    if not path.is_file():
        raise DataError(f"No file at {str(path)!r}. Expected a .csv, .tsv, .jsonl or .json file.")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path.name}: unknown file type {path.suffix!r}. Expected one of "
                        f"{', '.join(READERS)}.")
    rows = reader(path)
    if not rows:
        raise DataError(f"{path} holds no rows. Expected a header line and at least two rows "
                        f"with {EXPECTED_COLUMNS}.")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every row must be an object with named fields; expected {EXPECTED_COLUMNS}.")
    columns = columns or {}
    rows = [{columns.get(k, k): v for k, v in r.items()} for r in rows]
    found = set(rows[0])
    if {"question", "answer"} <= found:
        keep = ["question", "answer"]
    elif {"text", "label"} <= found:
        keep = ["text", "label"]
    elif "text" in found:
        keep = ["text"]
    else:
        raise DataError(
            f"{path.name} has columns {sorted(found)}; expected {EXPECTED_COLUMNS}. Rename them in the "
            "file or pass columns={'your_column': 'text', ...}."
        )
    return _rows_to_dataset(rows, keep, where=path.name)


def _rows_to_dataset(rows: list[dict], keep: list[str], where: str):
    """Check every row, turn string labels into class ids, build the Dataset."""
    for number, row in enumerate(rows, start=1):
        for col in keep:
            value = row.get(col)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{where}: row {number} has no {col!r}. Every row needs "
                                f"{', '.join(repr(k) for k in keep)}; fill it in or remove the row.")
    label_names = None
    if "label" in keep:
        label_names, ids = _label_ids([row["label"] for row in rows], where)
        rows = [dict(row, label=i) for row, i in zip(rows, ids)]
    rows = [{col: (row[col] if col == "label" else str(row[col])) for col in keep} for row in rows]
    return to_dataset(rows, label_names)


def _label_ids(labels: list, where: str) -> tuple[list[str], list[int]]:
    """Integer labels 0..K-1 stay as they are (names '0'..'K-1'); anything else is a class name."""

    def as_int(value) -> int | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        return None

    ints = [as_int(v) for v in labels]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            bad = min(ints)
            raise DataError(f"{where}: label {bad} is negative. Expected class ids 0, 1, 2, ... "
                            "or class names such as 'positive'.")
        return [str(k) for k in range(max(ints) + 1)], ints
    names = sorted({str(v).strip() for v in labels})  # sorted: the same file, the same ids
    index = {name: k for k, name in enumerate(names)}
    return names, [index[str(v).strip()] for v in labels]
