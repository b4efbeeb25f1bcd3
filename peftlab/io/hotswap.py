"""Many adapters on one base: load N from disk, and hot-swap one in place.

Serving keeps one base model in memory and changes which small adapters sit on it. Two ways:

    load_adapters(model, {"alice": "adapters/alice", "bob": "adapters/bob"})   # N named adapters
    model.generate(**batch, adapter_names=["alice", "bob", ...])               # one per example

    prepare_hotswap(model, target_rank=32)        # once: pad every LoRA to rank 32 with zeros
    hotswap_adapter(model, "adapters/carol", "alice")   # carol's weights into alice's tensors

A hot-swap copies the new adapter's tensors into the loaded adapter's own tensors (``copy_``): no
new tensor is allocated, so whatever holds them - an optimiser, a compiled graph, the fused
backend's gathered factors, which notice the write - keeps working. It follows peft's
``hotswap_adapter`` (peft 0.21.2, peft/utils/hotswap.py): a new adapter of smaller rank fills the
first r rows of A and columns of B and zeros the rest (exact: a zero row of A meets a zero column
of B); a larger rank needs room made first by :func:`prepare_hotswap` (peft's
``prepare_model_for_compiled_hotswap``); the scaling alpha / r is the new adapter's; a layer the
old adapter adapts and the new one does not gets zeros; a layer only the new one adapts is refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from peftlab.errors import AdapterFileError, ConfigError
from peftlab.inject import adapted_layers
from peftlab.io.files import adapter_folder, read_adapter_config, read_adapter_weights
from peftlab.state import records, replace_config


def load_adapters(model: nn.Module, paths: Mapping[str, str | os.PathLike]) -> nn.Module:
    """Load several saved adapters onto one base model, each under its name (``{name: folder}``);
    the last one loaded is active. All or nothing: if one fails, those loaded here are removed."""
    from peftlab.compose import delete_adapter
    from peftlab.io import load_adapter

    if not paths:
        raise ConfigError("load_adapters got no adapters. Expected {name: folder}, e.g. {'alice': 'adapters/alice'}.")
    loaded: list[str] = []
    try:
        for name, path in paths.items():
            load_adapter(model, path, adapter_name=name)
            loaded.append(name)
    except BaseException:
        for name in reversed(loaded):
            delete_adapter(model, name)
        raise
    return model


def lora_adapters(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """{layer path: LoRA adapter} of ``adapter_name``; a clear error if it is not a plain LoRA."""
    from peftlab.methods.lora import LoRA

    record = records(model).get(adapter_name)
    if record is None:
        raise ConfigError(f"The model has no adapter named {adapter_name!r}. Expected one of: "
                          f"{', '.join(records(model)) or '(none)'}.")
    layers = {path: layer for path, layer in adapted_layers(model).items() if adapter_name in layer.adapters}
    for path, layer in layers.items():
        if adapter_name in layer.merged:
            raise ConfigError(f"Adapter {adapter_name!r} is merged into {path}, so its tensors are not what the "
                              "layer computes with. Expected it unmerged; try peftlab.unmerge(model) first.")
        if type(layer.adapters[adapter_name]) is not LoRA or layer.adapters[adapter_name].lora_B_bias is not None:
            raise ConfigError(
                f"Hot-swapping takes LoRA adapters on linear layers (as peft's), but {adapter_name!r} is "
                f"{record.method} with a {type(layer.adapters[adapter_name]).__name__} on {path}. Expected a "
                "'lora' adapter without lora_bias; try load_adapter under a new name instead.")
    return {path: layer.adapters[adapter_name] for path, layer in layers.items()}


def _padded_config(config, rank: int, scaling: float):
    """The config that describes LoRA tensors of rank ``rank`` computing with ``scaling``."""
    if rank == config.r:
        return config
    return dataclasses.replace(config, r=rank, alpha=scaling * (math.sqrt(rank) if config.use_rslora else rank))


@torch.no_grad()
def prepare_hotswap(model: nn.Module, target_rank: int, adapter_name: str | None = None) -> nn.Module:
    """Pad LoRA adapters (``adapter_name``, or every one) to rank ``target_rank`` with zeros, so
    that adapters of any rank up to it can be hot-swapped in later without a new allocation.
    The outputs do not change: the padded rows of A and columns of B are zero."""
    names = [adapter_name] if adapter_name is not None else list(records(model))
    plan = {name: lora_adapters(model, name) for name in names}
    for name, adapters in plan.items():
        ranks = {a.lora_A.shape[0] for a in adapters.values()}
        if target_rank < max(ranks):
            raise ConfigError(f"target_rank={target_rank} is below adapter {name!r}'s rank {max(ranks)}. "
                              f"Expected the largest rank you will swap in, at least {max(ranks)}.")
    for name, adapters in plan.items():
        for adapter in adapters.values():
            r = adapter.lora_A.shape[0]
            A = adapter.lora_A.new_zeros(target_rank, adapter.lora_A.shape[1])
            B = adapter.lora_B.new_zeros(adapter.lora_B.shape[0], target_rank)
            A[:r], B[:, :r] = adapter.lora_A, adapter.lora_B
            grad = adapter.lora_A.requires_grad
            adapter.lora_A, adapter.lora_B = nn.Parameter(A, grad), nn.Parameter(B, grad)
            adapter.r = target_rank
        config = records(model)[name].config
        replace_config(model, name, _padded_config(config, target_rank, config.scaling))
    forget_gathered(model)
    return model


def forget_gathered(model: nn.Module) -> None:
    """Every adapted layer drops what it keeps of a mixed batch's factors (AdaptedLayer.forget_gathered)."""
    for layer in adapted_layers(model).values():
        layer.forget_gathered()


@torch.no_grad()
def hotswap_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Replace the weights of the loaded LoRA adapter ``adapter_name`` by those of the adapter
    saved in ``path``, in place (same tensors, no reallocation); it keeps its name.

    Raises:
        AdapterFileError: the saved adapter is not LoRA, adapts a layer this one does not, or
            has a larger rank than the loaded tensors (try prepare_hotswap first). On any
            error nothing has changed.
    """
    from peftlab.io import saved_config
    from peftlab.production.hf_peft import reference_to_peft_names, saved_name

    folder = adapter_folder(path)
    method, config = saved_config(read_adapter_config(folder), folder)
    adapters = lora_adapters(model, adapter_name)
    if method != "lora" or config.lora_bias or config.target_parameters or config.trainable_token_indices:
        raise AdapterFileError(f"{folder} holds a {method} adapter with options hot-swapping cannot take. "
                               "Expected a plain LoRA adapter (as peft's hotswap_adapter); try load_adapter "
                               "under a new name instead.")
    state = read_adapter_weights(folder)
    params = dict(model.named_parameters())
    on_disk = {saved_name(theirs, adapter_name): ours
               for ours, theirs in reference_to_peft_names(model, adapter_name).items()}
    unexpected = sorted(set(state) - set(on_disk))
    if unexpected:
        raise AdapterFileError(f"{folder} adapts layers the loaded adapter {adapter_name!r} does not, first "
                               f"{unexpected[0]!r}. Expected the same or fewer target layers; try load_adapter "
                               "under a new name, or load the base model again.")
    for key, ours in on_disk.items():
        if key in state and not _fits(state[key], params[ours]):
            raise AdapterFileError(
                f"{key} of {folder} has shape {tuple(state[key].shape)}, which does not fit the loaded "
                f"{tuple(params[ours].shape)} without a new allocation. Expected rank at most "
                f"{max(a.lora_A.shape[0] for a in adapters.values())}; try "
                "peftlab.prepare_hotswap(model, target_rank=<the largest rank>) before the first swap.")
    for key, ours in on_disk.items():
        _copy_padded(params[ours], state.get(key))
    for adapter in adapters.values():
        adapter.scaling = config.scaling
    forget_gathered(model)
    rank = next(iter(adapters.values())).lora_A.shape[0]
    swapped = dataclasses.replace(config, targets=records(model)[adapter_name].config.targets)
    replace_config(model, adapter_name, _padded_config(swapped, rank, config.scaling))
    return model


def _fits(new: Tensor, old: Tensor) -> bool:
    return new.dim() == old.dim() and all(n <= o for n, o in zip(new.shape, old.shape))


def _copy_padded(old: Tensor, new: Tensor | None) -> None:
    """old = new in its leading corner and zeros elsewhere (old all zeros when new is None)."""
    if new is not None and new.shape == old.shape:
        old.copy_(new)
        return
    old.zero_()
    if new is not None:
        old[tuple(slice(0, n) for n in new.shape)].copy_(new)


__all__ = ["load_adapters", "prepare_hotswap", "hotswap_adapter", "lora_adapters", "forget_gathered"]
