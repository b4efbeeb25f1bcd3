"""Build course notebooks from a compact Python description, then run them to store outputs.

    python tools/nb.py build notebooks/00_start_here.ipynb   # re-executes one notebook in place

Notebooks are stored with outputs so nbval can compare them; this script only re-runs them with
the settings nbval needs (seeded, progress bars off; widget state only for the Lab app,
so a static viewer shows its dashboard).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


# Notebooks whose widgets a static viewer should show (nbviewer renders stored widget state): the
# Lab app. The lessons store none (their widgets are exercised by the tests, not read offline).
WIDGET_STATE = ("lab.ipynb",)


def execute(path: str, timeout: int = int(os.environ.get("NB_TIMEOUT", "600"))) -> None:
    store = tempfile.mkdtemp(prefix="peftlab-runs-")  # an empty run store: the recording shows only its own runs
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", TRACKIO_DIR=store,
               PEFTLAB_RUNS_DIR=store)
    store = os.path.basename(path) in WIDGET_STATE
    subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
         f"--ExecutePreprocessor.store_widget_state={store}",
         f"--ExecutePreprocessor.timeout={timeout}", path],
        check=True, env=env,
    )


def hide_checkout_path(path: str) -> None:
    """Stored outputs name ``<REPO>/peftlab/...``, not this machine's checkout (warnings, paths)."""
    import nbformat

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    nb = nbformat.read(path, 4)
    changed = False
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if isinstance(output.get("text"), str) and root in output["text"]:
                output["text"], changed = output["text"].replace(root, "<REPO>/"), True
    if changed:
        nbformat.write(nb, path)


MAX_WIDGET_MODEL_BYTES = 200_000


def slim_widget_state(path: str) -> None:
    """Keep a stored widget state small enough to commit. A plotly ``FigureWidget`` (an anywidget
    model) stores the whole plotly.js bundle (~5 MB) in its state: such models are dropped, with
    their places in the boxes that hold them, so a static viewer shows the controls and the text
    of the dashboard and leaves out its (still empty, before training) live figures."""
    import json

    import nbformat

    nb = nbformat.read(path, 4)
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state")
    if not state:
        return
    dropped = {k for k, v in state.items() if len(json.dumps(v)) > MAX_WIDGET_MODEL_BYTES}
    for k in dropped:
        del state[k]
    refs = {f"IPY_MODEL_{k}" for k in dropped}
    for model in state.values():
        children = model.get("state", {}).get("children")
        if isinstance(children, list):
            model["state"]["children"] = [c for c in children if c not in refs]
    nbformat.write(nb, path)


if __name__ == "__main__":
    for p in sys.argv[2:]:
        execute(p)
        hide_checkout_path(p)
        if os.path.basename(p) in WIDGET_STATE:
            slim_widget_state(p)
