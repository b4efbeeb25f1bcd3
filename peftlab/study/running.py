"""Running a study: every cell not already in ``study.json``, each in a fresh child process.

The file is rewritten whole after each cell, so an interrupted study keeps what it finished and
the same command resumes it; a broken cell is recorded and tried again on the next run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.errors import ConfigError
from peftlab.provenance import environment
from peftlab.study.cells import measure_base, run_cell
from peftlab.study.config import GRID_KEYS, VERSION, StudyConfig, check_config, config_command, recorded_as
from peftlab.study.results import config_metric, load_study, save_study


def run_study(
    config: StudyConfig,
    out: str | Path,
    *,
    command: str | None = None,
    log: Callable[[str], None] | None = print,
    in_child: bool = True,
) -> dict[str, Any]:
    """Run every cell of ``config`` not already in ``out/study.json``; returns the study.

    ``in_child=False`` runs cells in this process (tests): memory figures then include what
    earlier cells left behind, so the course's study always uses children.
    """
    check_config(config)
    out = Path(out)
    path = out / "study.json"
    study = load_study(path) if path.exists() else None
    wanted = config.as_dict()
    if study is not None:
        changed = sorted(k for k in wanted if k not in GRID_KEYS and recorded_as(study["config"], k) != wanted[k])
        if changed:
            raise ConfigError(f"{path} holds a study whose cells were trained differently (different "
                              f"{', '.join(changed)}). Expected the same options to resume it (methods, "
                              "learning rates and seeds may change: that extends the grid); use another "
                              "--out for a new study.")
        study["config"] = wanted
    if study is None:
        study = {"version": VERSION, "config": wanted, "provenance": {}, "base": None, "cells": []}
    study["provenance"] = {"command": command or config_command(config), **environment()}
    study["cells"] = [c for c in study["cells"] if not c["status"].startswith("error")]  # tried again
    done = {(c["method"], c["lr"], c["seed"]) for c in study["cells"]}
    todo = [cell for cell in config.cells() if cell not in done]
    if log and done:
        log(f"resuming {path}: {len(done)} cells done, {len(todo)} to go")
    from peftlab.progress import progress_bar

    with _Children(in_child) as call, progress_bar(len(todo), desc="study", unit="cell") as bar:
        if study["base"] is None:
            study["base"] = call(measure_base, config)
            save_study(study, out)
        for n, (method, lr, seed) in enumerate(todo, 1):
            start = time.perf_counter()
            try:
                cell = call(run_cell, config, method, lr, seed)
            except KeyboardInterrupt:
                if log:
                    log(f"interrupted: {len(study['cells'])} cells are kept in {path}; run the same command to go on")
                raise
            except Exception as err:  # one broken cell must not sink the study; it is retried on resume
                message = (str(err).strip().splitlines() or [""])[0][:200]
                cell = {"method": method, "lr": lr, "seed": seed, "status": f"error: {type(err).__name__}: {message}"}
            study["cells"].append(cell)
            save_study(study, out)
            bar.update()
            if log:
                metric = config_metric(study)
                value = cell.get(f"test_{metric}")
                shown = f"test {metric} {value:.3f}" if isinstance(value, float) else cell["status"]
                log(f"[{n}/{len(todo)}] {method} lr={lr:g} seed={seed}: {shown} "
                    f"({time.perf_counter() - start:.0f} s)")
    return study


class _Children:
    """Calls each function in a fresh spawned process (one at a time), or here if told not to."""

    def __init__(self, in_child: bool):
        self.in_child, self.pool = in_child, None

    def __enter__(self):
        if self.in_child:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            max_tasks_per_child=1)
        return self

    def __call__(self, fn: Callable, *args):
        return fn(*args) if self.pool is None else self.pool.submit(fn, *args).result()

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)
