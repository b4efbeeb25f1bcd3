"""The one shared injector: find target layers, wrap them, freeze the rest, merge and unmerge.

Every weight-space method (LoRA, DoRA, LoHa, ...) is written as an :class:`Adapter`: a small
module that, given a layer's input ``x`` and the frozen base layer's output, returns the adapted
output. The injector does the rest, the same way for every method and every model:

    model.layers.0.self_attn.q_proj            nn.Linear (frozen)
                     │ inject(...)
                     ▼
    model.layers.0.self_attn.q_proj            AdaptedLayer
        ├── base_layer                         nn.Linear (frozen, untouched)
        └── adapters["default"]                e.g. LoRA: lora_A (r, d_in), lora_B (d_out, r)

    AdaptedLayer.forward(x) = adapter(x, base_layer, base_layer(x))  for each active adapter

A method that changes what the base layer *sees* (OFT and BOFT rotate its inputs) may also define
``layer_forward(x, base_layer)``, which runs the base layer itself: h = W0 (R^T x) + b, the
paper's equation and peft's order of operations. It is used when that adapter runs first.

Several named adapters can sit on one layer; ``active`` says which run. Merging adds each
adapter's ``delta_weight()`` into the base weight, so a merged model runs at base speed.
Nothing here knows any particular model: targets are found by module name and type.

The package: layers.py (what a layer is: kinds, shapes, running it with another weight),
adapter.py (the Adapter contract, AdaptedLayer, TrainableCopy), targets.py (finding targets),
and here the whole-model operations (inject, freeze, merge, unmerge, disable, activate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.inject.adapter import AdaptedLayer, Adapter, LinearAdapter, TrainableCopy, base_of, overrides  # noqa: F401
from peftlab.inject.layers import (CONV_LAYERS, ConvShape, apply_weight, check_zero_padding,  # noqa: F401
                                   conv_shape, conv_with, dense_weight, embed_scale, is_conv, is_conv1d,
                                   is_linear, is_quantized, layer_dims, matrix_dims)
from peftlab.inject.targets import Targets, candidate_modules, find_targets, matches, output_head_names  # noqa: F401

# --------------------------------------------------------------------------------------------
# Injecting, freezing, and whole-model operations
# --------------------------------------------------------------------------------------------
def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(
    model: nn.Module,
    names: Iterable[str],
    make_adapter: Callable[[str, nn.Module], Adapter],
    adapter_name: str = "default",
) -> list[AdaptedLayer]:
    """Wrap each named module in an AdaptedLayer (once) and add ``make_adapter(name, base)``."""
    layers = []
    for name in names:
        module = model.get_submodule(name)
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
        if adapter_name in layer.adapters:
            raise ConfigError(
                f"Layer {name!r} already has an adapter named {adapter_name!r}. Expected a new "
                "name; try adapter_name='other', or delete the old adapter first."
            )
        try:
            adapter = make_adapter(name, layer.base_layer)
        except ConfigError as err:  # say which layer: "the layer is 32 x 64" alone is a riddle
            raise ConfigError(f"Layer {name!r}: {err}") from err
        weight = getattr(layer.base_layer, "weight", None)
        if weight is not None and not is_quantized(weight) and weight.is_floating_point():
            adapter.to(device=weight.device)
        else:
            adapter.to(device=next(layer.base_layer.parameters()).device)
        layer.adapters[adapter_name] = adapter
        layer.active = [adapter_name]
        if layer is not module:
            set_module(model, name, layer)
        layers.append(layer)
    return layers


def default_modules_to_save(model: nn.Module) -> tuple[str, ...]:
    """A sequence-classification model's new head must train with the adapter (peft does the
    same for task_type SEQ_CLS): its weights are random, not pretrained."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return tuple(n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module))
    return ()


def modules_to_save_paths(model: nn.Module, entries: Iterable[str]) -> tuple[str, ...]:
    """The modules peft trains whole for ``modules_to_save`` entries: every module whose full
    name ends with an entry, compared as plain strings (peft's rule: so "classifier" also takes
    DistilBERT's "pre_classifier", the first layer of its new head). Entries that match nothing
    are dropped, as peft does: for SEQ_CLS it lists both "classifier" and "score"."""
    found: dict[str, None] = {}
    for entry in entries:
        for name in candidate_modules(model):
            if name.endswith(entry):
                found.setdefault(name, None)
    return tuple(found)


def wrap_modules_to_save(model: nn.Module, names: Iterable[str], adapter_name: str) -> None:
    """Give each named module a trainable copy for this adapter (peft's modules_to_save)."""
    for name in names:
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
        wrapper.add(adapter_name)
        if wrapper is not module:
            set_module(model, name, wrapper)


def freeze_all_but_adapters(model: nn.Module, adapter_name: str | None = None) -> None:
    """requires_grad only for the parameters of one adapter (default: every adapter) and of its
    trainable copies; the base model and other adapters stay frozen."""
    tags = [""] if adapter_name is None else [adapter_name + "."]
    if adapter_name is not None:  # an adapter may train others with it (X-LoRA's experts)
        for layer in adapted_layers(model).values():
            if adapter_name in layer.adapters:
                tags += [n + "." for n in getattr(layer.adapters[adapter_name], "trains_with", ())]
    for name, param in model.named_parameters():
        param.requires_grad = any(f".adapters.{t}" in name or f".copies.{t}" in name for t in set(tags))


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """{module name: AdaptedLayer} for every adapted layer in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight (outputs unchanged, base speed)."""
    layers = adapted_layers(model)
    tied = _tied_parameter_ids(model)
    for name, layer in layers.items():
        weight = getattr(layer.base_layer, "weight", None)
        mergeable = all(layer.adapters[a].mergeable for a in layer.active)  # else layer.merge says why
        if layer.active and mergeable and weight is not None and id(weight) in tied:
            raise ConfigError(
                f"Cannot merge into {name!r}: its weight is tied to another module (typically the "
                "input embedding shared with the output head), so merging would change both. "
                "Expected an untied weight. Keep the adapter unmerged, or untie first (e.g. "
                "model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone()))."
            )
    for layer in layers.values():
        layer.merge()
    return model


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters owned by more than one module (tied weights)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    for layer in adapted_layers(model).values():
        layer.unmerge()
    return model


def set_disabled(model: nn.Module, disabled: bool) -> None:
    """Switch every adapter off (the model is then exactly the base model) or back on. Disabling
    a merged model unmerges it first (as peft's disable_adapter does): the only place besides
    :func:`unmerge` where weights change back; the forward never does."""
    for module in model.modules():
        if isinstance(module, AdaptedLayer) and disabled and module.merged:
            module.unmerge()
        if isinstance(module, (AdaptedLayer, TrainableCopy)):
            module.disabled = disabled


def set_active(model: nn.Module, adapter_name: str) -> None:
    """Make one named adapter the only active one, model-wide (as peft's ``set_adapter``):
    layers that lack it run their base layer alone. A merged layer is unmerged first (peft's
    set_adapter does the same): the merged updates belong to the adapters that were active."""
    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            if module.merged:
                module.unmerge()
            module.active = [adapter_name] if adapter_name in module.adapters else []
        elif isinstance(module, TrainableCopy):
            module.active = [adapter_name] if adapter_name in module.copies else []
