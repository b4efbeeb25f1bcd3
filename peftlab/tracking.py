"""Experiment tracking: a run's config, its adapter's parameter count and every step's metrics,
kept in a real local store, as transformers' ``report_to`` does; and the store read back.

    peftlab.train(model, data, report_to="trackio")            # or "tensorboard", "all", a list
    peftlab train ... --report-to trackio,tensorboard
    peftlab runs                                                # the stored runs, one line each
    peftlab runs --compare lora-r8-... lora-r16-...              # what differs, and how they ended

- **trackio** (https://github.com/gradio-app/trackio): a local SQLite database per project under
  ``$PEFTLAB_RUNS_DIR`` if set (:func:`use_store`), else ``$TRACKIO_DIR`` (default
  ``~/.cache/huggingface/trackio``), offline; ``trackio show`` opens its dashboard. Runs survive a
  kernel restart and are compared across sessions from there; the Lab reports to it by default.
- **TensorBoard**: event files under ``log_dir`` (default ``<out_dir>/runs/<run name>``, else
  ``runs/<run name>``), through ``torch.utils.tensorboard``; ``tensorboard --logdir runs``.

Each run logs its config once (the model, the method and its config, the training settings, and
``trainable_parameters`` / ``total_parameters`` / ``trainable_percent``), then at every step the
numbers of the step's record (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``eval_loss``,
...) under the step number. A :class:`Tracker` is a ``train()`` callback plus ``close()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from peftlab.errors import ConfigError, closest

REPORTERS = ("trackio", "tensorboard")
PROJECT = "peftlab"  # the trackio project peftlab's runs go to


def parse_report_to(report_to: str | Sequence[str] | None) -> tuple[str, ...]:
    """``report_to`` as a tuple of REPORTERS: None / "none" -> (), "all" -> both, "a,b" -> (a, b)."""
    if report_to is None:
        return ()
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    items = [str(i).strip().lower() for i in items if str(i).strip()]
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return REPORTERS
    for item in items:
        if item not in REPORTERS:
            raise ConfigError(f"report_to={item!r} is not a tracker peftlab knows.{closest(item, REPORTERS)} "
                              f"Expected some of: {', '.join(REPORTERS)}, 'all' or 'none'.")
    return tuple(dict.fromkeys(items))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_config(model: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    """What a run logs once, flat (``adapter.r``, ``train.lr``): the model, its adapter's method
    and config, the training settings, and the trainable / total parameter counts."""
    from peftlab.metrics import count_parameters
    from peftlab.state import active_record, records

    config: dict[str, Any] = {"model": getattr(getattr(model, "config", None), "_name_or_path", None)
                              or type(model).__name__}
    if type(model).__module__.startswith("peft."):
        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        peft_config = model.peft_config[name].to_dict()
        config.update(method=str(peft_config.get("peft_type")).split(".")[-1].lower(), backend="peft")
        fields = peft_config
    elif records(model):
        _name, record = active_record(model)
        config.update(method=record.method, backend=getattr(model.__dict__.get("peftlab"), "backend", "reference"))
        fields = {f.name: getattr(record.config, f.name) for f in dataclasses.fields(record.config)}
    else:
        fields = {}
    config.update({f"adapter.{k}": _jsonable(v) for k, v in fields.items()})
    config.update({f"train.{k}": _jsonable(v) for k, v in settings.items()})
    count = count_parameters(model)
    config.update(trainable_parameters=count.trainable, total_parameters=count.total,
                  trainable_percent=round(count.percent, 6))
    return config


def _quiet():
    """trackio prints its dashboard hints on every init and finish: keep a run's output clean."""
    return contextlib.redirect_stdout(io.StringIO())


def _needs(package: str, reporter: str) -> ConfigError:
    return ConfigError(f"report_to={reporter!r} needs the {package} package, which is not installed. Expected "
                       f"it installed; try `pip install {package}` (or peftlab[track]), or drop {reporter!r}.")


class _Trackio:
    def __init__(self, project: str, name: str, config: dict) -> None:
        use_store()  # $PEFTLAB_RUNS_DIR, if set, before trackio reads its folder
        try:
            import trackio
        except ImportError as err:
            raise _needs("trackio", "trackio") from err

        with _quiet():
            # embed=False: in a notebook trackio would start its dashboard server and embed it in the
            # cell's output on every run; `trackio show` (or peftlab runs) opens the store instead
            self.run = trackio.init(project=project, name=name, config=config, auto_log_cpu=False,
                                    auto_log_gpu=False, embed=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        import trackio

        with _quiet():
            if trackio.context_vars.current_run.get() is self.run:
                trackio.finish()  # also forgets it as trackio's current run, which it would finish again at exit
            else:
                self.run.finish()


class _TensorBoard:
    def __init__(self, log_dir: Path, config: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError as err:
            raise _needs("tensorboard", "tensorboard") from err

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```")
        for key in ("trainable_parameters", "total_parameters", "trainable_percent"):
            self.writer.add_scalar(f"model/{key}", config[key], 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


@dataclass
class Tracker:
    """The trackers of one run: ``on_step`` is a ``train()`` callback, ``close`` ends the run."""

    name: str  # the run's name in every store
    config: dict[str, Any]  # what was logged once
    backends: list[Any] = field(default_factory=list)

    def on_step(self, record: dict[str, Any], model: nn.Module | None = None) -> None:
        metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(float(v))}
        for backend in self.backends:
            backend.log(metrics, int(record["step"]))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def run_name(config: dict[str, Any]) -> str:
    """A name that sorts by time and says what ran: ``lora-r8-20260105-141503-042``."""
    rank = config.get("adapter.r")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return "-".join(str(p) for p in (config.get("method") or "run", f"r{rank}" if rank else None, stamp) if p)


def start(report_to: str | Sequence[str] | None, model: nn.Module, settings: dict[str, Any], *,
          project: str = PROJECT, name: str | None = None,
          log_dir: str | os.PathLike | None = None) -> Tracker | None:
    """Open the trackers ``report_to`` names for a run of ``model``; None when it names none."""
    reporters = parse_report_to(report_to)
    if not reporters:
        return None
    config = run_config(model, settings)
    tracker = Tracker(name or run_name(config), config)
    if "trackio" in reporters:
        tracker.backends.append(_Trackio(project, tracker.name, config))
    if "tensorboard" in reporters:
        out = settings.get("out_dir")
        root = Path(log_dir) if log_dir is not None else (Path(out) / "runs" if out else Path("runs"))
        tracker.backends.append(_TensorBoard(root / tracker.name, config))
    return tracker


# --------------------------------------------------------------------------------------------
# The store read back (trackio's): `peftlab runs`, the Lab's runs table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredRun:
    """One run in the local trackio store."""

    name: str
    config: dict[str, Any]  # what the run logged once (run_config)
    history: list[dict[str, Any]]  # one dict of metrics per logged step, with "step"

    @property
    def last(self) -> dict[str, Any]:
        """The last value of every metric."""
        out: dict[str, Any] = {}
        for row in self.history:
            out.update({k: v for k, v in row.items() if v is not None})
        return out


STORE_ENV = "PEFTLAB_RUNS_DIR"  # where the local run store lives; trackio's own TRACKIO_DIR also works


def trackio_available() -> bool:
    """Whether the trackio package (the local run store) is installed."""
    import importlib.util

    return importlib.util.find_spec("trackio") is not None


def use_store(path: str | os.PathLike | None = None) -> Path | None:
    """Point the local run store at ``path`` (else ``$PEFTLAB_RUNS_DIR``, else trackio's own
    ``$TRACKIO_DIR`` or default) and return that folder; None leaves trackio's default, unnamed.

    trackio reads its folder once, when first imported; asking for another folder after that is an
    error rather than runs written somewhere the table does not read.
    """
    import sys

    chosen = path if path is not None else os.environ.get(STORE_ENV)
    if chosen is None:
        return Path(os.environ["TRACKIO_DIR"]) if os.environ.get("TRACKIO_DIR") else None
    folder = Path(chosen).expanduser().resolve()
    loaded = sys.modules.get("trackio.utils")
    if loaded is not None and Path(loaded.TRACKIO_DIR).resolve() != folder:
        raise ConfigError(f"The run store is already open at {loaded.TRACKIO_DIR} (trackio was imported), so it "
                          f"cannot move to {folder}. Expected the store folder chosen before the first run; "
                          f"try setting {STORE_ENV}={folder} before starting Python, or restart the kernel.")
    os.environ["TRACKIO_DIR"] = str(folder)
    return folder


def stored_runs(project: str = PROJECT) -> list[StoredRun]:
    """Every run of ``project`` in the local trackio store, oldest first ([] if it has none)."""
    use_store()  # the same folder the runs were written to ($PEFTLAB_RUNS_DIR, else trackio's)
    from trackio.sqlite_storage import SQLiteStorage  # the store's own reader (trackio.Api lacks metrics)

    if not SQLiteStorage.get_project_db_path(project).exists():
        return []
    runs = []
    for name in SQLiteStorage.get_runs(project):
        config = SQLiteStorage.get_run_config(project, name) or {}
        logs = SQLiteStorage.get_logs(project, name)
        history = [{k: v for k, v in row.items() if k == "step" or not k.startswith("_") and k != "timestamp"}
                   for row in logs]
        runs.append(StoredRun(name, {k: v for k, v in config.items() if not k.startswith("_")}, history))
    return runs


SHOWN = ("method", "adapter.r", "train.lr", "train.steps", "trainable_parameters")  # the list's columns


def format_runs(runs: Sequence[StoredRun]) -> str:
    """One line per run: name, method, r, lr, steps, trainable parameters, final loss."""
    if not runs:
        return "no stored runs (train with report_to='trackio' or --report-to trackio)"
    header = ["run", "method", "r", "lr", "steps", "trainable", "loss"]
    rows = [[r.name, *(_cell(r.config.get(k)) for k in SHOWN), _cell(r.last.get("loss"))] for r in runs]
    return _table(header, rows)


def compare(runs: Sequence[StoredRun]) -> str:
    """The config entries that differ between ``runs``, then each run's final metrics."""
    if len(runs) < 2:
        raise ConfigError(f"Comparing needs at least two runs, got {len(runs)}. Expected two or more names "
                          "from `peftlab runs`.")
    keys = sorted({k for r in runs for k in r.config})
    differ = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    metrics = sorted({k for r in runs for k in r.last if k != "step"})
    header = ["", *(r.name for r in runs)]
    rows = [[k, *(_cell(r.config.get(k)) for r in runs)] for k in differ]
    rows += [[f"final {k}", *(_cell(r.last.get(k)) for r in runs)] for k in metrics]
    return _table(header, rows) if rows else "the runs have the same config and no metrics"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def add_arguments(parser: Any) -> None:
    """The flags of ``peftlab runs``."""
    parser.add_argument("--project", default=PROJECT, help=f"the trackio project (default: {PROJECT})")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="compare these runs (names from the list)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_runs(args: Any) -> int:
    """``peftlab runs``: list the stored runs, or compare some of them."""
    runs = stored_runs(args.project)
    if args.compare:
        by_name = {r.name: r for r in runs}
        missing = [n for n in args.compare if n not in by_name]
        if missing:
            raise ConfigError(f"No stored run named {missing[0]!r} in project {args.project!r}."
                              f"{closest(missing[0], list(by_name))} Expected names from `peftlab runs`.")
        runs = [by_name[n] for n in args.compare]
    if args.json:
        print(json.dumps([{"name": r.name, "config": r.config, "last": r.last} for r in runs], indent=1))
    else:
        print(compare(runs) if args.compare else format_runs(runs))
    return 0


__all__ = ["REPORTERS", "PROJECT", "STORE_ENV", "trackio_available", "use_store", "parse_report_to", "run_config", "Tracker", "start", "run_name",
           "StoredRun", "stored_runs", "format_runs", "compare", "add_arguments", "cmd_runs"]
