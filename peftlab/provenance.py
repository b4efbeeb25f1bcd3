"""Where a result came from: the machine, the package versions, and files written whole.

Runs (``peftlab train``), studies (``peftlab study``) and benchmarks store ``environment()`` next
to their figures, so a number read later says which CPU, which kernels and which versions made it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

PACKAGES = ("peftlab", "torch", "transformers", "peft", "bitsandbytes", "datasets")


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), with whether it has AVX-512; else the platform's."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        cpu += ", AVX-512" if " avx512f" in info else ", no AVX-512"
    except (OSError, StopIteration):
        pass
    return cpu


def environment() -> dict[str, str]:
    """Versions, device, CPU, the kernels PyTorch picked, threads and the date (UTC)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in PACKAGES:
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = "not installed"
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env["cpu"] = f"{cpu_name()}; {os.cpu_count()} CPUs"
    env["kernels"] = torch.backends.cpu.get_cpu_capability()
    env["torch_threads"] = str(torch.get_num_threads())
    env["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env


def jsonable(value: Any) -> Any:
    """Plain JSON types all the way down (tuples become lists, other objects their str)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_text(path: Path, text: str) -> None:
    """Write next to the target, then rename: readers (and a crash) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written whole (see :func:`write_text`)."""
    write_text(path, json.dumps(jsonable(data), indent=1))
