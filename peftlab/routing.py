"""Mixed batches: ``model(..., adapter_names=[...])`` runs example i with adapter i alone.

peft's way of serving several adapters in one batch (``"__base__"``: the plain base model for that
example). A forward pre-hook takes the keyword out of the call (a transformers model would
silently ignore it) and hands the names to every adapted layer for that call; each layer then
runs its rows grouped by adapter (peftlab/inject/adapter.py, ``AdaptedLayer.example_adapters``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from peftlab import inject
from peftlab.errors import ConfigError, UnknownNameError, closest
from peftlab.state import records

BASE = "__base__"  # the adapter name that means "no adapter" in a mixed batch (peft's name)


def check_names(model: nn.Module, names: Sequence[str], allow_base: bool = False) -> None:
    known = list(records(model))
    for name in names:
        if name not in known and not (allow_base and name == BASE):
            raise UnknownNameError(
                f"The model has no adapter named {name!r}.{closest(str(name), known)} Expected one of: "
                f"{', '.join(known) or '(none: add one with add_adapter or peftlab.adapt)'}"
                f"{' or ' + repr(BASE) + ' for the base model' if allow_base else ''}."
            )


@contextmanager
def adapters_per_example(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, example i of every batch runs adapter ``adapter_names[i]`` alone
    (``"__base__"``: the base model). The layers hold the names only for the block."""
    check_names(model, adapter_names, allow_base=True)
    layers = inject.adapted_layers(model).values()
    for layer in layers:
        layer.set_example_adapters(adapter_names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.set_example_adapters(None)


def enable_adapter_names(model: nn.Module) -> nn.Module:
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``
    route examples to adapters, as peft does. For a call, a forward pre-hook takes the keyword out
    (a transformers model would silently ignore it) and sets the names on the layers; a hook that
    runs even when the call fails clears them. For a generation, the model's ``generate`` is
    wrapped (an attribute of this model object) so that the names hold for every step.
    ``peftlab.adapt`` calls this for every reference model."""
    if not getattr(model, "_peftlab_adapter_names", False):
        model.register_forward_pre_hook(_names_before_call, with_kwargs=True)
        model.register_forward_hook(_names_after_call, always_call=True)
        if callable(getattr(type(model), "generate", None)):
            model.generate = GenerateWithNames(model)
        model._peftlab_adapter_names = True
    return model


class GenerateWithNames:
    """The model's own ``generate``, with example i of the batch run by ``adapter_names[i]`` at
    every step (the prompt's forward and each cached step alike). An object rather than a bound
    method, so that a deepcopy or a pickle of the model carries one that calls the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        generate = type(self.model).generate
        if adapter_names is None:
            return generate(self.model, *args, **kwargs)
        with adapters_per_example(self.model, list(adapter_names)):
            return generate(self.model, *args, **kwargs)


def _names_before_call(model: nn.Module, args: tuple, kwargs: dict):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return args, kwargs
    batch = _batch_size(args, kwargs)
    if batch is not None and len(names) != batch:
        raise ConfigError(
            f"adapter_names has {len(names)} entries but the batch has {batch} examples. Expected "
            "one adapter name (or '__base__') per example."
        )
    context = adapters_per_example(model, list(names))
    context.__enter__()
    model.__dict__["_peftlab_names_context"] = context  # closed by _names_after_call
    return args, kwargs


def _names_after_call(model: nn.Module, args: tuple, output):
    context = model.__dict__.pop("_peftlab_names_context", None)
    if context is not None:
        context.__exit__(None, None, None)
    return output


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, Tensor):
            return value.shape[0]
    return None
