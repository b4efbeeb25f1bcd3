"""Reading the update ΔW of an adapted layer (reference and peft backends), and the spectra of a model.

Which route a layer takes (:func:`adapter_singular_values`), first match wins: the adapter's own
``singular_values(base)``, its ``factors()``, else a full SVD of ``delta_weight(base)``. peft's
LoRA layers are read from ``lora_A``/``lora_B``/``scaling`` (DoRA from its magnitude vector);
other peft layers through ``get_delta_weight``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, Adapter, dense_weight, is_conv1d, matches
from peftlab.spectra.svd import Update, factored_svdvals, svdvals_of, working_copy


def _call_hook(hook: Any, base: nn.Module) -> Any:
    """Call ``factors()`` / ``singular_values()``, passing the base layer if the hook takes it
    (DoRA-like methods need the base weight; LoRA does not)."""
    return hook(base) if inspect.signature(hook).parameters else hook()


def _out_in(weight: Tensor, base: nn.Module, fan_in_fan_out: bool = False) -> Tensor:
    """A weight (or ΔW) of ``base`` in (d_out, d_in) layout: Conv1D and Embedding store it
    transposed."""
    transposed = fan_in_fan_out or is_conv1d(base) or isinstance(base, nn.Embedding)
    return weight.T if transposed else weight


def adapter_update(adapter: Adapter, base: nn.Module) -> Update:
    """A reference adapter's ΔW in (d_out, d_in) layout: its factors where it has them."""
    if hasattr(adapter, "factors"):
        left, right = _call_hook(adapter.factors, base)
        return left.detach(), right.detach()
    return _out_in(adapter.delta_weight(base).detach(), base)


def adapter_singular_values(adapter: Adapter, base: nn.Module) -> Tensor:
    """Singular values of one adapter's ΔW: its own hook, else its factors, else a full SVD."""
    if hasattr(adapter, "singular_values"):
        return working_copy(_call_hook(adapter.singular_values, base))
    return svdvals_of(adapter_update(adapter, base))


def is_peft_layer(module: nn.Module) -> bool:
    """True for a tuner layer of Hugging Face peft (it has ``get_delta_weight``)."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "get_delta_weight")


def _peft_update(layer: nn.Module, name: str) -> Update:
    """ΔW of one adapter of a peft tuner layer, in (d_out, d_in) layout."""
    base = layer.get_base_layer()
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    if name in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_embedding_A", {}):
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, d_in), (d_out, r)
        else:  # embedding: A (r, num_embeddings), B (dim, r): same roles, d_in = num_embeddings
            a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        left, right = working_copy(b) * layer.scaling[name], working_copy(a)
        magnitude = getattr(layer, "lora_magnitude_vector", {})
        if name not in magnitude:
            return left, right
        # DoRA: W' = m / ||W + s B A||_row · (W + s B A), so ΔW = W' - W is not low-rank
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise ConfigError(
                f"peft DoRA on a {type(base).__name__} layer normalises differently from the linear "
                "case peftlab reads. Expected DoRA on linear layers; try the spectrum of the "
                "reference backend (peftlab.adapt(model, 'dora', ...)) instead."
            )
        weight = working_copy(_out_in(dense_weight(base), base, fan_in_fan_out))  # (d_out, d_in)
        merged = weight + left @ right
        m = working_copy(magnitude[name].weight).reshape(-1, 1)  # (d_out, 1)
        return m / merged.norm(dim=1, keepdim=True) * merged - weight
    return _out_in(working_copy(layer.get_delta_weight(name)), base, fan_in_fan_out)


def base_weight(layer: nn.Module) -> Tensor:
    """The frozen base weight of an adapted layer (either backend) in (d_out, d_in) layout."""
    if isinstance(layer, AdaptedLayer):
        return working_copy(_out_in(dense_weight(layer.base_layer), layer.base_layer))
    base = layer.get_base_layer()
    return working_copy(_out_in(dense_weight(base), base, bool(getattr(layer, "fan_in_fan_out", False))))


def layer_update(layer: nn.Module, adapter_name: str | None = None) -> Update:
    """ΔW of one adapter (default: the active one) of an adapted layer of either backend."""
    if isinstance(layer, AdaptedLayer):
        name = adapter_name or layer.active[0]
        return adapter_update(layer.adapters[name], layer.base_layer)
    return _peft_update(layer, adapter_name or layer.active_adapters[0])


def _direction_update(layer: nn.Module, name: str) -> Update | None:
    """DoRA's direction update (s·B, A) of either backend; None for any other method."""
    if isinstance(layer, AdaptedLayer):
        adapter = layer.adapters[name]
        if not hasattr(adapter, "direction_factors"):
            return None
        left, right = adapter.direction_factors()
        return left.detach(), right.detach()  # already (d_out, r), (r, d_in), Conv1D included
    if name not in getattr(layer, "lora_magnitude_vector", {}) or name not in getattr(layer, "lora_A", {}):
        return None
    return working_copy(layer.lora_B[name].weight) * layer.scaling[name], working_copy(layer.lora_A[name].weight)


# what spectrum(part=...) can read: the whole weight change, or DoRA's direction update
PARTS = ("weight", "direction")


def layers_with_update(
    model: nn.Module, adapter_name: str | None, layers: str | Sequence[str] | None
) -> Iterator[tuple[str, nn.Module, str]]:
    """(module name, adapted layer, adapter name) for every layer carrying the adapter."""
    for name, module in model.named_modules():
        if layers is not None and not matches(name, layers):
            continue
        if isinstance(module, AdaptedLayer):
            chosen = adapter_name or (module.active[0] if module.active else None)
            if chosen in module.adapters and module.adapters[chosen].mergeable:
                yield name, module, chosen
        elif is_peft_layer(module):
            chosen = adapter_name or (module.active_adapters[0] if module.active_adapters else None)
            if chosen is not None and any(chosen in getattr(module, attr, {})
                                          for attr in module.adapter_layer_names):
                yield name, module, chosen


@torch.no_grad()
def spectrum(
    model: nn.Module,
    adapter_name: str | None = None,
    layers: str | Sequence[str] | None = None,
    part: str = "weight",
) -> dict[str, Tensor]:
    """Singular values of ΔW for every adapted layer: ``{layer name: 1-D tensor, descending}``.

    Args:
        model: a model adapted with ``peftlab.adapt`` (either backend: a peft ``PeftModel`` works).
        adapter_name: which adapter; default the active one of each layer.
        layers: only these layers: a regex (full match) or a list of names / name suffixes,
            the same rule as ``targets``.
        part: ``"weight"``: the change of the effective weight W' - W0; ``"direction"``: for
            DoRA layers the low-rank direction update s·B A, from its factors (other methods
            have no separate direction, so both parts are the same for them).

    Returns:
        Names as in ``model.named_modules()``. A factorised update gives k values (k = its
        inner rank, r for LoRA; every further singular value of ΔW is exactly zero); a full SVD
        gives min(d_out, d_in). float32 (float64 stays float64), on the CPU.
    """
    if part not in PARTS:
        raise ConfigError(f"Unknown part={part!r}. Expected one of {PARTS}: 'weight' (W' - W0) or "
                          "'direction' (DoRA's low-rank direction update s·B A).")
    out = {}
    for name, layer, chosen in layers_with_update(model, adapter_name, layers):
        direction = _direction_update(layer, chosen) if part == "direction" else None
        if direction is not None:
            values = factored_svdvals(*direction)
        elif isinstance(layer, AdaptedLayer):
            values = adapter_singular_values(layer.adapters[chosen], layer.base_layer)
        else:
            values = svdvals_of(_peft_update(layer, chosen))
        out[name] = values.cpu()
    if not out:
        raise ConfigError(
            "Found no adapted layer with a weight update in this model"
            + (f" matching layers={layers!r}" if layers is not None else "")
            + (f" for adapter {adapter_name!r}" if adapter_name else "")
            + ". Expected a model returned by peftlab.adapt(...) with a weight-space method "
            "(LoRA, DoRA, LoHa, ...); prompt methods have no ΔW. Try peftlab.adapt(model, 'lora')."
        )
    return out
