"""The README's `make lab` (and `make app`, the Lab through Voila) start on this machine, as this
user, root included, and print the URL to open.

Each target runs for real on a free loopback port with temporary Jupyter folders, until the
server answers on that URL; then its whole process group is stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(target: str, args: str, timeout_s: float = 120.0) -> str:
    """Run `make TARGET ARGS=...`, return the first http:// URL it prints once that URL answers."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="peftlab-make-"))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), BROWSER="true")
    log = tmp / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(["make", "-s", target, f"ARGS={args}"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text()
            assert proc.poll() is None, f"`make {target}` stopped (exit {proc.returncode}):\n{text[-3000:]}"
            complete = text[: text.rfind("\n") + 1]  # a line still being written may hold half a URL
            urls = re.findall(r"https?://(?:127\.0\.0\.1|localhost):\d+[^\s]*", complete)
            if urls:
                try:
                    with urllib.request.urlopen(urls[0], timeout=30) as response:
                        assert response.status == 200
                    return text
                except urllib.error.URLError:  # printed a moment before it listens: ask again
                    pass
            time.sleep(0.5)
        raise AssertionError(f"`make {target}` printed no URL within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def test_make_lab_starts_jupyterlab_and_prints_its_url():
    port = _free_port()
    text = _start("lab", f"--no-browser --ip=127.0.0.1 --port={port}")
    assert f"http://127.0.0.1:{port}/lab?token=" in text
    assert "Running as root is not recommended" not in text


def test_make_app_serves_the_lab_through_voila():
    port = _free_port()
    text = _start("app", f"--no-browser --Voila.ip=127.0.0.1 --port={port}")
    assert f"http://127.0.0.1:{port}" in text or f"http://localhost:{port}" in text
