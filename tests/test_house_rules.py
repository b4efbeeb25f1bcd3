"""Rules of the house that a reader relies on, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peftlab", "widgets")


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_used_across_modules():
    """What one module shares with another is public and documented: no ``from peftlab.x import
    _y`` and no ``x._y`` on an imported peftlab module, at module level or inside a function."""
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        ours: dict[str, str] = {}  # local name -> the peftlab module or object it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
                    ours[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES:
                        ours[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in ours and _private(node.attr)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {ours[node.value.id]}.{node.attr}")
    assert not found, "\n".join(found)


def test_conv1d_layout_is_asked_of_inject():
    """transformers' Conv1D (weight stored d_in x d_out) is recognised in one place,
    ``inject.is_conv1d``, not by comparing class names across the code."""
    found = [f"{p.relative_to(ROOT)}:{i}" for p in _sources() if p.relative_to(ROOT).as_posix() != "peftlab/inject/layers.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if '__name__ == "Conv1D"' in line]
    assert not found, found
