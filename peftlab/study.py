"""``peftlab study``: PEFT methods compared on one task -- methods x learning rates x seeds.

    peftlab study --out runs/study                      # the course's study (about an hour on 2 cores)
    peftlab study --methods lora,full --seeds 0 --steps 20 --out /tmp/smoke   # a smoke run
    peftlab study --out runs/study                      # again after Ctrl-C: finished cells are kept

Each cell of the grid (one method, one learning rate, one seed) trains from the same pretrained
weights in a fresh child process, then measures:

    valid_<metric>   the task metric on a validation set: ``validation_rows`` rows are cut from the
                     end of the training split (never trained on) and the first ``Task.eval_limit``
                     of them (200) are scored; the learning rate of each method is picked on it
    test_<metric>    the task metric on the test split (its first ``Task.eval_limit`` rows unless
                     ``test_rows`` says otherwise): what the tables and charts report
    forgetting       how much the model lost of what it knew before, on text the task never showed.
                     A causal LM: the rise of cross-entropy on BBC News text (nats per token; the
                     measure of Hugging Face peft's method comparison). An encoder classifier:
                     1 - the mean cosine similarity of its sentence embeddings (mean-pooled last
                     hidden states) of BBC News text before and after training
    trainable_params, peak_memory_mb (the child's peak RSS during training, or CUDA allocated:
    the same measurement for every method), step_time_s (median), the loss curve

Full fine-tuning (``full``) is a row like the methods. Everything lands in one file, OUT/study.json
(the configuration, the provenance -- command, package versions, CPU, date -- and every finished
cell), rewritten whole after each cell; OUT/study.csv (one row per cell) and OUT/study.html (the
charts) are made from it. Run the same command again and the cells already in study.json are
skipped; add methods, learning rates or seeds and only the new cells run; a different training
budget (task, steps, batch, ...) is refused rather than mixed in.

``summarize(study)`` gives one row per method: its best learning rate (by mean validation metric
over seeds) and, at that rate, the test metric's mean, standard deviation, minimum and maximum over
seeds.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import ConfigError, DataError, closest
from peftlab.provenance import environment, jsonable, write_json, write_text

FULL = "full"  # full fine-tuning: every weight trains
GRID_KEYS = ("methods", "lrs", "seeds")  # may change when a study is resumed: the grid grows or shrinks
VERSION = 1  # of the study.json layout

# Learning rates each method is swept over, unless --lr METHOD=... says otherwise. Adapters start
# at zero or identity and take larger steps than full fine-tuning; IA3 and VeRA train a few scaling
# vectors and want larger still (peft's examples use 1e-2 .. 3e-2 for both).
ADAPTER_LRS = (1e-3, 4e-3)  # low-rank, orthogonal and selective methods
SCALING_LRS = (4e-3, 1.6e-2)  # IA3 and VeRA: a few scaling vectors
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    FULL: (5e-5, 2e-4), "ia3": SCALING_LRS, "vera": SCALING_LRS, "prompt_tuning": (3e-3, 3e-2),
    **{m: ADAPTER_LRS for m in ("lora", "dora", "loha", "lokr", "adalora", "bitfit", "ln_tuning", "oft", "boft")},
}
OTHER_LRS = ADAPTER_LRS
DEFAULT_METHODS = (FULL, "lora", "dora", "ia3", "vera", "bitfit")


@dataclass(frozen=True)
class StudyConfig:
    """One study: a task, the grid and the training budget of every cell."""

    task: str = "sentiment"
    framing: str | None = "classify"
    model: str | None = None  # None: the task's model
    methods: tuple[str, ...] = DEFAULT_METHODS
    lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (method, rates) overriding DEFAULT_LRS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 250
    batch_size: int = 16
    max_length: int = 64
    rank: int = 8
    backend: str = "reference"
    validation_rows: int = 400  # cut from the end of the training split (the first eval_limit scored)
    test_rows: int | None = None  # None: the task's eval_limit (200 rows)
    forgetting_rows: int = 64
    warmup_ratio: float = 0.1

    def lrs_of(self, method: str) -> tuple[float, ...]:
        return dict(self.lrs).get(method) or DEFAULT_LRS.get(method, OTHER_LRS)

    def cells(self) -> list[tuple[str, float, int]]:
        """Every (method, lr, seed), seeds innermost: a cut-short study has whole sweeps first."""
        return [(m, lr, s) for m in self.methods for lr in self.lrs_of(m) for s in self.seeds]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lrs"] = {m: list(self.lrs_of(m)) for m in self.methods}  # resolved: what actually ran
        return jsonable(data)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
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
    _check_config(config)
    out = Path(out)
    path = out / "study.json"
    study = load_study(path) if path.exists() else None
    wanted = config.as_dict()
    if study is not None:
        changed = sorted(k for k in wanted if k not in GRID_KEYS and study["config"].get(k) != wanted[k])
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
    with _Children(in_child) as call:
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


def measure_base(config: StudyConfig) -> dict[str, Any]:
    """The untrained model's metrics (its classifier head, if any, is freshly initialised)."""
    task = _task(config)
    model, tokenizer = _load(config, task, seed=0)
    return _scores(model, task, tokenizer, config)


def run_cell(config: StudyConfig, method: str, lr: float, seed: int, keep_model: bool = False):
    """Train one cell from the pretrained weights and measure it (see the module docstring).

    Returns the cell's record; with ``keep_model``, ``(record, model, tokenizer)`` (a lesson reruns
    a cell live and then inspects the trained model).
    """
    import torch

    import peftlab
    from peftlab.train import model_device

    task = _task(config)
    model, tokenizer = _load(config, task, seed)
    probe = _ForgettingProbe(model, tokenizer, task, config.forgetting_rows)
    torch.manual_seed(seed)  # the adapter's initial weights
    if method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peftlab.methods import get_method

        kwargs = {"r": config.rank} if "r" in get_method(method).config.field_names() else {}
        model = peftlab.adapt(model, method, backend=config.backend, **kwargs)
    params = peftlab.count_parameters(model)
    result = peftlab.train(model, task.training_data(f"train[:-{config.validation_rows}]"), tokenizer=tokenizer,
                           steps=config.steps, lr=lr, batch_size=config.batch_size,
                           max_length=config.max_length, warmup_ratio=config.warmup_ratio, seed=seed,
                           progress=False)
    losses = result.losses
    cell = {"method": method, "lr": lr, "seed": seed,
            "status": "ok" if result.stop_reason == "completed" else result.stop_reason,
            "trainable_params": params.trainable, "total_params": params.total,
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            "step_time_s": round(statistics.median(r["step_time_s"] for r in result.history), 4),
            "time_s": round(result.time_s, 1), "final_loss": result.final_loss,
            "device": model_device(model).type,
            "losses": [round(x, 4) for x in losses]}
    if result.stop_reason == "completed":
        scores = _scores(model, task, tokenizer, config)
        cell.update({f"{part}_{task.metric}": scores[part][task.metric] for part in ("valid", "test")})
        cell["forgetting"] = probe.after(model)
    return (cell, model, tokenizer) if keep_model else cell


class _ForgettingProbe:
    """Forgetting on BBC News text: cross-entropy rise (causal LM) or embedding drift (encoder)."""

    def __init__(self, model, tokenizer, task, rows: int):
        from peftlab.tasks import CLASSIFY, load_task

        self.tokenizer, self.rows = tokenizer, rows
        self.encoder = task.framing == CLASSIFY
        self.probe = load_task("forgetting")
        self.before = self._embeddings(model) if self.encoder else self._cross_entropy(model)

    def after(self, model) -> float:
        import torch

        if not self.encoder:
            return round(self._cross_entropy(model) - self.before, 5)
        cos = torch.nn.functional.cosine_similarity(self._embeddings(model), self.before, dim=-1)
        return round(1.0 - float(cos.mean()), 6)

    def _cross_entropy(self, model) -> float:
        import peftlab

        ppl = peftlab.evaluate(model, self.probe, tokenizer=self.tokenizer, limit=self.rows)["perplexity"]
        return math.log(ppl)

    def _embeddings(self, model):
        import torch

        texts = [self.probe.input_text(r) for r in self.probe.rows("test", self.rows)]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 16):
                enc = self.tokenizer(texts[start:start + 16], truncation=True, max_length=128,
                                     padding=True, return_tensors="pt").to(device)
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append((hidden * mask).sum(1) / mask.sum(1))
        model.train(was_training)
        return torch.cat(out).float()


def _task(config: StudyConfig):
    from peftlab.tasks import load_task

    return load_task(config.task, config.framing)


def _load(config: StudyConfig, task, seed: int):
    import torch

    import peftlab

    torch.manual_seed(seed)  # a classifier's new head
    return peftlab.load_model(config.model or task.model, num_labels=task.num_labels)


def _valid_split(config: StudyConfig) -> str:
    return f"train[-{config.validation_rows}:]"


def _scores(model, task, tokenizer, config: StudyConfig) -> dict[str, dict[str, float]]:
    """``peftlab.evaluate`` on the validation rows (the first ``eval_limit``) and the test rows."""
    import peftlab

    return {"valid": peftlab.evaluate(model, task, tokenizer=tokenizer, split=_valid_split(config),
                                      limit=task.eval_limit),
            "test": peftlab.evaluate(model, task, tokenizer=tokenizer, limit=config.test_rows)}


def _check_config(config: StudyConfig) -> None:
    from peftlab.methods import METHODS

    known = (FULL, *METHODS)
    for method in config.methods:
        if method not in known:
            raise ConfigError(f"No method is called {method!r}.{closest(method, known)} "
                              f"Expected {FULL!r} or one of {', '.join(METHODS)}.")
    for method, rates in config.lrs:
        if method not in config.methods:
            raise ConfigError(f"--lr names {method!r}, which is not among the study's methods "
                              f"({', '.join(config.methods)}).")
        if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
            raise ConfigError(f"Learning rates of {method!r} must be positive numbers, got {rates}.")
    if not config.seeds:
        raise ConfigError("A study needs at least one seed (--seeds 0,1,2).")
    for name in ("steps", "batch_size", "max_length", "validation_rows", "forgetting_rows"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}.")
    _task(config)  # an unknown task or framing fails here, before any training


# --------------------------------------------------------------------------------------------
# The file, the table, the charts
# --------------------------------------------------------------------------------------------
def load_study(path: str | Path) -> dict[str, Any]:
    """A study.json (or the folder holding one), checked to be one."""
    import json

    path = Path(path)
    path = path / "study.json" if path.is_dir() else path
    try:
        study = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"No study at {path}. Expected the study.json that `peftlab study --out DIR` writes.") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); it is not a study peftlab wrote.") from None
    if not isinstance(study, dict) or not {"config", "cells", "provenance"} <= set(study):
        raise DataError(f"{path} is not a peftlab study (expected keys config, cells, provenance).")
    return study


def save_study(study: dict[str, Any], out: str | Path) -> None:
    """study.json (written whole), study.csv and study.html in ``out``."""
    out = Path(out)
    write_json(out / "study.json", study)
    write_text(out / "study.csv", cells_csv(study))
    if any(c["status"] == "ok" for c in study["cells"]):
        write_text(out / "study.html", study_html(study))


def config_metric(study: dict[str, Any]) -> str:
    from peftlab.tasks import load_task

    config = study["config"]
    return load_task(config["task"], config["framing"]).metric


CSV_COLUMNS = ("method", "lr", "seed", "status", "valid_{m}", "test_{m}", "forgetting", "trainable_params",
               "total_params", "peak_memory_mb", "step_time_s", "time_s", "final_loss")


def cells_csv(study: dict[str, Any]) -> str:
    """One row per cell (the loss curves stay in study.json)."""
    metric = config_metric(study)
    columns = [c.format(m=metric) for c in CSV_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for cell in study["cells"]:
        writer.writerow(cell)
    return buffer.getvalue()


def summarize(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method at its best learning rate (highest mean validation metric over seeds;
    lowest for perplexity): the test metric's mean, std, min and max over those seeds, and the
    medians of forgetting, peak memory and step time. Methods with no finished cell are left out."""
    metric = config_metric(study)
    higher = metric != "perplexity"
    rows = []
    for method in study["config"]["methods"]:
        by_lr: dict[float, list[dict]] = {}
        for cell in _in_grid(study):
            if cell["method"] == method and cell["status"] == "ok":
                by_lr.setdefault(cell["lr"], []).append(cell)
        if not by_lr:
            continue
        sign = 1 if higher else -1
        lr, cells = max(by_lr.items(), key=lambda kv: sign * statistics.mean(c[f"valid_{metric}"] for c in kv[1]))
        test = [c[f"test_{metric}"] for c in cells]
        rows.append({
            "method": method, "lr": lr, "seeds": len(cells),
            f"valid_{metric}": statistics.mean(c[f"valid_{metric}"] for c in cells),
            f"test_{metric}": statistics.mean(test),
            f"test_{metric}_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            f"test_{metric}_min": min(test), f"test_{metric}_max": max(test),
            "forgetting": statistics.median(c["forgetting"] for c in cells),
            "trainable_params": cells[0]["trainable_params"],
            "trainable_percent": 100.0 * cells[0]["trainable_params"] / cells[0]["total_params"],
            "peak_memory_mb": statistics.median(c["peak_memory_mb"] for c in cells),
            "step_time_s": statistics.median(c["step_time_s"] for c in cells),
            "lrs_tried": sorted(by_lr),
        })
    return rows


def _in_grid(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells of the study's current grid (a resumed study may hold others)."""
    config = study["config"]
    grid = {(m, float(lr), int(s)) for m in config["methods"] for lr in config["lrs"][m] for s in config["seeds"]}
    return [c for c in study["cells"] if (c["method"], float(c["lr"]), int(c["seed"])) in grid]


def format_summary(study: dict[str, Any]) -> str:
    """The summary as a fixed-width table, with the base model's level and the provenance."""
    metric = config_metric(study)
    config, prov = study["config"], study["provenance"]
    rows = summarize(study)
    lines = [f"{'method':<10} {'best lr':>8} {'test ' + metric:>14} {'± std':>7} {'min..max':>13} "
             f"{'forgetting':>10} {'trainable':>11} {'%':>6} {'peak MB':>8} {'step s':>7}"]
    for r in rows:
        lines.append(f"{r['method']:<10} {r['lr']:>8.0e} {r[f'test_{metric}']:>14.3f} {r[f'test_{metric}_std']:>7.3f} "
                     f"{r[f'test_{metric}_min']:>6.3f}..{r[f'test_{metric}_max']:.3f} {r['forgetting']:>10.4f} "
                     f"{r['trainable_params']:>11,} {r['trainable_percent']:>6.2f} {r['peak_memory_mb']:>8,.0f} "
                     f"{r['step_time_s']:>7.3f}")
    base = (study.get("base") or {}).get("test", {}).get(metric)
    if base is not None:
        lines.append(f"untrained model: test {metric} {base:.3f}")
    lines.append(f"{config['task']} ({config['framing']}), {config['model'] or 'task model'}, "
                 f"{config['steps']} steps x {config['batch_size']} rows, seeds {config['seeds']}; "
                 f"{prov.get('cpu', '?')}, torch {prov.get('torch', '?')}, {prov.get('date', '?')}")
    return "\n".join(lines)


def study_html(study: dict[str, Any]) -> str:
    """The charts and the table as one offline page (plotly.js embedded once)."""
    from peftlab import plots

    metric = config_metric(study)
    rows = summarize(study)
    base = (study.get("base") or {}).get("test", {}).get(metric)
    figures = [plots.study_tradeoff(rows, metric, base=base), plots.study_costs(rows),
               plots.study_lr_sweep(_in_grid(study), metric)]
    parts = [fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures)]
    table = format_summary(study).replace("&", "&amp;").replace("<", "&lt;")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>peftlab study</title></head><body>"
            + "".join(parts) + f"<pre>{table}</pre></body></html>")


def config_command(config: StudyConfig) -> str:
    """The ``peftlab study`` command line that makes this configuration."""
    words = ["peftlab", "study", "--task", config.task]
    if config.framing:
        words += ["--framing", config.framing]
    if config.model:
        words += ["--model", config.model]
    words += ["--methods", ",".join(config.methods), "--seeds", ",".join(map(str, config.seeds)),
              "--steps", str(config.steps), "--batch-size", str(config.batch_size),
              "--seq-len", str(config.max_length), "--rank", str(config.rank), "--backend", config.backend]
    for method, rates in config.lrs:
        words += ["--lr", f"{method}={','.join(f'{r:g}' for r in rates)}"]
    return shlex.join(words)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = StudyConfig()
    p.add_argument("--task", default=d.task, help=f"the task (default: {d.task})")
    p.add_argument("--framing", default=d.framing, choices=("generate", "classify", "perplexity"),
                   help=f"how the model sees the task (default: {d.framing})")
    p.add_argument("--model", help="model (default: the task's)")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated methods, '{FULL}' for full fine-tuning (default: {','.join(d.methods)})")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR,LR",
                   help="learning rates swept for one method (repeatable; default: a sweep per method)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per cell (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per step (default: {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=d.max_length, help=f"max tokens per row (default: {d.max_length})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"rank of methods that have one (default: {d.rank})")
    p.add_argument("--backend", default=d.backend, choices=("reference", "peft", "fused"),
                   help="which implementation of each method (default: reference)")
    p.add_argument("--test-rows", type=int, help="test rows scored (default: the task's eval_limit, 200)")
    p.add_argument("--out", required=True, help="folder for study.json, study.csv and study.html")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    def numbers(text: str, kind, what: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}.") from None

    lrs = []
    for item in args.lr:
        method, sep, rates = item.partition("=")
        if not sep:
            raise ConfigError(f"--lr {item!r}: expected METHOD=LR[,LR...], e.g. --lr lora=1e-3,4e-3.")
        lrs.append((method.strip(), numbers(rates, float, f"--lr {method}")))
    return StudyConfig(task=args.task, framing=args.framing, model=args.model,
                       methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                       lrs=tuple(lrs), seeds=numbers(args.seeds, int, "--seeds"), steps=args.steps,
                       batch_size=args.batch_size, max_length=args.seq_len, rank=args.rank,
                       backend=args.backend, test_rows=args.test_rows)


def main(args: argparse.Namespace) -> int:
    """``peftlab study ...``: run (or resume) the study, print the summary."""
    config = config_from_args(args)
    command = shlex.join(["peftlab", "study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] else None
    study = run_study(config, args.out, command=command, log=lambda line: print(line, flush=True))
    print()
    print(format_summary(study))
    print(f"\nwrote {Path(args.out) / 'study.json'}, study.csv and study.html")
    failed = [c for c in study["cells"] if c["status"] != "ok"]
    for cell in failed:
        print(f"not finished: {cell['method']} lr={cell['lr']:g} seed={cell['seed']}: {cell['status']}")
    return 1 if failed else 0


__all__ = ["DEFAULT_LRS", "DEFAULT_METHODS", "FULL", "StudyConfig", "cells_csv", "format_summary",
           "load_study", "run_cell", "run_study", "save_study", "summarize"]
