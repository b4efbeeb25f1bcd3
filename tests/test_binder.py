"""binder/ must install the same dependency set as the Makefile (pyproject.toml + bundled packages)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_binder_requirements_match_the_project_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"]) | _names(project["optional-dependencies"]["lab"])
    binder = _names((ROOT / "binder" / "requirements.txt").read_text().splitlines())
    assert binder == wanted, f"only in binder: {binder - wanted}, missing from binder: {wanted - binder}"


def test_binder_pins_the_cpu_torch_the_makefile_uses():
    constraint = re.search(r"^torch==([\d.]+)$", (ROOT / "requirements/constraints-cpu.txt").read_text(), re.M)
    binder = (ROOT / "binder" / "requirements.txt").read_text()
    assert constraint and f"torch=={constraint.group(1)}+cpu" in binder


def test_postbuild_installs_the_bundled_packages_and_the_kit():
    post = (ROOT / "binder" / "postBuild").read_text()
    assert post.startswith("#!/bin/bash") and "set -e" in post
    assert "requirements/bundled.txt" in post and "pip install --no-deps -e ." in post
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
