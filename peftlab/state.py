"""One adapter-state object per model: what adapters exist, which one is active, and what the
methods hooked into training.

Everything peftlab knows about a model beyond its modules lives in one place, ``model.peftlab``
(an :class:`AdapterState`), instead of loose attributes on the user's model:

    state = state_of(model)          # created on first use
    state.records                    # {adapter name: AdapterRecord(method, config)}, in order added
    state.active                     # the adapter that runs and trains (None: none yet)
    state.backend                    # "reference" or "fused" (peftlab/production/fused/)
    state.loss_terms                 # {key: fn(model) -> loss}: added to the training loss
    state.after_step                 # {key: fn(model, step)}: run after each optimizer step
    state.method_state               # {key: object}: what a method keeps between steps (AdaLoRA)

A method registers its loss term or after-step hook here when it is built (AdaLoRA's orthogonal
regulariser and rank allocation); ``peftlab.train`` only reads these tables. A peft model gets an
AdapterState too when peftlab trains it with such hooks.

:class:`Snapshot` is the injector's undo: taken before adding an adapter, ``restore`` takes out
everything that call added (wrappers, adapters, records) when it fails halfway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, TrainableCopy, set_module

if TYPE_CHECKING:  # annotations only: configs are the methods' (the layer above)
    from peftlab.methods.base import AdapterConfig

STATE = "peftlab"  # the attribute on the model that holds its AdapterState


@dataclass(frozen=True)
class AdapterRecord:
    """What peftlab remembers about one named adapter on a model (reference backend)."""

    method: str
    config: AdapterConfig


@dataclass
class AdapterState:
    """A model's adapters and training hooks (module docstring)."""

    records: dict[str, AdapterRecord] = field(default_factory=dict)  # name -> record, in order added
    active: str | None = None  # the adapter that runs and trains
    backend: str = "reference"  # "fused" once peftlab.production.fused.fuse ran
    loss_terms: dict[str, Callable[[nn.Module], Any]] = field(default_factory=dict)
    after_step: dict[str, Callable[[nn.Module, int], None]] = field(default_factory=dict)
    method_state: dict[str, Any] = field(default_factory=dict)


def state_of(model: nn.Module) -> AdapterState:
    """The model's AdapterState, created (empty) on first use."""
    state = model.__dict__.get(STATE)
    if state is None:
        state = model.__dict__[STATE] = AdapterState()
    return state


def peek(model: nn.Module) -> AdapterState | None:
    """The model's AdapterState if it has one (never creates it)."""
    return model.__dict__.get(STATE)


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    """{adapter name: AdapterRecord} of the reference adapters on ``model`` (a copy)."""
    state = peek(model)
    return dict(state.records) if state else {}


def active_name(model: nn.Module) -> str | None:
    """The active adapter's name, or None when the model has no peftlab adapter."""
    state = peek(model)
    return state.active if state and state.records else None


def active_record(model: nn.Module) -> tuple[str, AdapterRecord]:
    """(name, record) of the active adapter; a clear error when the model has none."""
    recs = records(model)
    if not recs:
        raise ConfigError(
            "This model has no peftlab adapter. Expected a model returned by peftlab.adapt(...) "
            "or peftlab.load_adapter(...). Try peftlab.adapt(model, 'lora') first."
        )
    name = peek(model).active or next(iter(recs))
    return name, recs[name]


def add_record(model: nn.Module, adapter_name: str, method: str, config: AdapterConfig) -> None:
    """Remember a new adapter and make it the active one."""
    state = state_of(model)
    state.records[adapter_name] = AdapterRecord(method, config)
    state.active = adapter_name


def replace_config(model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
    """Record that adapter ``adapter_name`` is now described by ``config`` (same method): a
    hot-swap or a rank padding changed its tensors in place."""
    state = state_of(model)
    state.records[adapter_name] = AdapterRecord(state.records[adapter_name].method, config)


class Snapshot:
    """Enough of a model's adapter state to take a failed add or load back out again."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.requires_grad = {p: p.requires_grad for p in model.parameters()}
        # wrapper -> (its active list, the adapter names it held) before the call
        self.wrappers = {
            id(m): (list(m.active), set(m.adapters if isinstance(m, AdaptedLayer) else m.copies))
            for m in model.modules()
            if isinstance(m, (AdaptedLayer, TrainableCopy))
        }
        state = peek(model)
        self.state = None if state is None else copy.copy(state)
        if state is not None:  # the tables are copied, their entries shared
            for name in ("records", "loss_terms", "after_step", "method_state"):
                setattr(self.state, name, dict(getattr(state, name)))

    def restore(self, adapter_name: str) -> None:
        for path, module in list(self.model.named_modules()):
            if not isinstance(module, (AdaptedLayer, TrainableCopy)):
                continue
            container = module.adapters if isinstance(module, AdaptedLayer) else module.copies
            active, held = self.wrappers.get(id(module), (None, set()))
            added = adapter_name in container and adapter_name not in held
            if added and isinstance(module, AdaptedLayer):
                container[adapter_name].release()  # hooks it keeps outside the layer, if any
            if active is None:  # wrapped by this call: put the original back
                original = module.base_layer if isinstance(module, AdaptedLayer) else module.original_module
                set_module(self.model, path, original)
                continue
            if added:
                del container[adapter_name]
            module.active = active
        for param, flag in self.requires_grad.items():
            param.requires_grad = flag
        self.model.__dict__.pop(STATE, None)
        if self.state is not None:
            self.model.__dict__[STATE] = self.state
