"""peftlab: learn and prototype parameter-efficient fine-tuning.

    model, tokenizer = peftlab.load_model("smollm2-135m")
    model = peftlab.adapt(model, "lora", r=8)          # or backend="peft"
    result = peftlab.train(model, peftlab.load_dataset("chatterbot-qa"), tokenizer=tokenizer)
    peftlab.save_adapter(model, "my-adapter")

The names below are the public API. Heavy optional dependencies (peft, bitsandbytes, plotly,
ipywidgets) load only inside the functions that need them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it; loaded on first use so `import peftlab` stays fast
_EXPORTS = {
    "adapt": "peftlab.api",
    "merge": "peftlab.api",
    "unmerge": "peftlab.api",
    "set_disabled": "peftlab.api",
    "delta_weights": "peftlab.api",
    "list_methods": "peftlab.methods",
    "METHODS": "peftlab.methods",
    "load_model": "peftlab.models",
    "list_models": "peftlab.models",
    "load_dataset": "peftlab.data",
    "list_datasets": "peftlab.data",
    "load_task": "peftlab.tasks",
    "list_tasks": "peftlab.tasks",
    "evaluate": "peftlab.evaluation",
    "doctor": "peftlab.doctor",
    "count_parameters": "peftlab.metrics",
    "estimate_memory": "peftlab.metrics",
    "measure_memory": "peftlab.metrics",
    "spectrum": "peftlab.spectra",
    "effective_rank": "peftlab.spectra",
    "stable_rank": "peftlab.spectra",
    "energy_share": "peftlab.spectra",
    "subspace_similarity": "peftlab.spectra",
    "amplification": "peftlab.spectra",
    "SpectrumHistory": "peftlab.spectra",
    "save_adapter": "peftlab.io",
    "load_adapter": "peftlab.io",
    "adapter_checkpoints": "peftlab.io.hub",
    "load_adapters": "peftlab.io.hotswap",
    "hotswap_adapter": "peftlab.io.hotswap",
    "prepare_hotswap": "peftlab.io.hotswap",
    "train": "peftlab.train",
    "TrainResult": "peftlab.train",
    "PeftlabError": "peftlab.errors",
    "PeftlabWarning": "peftlab.errors",
    "add_adapter": "peftlab.compose",
    "set_adapter": "peftlab.compose",
    "delete_adapter": "peftlab.compose",
    "add_weighted_adapter": "peftlab.compose",
}

__all__ = sorted(_EXPORTS)


# the registry's users: with them, the modules that register method hooks are imported (each
# method names its own, Method.hooks_from); they sit above the methods, so the registry cannot
# import them itself
_HOOKS_FOR = {"peftlab.api", "peftlab.io", "peftlab.io.hotswap", "peftlab.compose", "peftlab.methods", "peftlab.train", "peftlab.metrics"}


def __getattr__(name: str):
    if name in _EXPORTS:
        if _EXPORTS[name] in _HOOKS_FOR:
            from peftlab.methods import METHODS

            for module in sorted({m.hooks_from for m in METHODS.values() if m.hooks_from}):
                import_module(module)
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and IDEs; no runtime cost
    from peftlab.api import adapt, delta_weights, merge, set_disabled, unmerge
    from peftlab.compose import add_adapter, add_weighted_adapter, delete_adapter, set_adapter
    from peftlab.data import list_datasets, load_dataset
    from peftlab.doctor import doctor
    from peftlab.errors import PeftlabError
    from peftlab.evaluation import evaluate
    from peftlab.io import load_adapter, save_adapter
    from peftlab.io.hotswap import hotswap_adapter, load_adapters, prepare_hotswap
    from peftlab.io.hub import adapter_checkpoints
    from peftlab.methods import METHODS, list_methods
    from peftlab.metrics import count_parameters, estimate_memory, measure_memory
    from peftlab.models import list_models, load_model
    from peftlab.tasks import list_tasks, load_task
    from peftlab.spectra import (
        SpectrumHistory,
        amplification,
        effective_rank,
        energy_share,
        spectrum,
        stable_rank,
        subspace_similarity,
    )
    from peftlab.train import TrainResult, train
