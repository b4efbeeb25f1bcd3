"""A study's method entry with its own settings: ``lora:r=64:rslora``, ``lora:targets=all-linear:r=7``.

    peftlab study --methods lora:r=4,lora:r=4:rslora,lora:r=64,lora:r=64:rslora --lr lora:r=64=1e-3,4e-3

A spec is a method name (or ``full``) followed by ``:key=value`` settings; a bare ``:rslora`` is
``use_rslora=True``. What each key sets:

    r=16, alpha=32           the method's rank and alpha (default: the study's --rank; alpha the method's)
    rslora                   rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    targets=all-linear       where the adapter goes: "all-linear", or module names joined by "+"
                             (targets=query+value)
    loraplus=16              LoRA+: B's learning rate is 16 x A's (Hayou et al. 2024)
    batch=64, steps=15       this cell's rows per step and optimizer steps (default: the study's)

The spec's text is the cell's method name everywhere (study.json, the summary, ``--lr``), so two
entries of one method are two rows of the study.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import ConfigError, closest

FULL = "full"  # full fine-tuning: every weight trains
ADAPTER_KEYS = ("r", "alpha", "targets", "rslora")  # settings of the adapter itself
TRAIN_KEYS = ("loraplus", "batch", "steps")  # settings of the cell's training
KEYS = ADAPTER_KEYS + TRAIN_KEYS
FLAGS = ("rslora",)  # keys written without a value


@dataclass(frozen=True)
class MethodSpec:
    """A parsed spec: the method, the keyword arguments of ``peftlab.adapt`` and of ``peftlab.train``."""

    text: str
    method: str
    adapt: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


def parse_spec(text: str) -> MethodSpec:
    """``"lora:r=64:rslora"`` -> MethodSpec("lora", adapt={"r": 64, "use_rslora": True}, train={})."""
    from peftlab.methods import METHODS

    method, *settings = [part.strip() for part in text.split(":")]
    known = (FULL, *METHODS)
    if method not in known:
        raise ConfigError(f"No method is called {method!r}.{closest(method, known)} "
                          f"Expected {FULL!r} or one of {', '.join(METHODS)}.")
    adapt: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if key not in KEYS or (not sep and key not in FLAGS) or (sep and key in FLAGS):
            raise ConfigError(f"{text!r}: cannot read the setting {setting!r}.{closest(key, KEYS)} Expected "
                              f"key=value with a key among {', '.join(k for k in KEYS if k not in FLAGS)}, or "
                              f"a bare {', '.join(FLAGS)}; e.g. lora:r=64:rslora.")
        if key in ADAPTER_KEYS and method == FULL:
            raise ConfigError(f"{text!r}: full fine-tuning has no adapter, so {key!r} sets nothing. Expected "
                              "only batch= or steps= on 'full'.")
        if key == "rslora":
            adapt["use_rslora"] = True
        elif key == "targets":
            adapt["targets"] = value if value == "all-linear" else tuple(v for v in value.split("+") if v)
        elif key == "loraplus":
            train["loraplus_lr_ratio"] = _number(text, key, value, float)
        elif key in ("batch", "steps"):
            train["batch_size" if key == "batch" else "steps"] = _number(text, key, value, int)
        else:
            adapt[key] = _number(text, key, value, int if key == "r" else float)
    if method != FULL:
        from peftlab.methods import get_method

        fields = get_method(method).config.field_names()
        unknown = sorted(k for k in adapt if k not in fields)
        if unknown:
            raise ConfigError(f"{text!r}: {method} has no setting {unknown[0]!r} (its settings: "
                              f"{', '.join(fields)}).")
    return MethodSpec(text, method, adapt, train)


def _number(text: str, key: str, value: str, kind: type) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{text!r}: {key}={value!r} is not {'an integer' if kind is int else 'a number'}.") from None
    if not number > 0:
        raise ConfigError(f"{text!r}: {key}={value!r} must be positive.")
    return number


__all__ = ["FULL", "KEYS", "MethodSpec", "parse_spec"]
