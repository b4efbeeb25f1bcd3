"""The registry of PEFT methods: name -> Method (config dataclass, builder, facts for learners).

``METHODS`` is one explicit dict joined from two catalogues: ``catalogue_classic.py`` (LoRA and
the classic set) and ``catalogue_recent.py`` (peft's newer families). ``Method`` and the generic
layer builder live in ``registry.py``. Adding a method is one file in this folder plus one entry in
a catalogue; nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Callable

from peftlab.errors import ConfigError, UnknownNameError, closest
from peftlab.methods.catalogue_classic import CLASSIC_METHODS, build_lora, lora_init_method
from peftlab.methods.catalogue_recent import RECENT_METHODS
from peftlab.methods.registry import (ATTENTION_QV, CONV_HINT, DECODER_ARCHITECTURES, FORMULA_ARCHITECTURES, HOOKS,
                                      Method, layer_method, layer_parameter_count, method_hook)

__all__ = ["ATTENTION_QV", "CONV_HINT", "DECODER_ARCHITECTURES", "FORMULA_ARCHITECTURES", "HOOKS", "METHODS", "Method",
           "build_lora", "get_method", "method_for", "shapes_stand_in", "layer_method", "layer_parameter_count", "list_methods", "lora_init_method",
           "method_hook", "register_hooks"]

METHODS: dict[str, Method] = {**CLASSIC_METHODS, **RECENT_METHODS}


def register_hooks(name: str, **hooks: Callable) -> None:
    """Give method ``name`` the hooks (see Method.hooks) a module above the methods provides."""
    unknown = set(hooks) - set(HOOKS)
    if unknown:
        raise ConfigError(f"Unknown method hooks {sorted(unknown)}. Expected some of: {', '.join(HOOKS)}.")
    METHODS[name].hooks.update(hooks)


def get_method(name: str) -> Method:
    """The registered method called ``name``; a clear error suggesting the closest name."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in METHODS:
        raise UnknownNameError(
            f"Unknown method {name!r}.{closest(str(key), METHODS)} Expected one of: "
            f"{', '.join(METHODS)}. See peftlab.list_methods() for what each does."
        )
    return METHODS[key]


def method_for(name: str, hyperparameters: dict) -> Method:
    """The method ``adapt(model, name, **hyperparameters)`` builds: ``name``'s, except that LoRA with
    an init that learns from data (``init="eva"``, ``"lora_ga"``, ``"corda"``) is the method of that
    name, whose config carries the data and the init's settings."""
    spec = get_method(name)
    init = hyperparameters.get("init")
    chosen = METHODS.get(init) if spec.name == "lora" and isinstance(init, str) else None
    return chosen if chosen is not None and chosen.learns_from_data and chosen.shapes_like == "lora" else spec


def shapes_stand_in(name: str, hyperparameters: dict) -> tuple[str, dict]:
    """(method, hyperparameters) that build the same shapes as ``name`` without reading weight
    values or data (its ``shapes_like``: LoRA for PiSSA, EVA, LoftQ...), for a model on the meta
    device; the init's own settings (EVA's rho, LoRA-GA's data) are left out. Others: as given."""
    spec = get_method(name)
    if spec.shapes_like is None:
        return spec.name, hyperparameters
    stand_in = get_method(spec.shapes_like)
    takes = stand_in.config.field_names()
    return stand_in.name, {k: v for k, v in hyperparameters.items() if k != "init" and k in takes}


def list_methods() -> list[dict]:
    """Each method's name, family, one-line description, paper, parameter formula, mergeability."""
    return [
        {
            "name": m.name,
            "family": m.family,
            "description": m.description,
            "paper": m.paper,
            "trainable_parameters": m.formula,
            "mergeable": m.mergeable,
            "in_peft": m.peft_type is not None,
        }
        for m in METHODS.values()
    ]
