"""Build course notebooks from a compact Python description, then run them to store outputs.

    python tools/nb.py build notebooks/00_start_here.ipynb   # re-executes one notebook in place

Notebooks are stored with outputs so nbval can compare them; this script only re-runs them with
the settings nbval needs (no widget state, seeded, progress bars off).
"""

from __future__ import annotations

import os
import subprocess
import sys


def execute(path: str, timeout: int = 600) -> None:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
         "--ExecutePreprocessor.store_widget_state=False",
         f"--ExecutePreprocessor.timeout={timeout}", path],
        check=True, env=env,
    )


if __name__ == "__main__":
    for p in sys.argv[2:]:
        execute(p)
