"""The run's adapter as peft config source code, e.g. ``LoraConfig(r=8, ...)``, for the exported script.

The peftlab config in ``run.json`` goes through peft's own config class (the translation
``backend="peft"`` uses), and the fields that differ from that class's defaults are written out as
Python literals, in the double-quoted style of the rest of the script.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from peftlab.errors import ConfigError

# Fields of a peft config that are bookkeeping, not hyperparameters.
_PEFT_BOOKKEEPING = {"peft_type", "peft_version", "base_model_name_or_path", "revision",
                     "inference_mode", "auto_mapping"}
# Shown even when equal to peft's default: the numbers a reader looks for first.
_ALWAYS_SHOWN = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type",
                 "num_virtual_tokens")


def peft_config_source(run: dict[str, Any], classification: bool) -> tuple[str, str]:
    """The run's adapter as peft config source code, e.g. ``LoraConfig(r=8, ...)``, and the class name.

    The peftlab config in ``run.json`` goes through :func:`peftlab.production.hf_peft.to_peft_config`
    (the same translation ``backend="peft"`` uses); fields left at peft's defaults are omitted,
    except the few a reader looks for first (rank, alpha, dropout, targets, task type).
    """
    from peftlab.api import make_config
    from peftlab.methods import get_method
    from peftlab.production.hf_peft import to_peft_config

    spec = get_method(run["args"]["method"])
    if spec.peft_type is None:
        raise ConfigError(
            f"peft has no {spec.name!r} method, so a transformers + peft script cannot repeat this "
            "run. Expected a method peft implements (lora, dora, loha, lokr, ia3, oft, vera, "
            "prompt tuning, ...); keep training it with peftlab."
        )
    config = make_config(spec, None, **run["method_config"])
    task = "SEQ_CLS" if classification else "CAUSAL_LM"
    peft_config = to_peft_config(spec, config, task_type=task)
    return _config_literal(peft_config), type(peft_config).__name__


def _config_literal(config: Any) -> str:
    """``LoraConfig(\\n    r=8,\\n    ...\\n)``: the fields that differ from the class defaults."""
    lines = []
    for field in dataclasses.fields(config):
        if not field.init or field.name in _PEFT_BOOKKEEPING:
            continue
        value = getattr(config, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if field.name not in _ALWAYS_SHOWN and _same(value, default):
            continue
        if field.name in _ALWAYS_SHOWN and value is None and default is None:
            continue
        lines.append(f"    {field.name}={_literal(value)},")
    return f"{type(config).__name__}(\n" + "\n".join(lines) + "\n)"


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 (tensors and odd types: show them)
        return False


def _literal(value: Any) -> str:
    """Python source for a config value: sets become sorted lists, enums their string value."""
    import enum

    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, (set, frozenset)):
        return _literal(sorted(value))
    if isinstance(value, tuple):
        return _literal(list(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return string_literal(value)
    return repr(value)


def string_literal(text: str) -> str:
    """A string literal in double quotes (the style of the rest of the script)."""
    return json.dumps(text) if text.isprintable() and "\\" not in text else repr(text)


__all__ = ["peft_config_source", "string_literal"]
