"""A study's configuration: the task, the grid (methods x learning rates x seeds), the budget of a cell."""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from peftlab.errors import ConfigError, closest
from peftlab.provenance import jsonable
from peftlab.study.specs import FULL, parse_spec
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
    # linear layers (names or suffixes, as for targets) whose weight change each cell measures:
    # the spectrum of ΔW, its effective rank and its intruder dimensions (peftlab.spectra.update_report)
    updates: tuple[str, ...] = ()
    # after a LoRA cell is measured: its intruder dimensions scaled by each of these lambdas
    # (peftlab.spectra.reduce_intruders, peft's reduce_intruder_dimension) and the test metric
    # and forgetting measured again, e.g. (0.75, 0.0)
    reduce_intruders: tuple[float, ...] = ()

    def lrs_of(self, method: str) -> tuple[float, ...]:
        """The rates swept for a method entry (a spec like ``lora:r=64`` takes its method's default)."""
        return dict(self.lrs).get(method) or DEFAULT_LRS.get(method.split(":")[0].strip(), OTHER_LRS)

    def cells(self) -> list[tuple[str, float, int]]:
        """Every (method, lr, seed), seeds innermost: a cut-short study has whole sweeps first."""
        return [(m, lr, s) for m in self.methods for lr in self.lrs_of(m) for s in self.seeds]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lrs"] = {m: list(self.lrs_of(m)) for m in self.methods}  # resolved: what actually ran
        return jsonable(data)


def study_task(config: StudyConfig):
    """The study's task, in its framing (``peftlab.tasks.load_task``)."""
    from peftlab.tasks import load_task

    return load_task(config.task, config.framing)


def check_config(config: StudyConfig) -> None:
    """Refuse a bad configuration (unknown method, empty grid, ...) before anything trains."""
    for method in config.methods:
        parse_spec(method)  # a method name, or a spec with its settings (peftlab/study/specs.py)
    for method, rates in config.lrs:
        if method not in config.methods:
            raise ConfigError(f"--lr names {method!r}, which is not among the study's methods "
                              f"({', '.join(config.methods)}).")
        if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
            raise ConfigError(f"Learning rates of {method!r} must be positive numbers, got {rates}.")
    if any(not 0.0 <= m <= 1.0 for m in config.reduce_intruders):
        raise ConfigError(f"--reduce-intruders takes shares in [0, 1] of each intruder kept, got "
                          f"{config.reduce_intruders}; e.g. --reduce-intruders 0.75,0 (peft's default is 0.75).")
    if not config.seeds:
        raise ConfigError("A study needs at least one seed (--seeds 0,1,2).")
    for name in ("steps", "batch_size", "max_length", "validation_rows", "forgetting_rows"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}.")
    study_task(config)  # an unknown task or framing fails here, before any training


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
    if config.updates:
        words += ["--updates", ",".join(config.updates)]
    if config.reduce_intruders:
        words += ["--reduce-intruders", ",".join(f"{m:g}" for m in config.reduce_intruders)]
    return shlex.join(words)


def recorded_as(study_config: dict[str, Any], key: str) -> Any:
    """A key of a stored study's configuration; one the study predates has its default value."""
    return study_config[key] if key in study_config else jsonable(asdict(StudyConfig()))[key]
