"""Deploying an adapter: unload it into a plain model, and what merging into a stored format keeps.

    merged = deploy.unload(model)          # W <- W + ΔW in every adapted layer, then plain modules
    merged.save_pretrained("out")          # transformers' own files: no peftlab, no peft to load them

Merging writes ``W' = W + ΔW`` (LoRA: ``ΔW = (alpha / r) B A``) into the base weight, so the model
runs at the base model's speed with no adapter code. :func:`unload` does what peft's
``merge_and_unload`` does: merge the active adapter, drop the others, and put every layer's
original module back, so the result is the model class you started from.

A merged weight is *stored*, though, and storage rounds. The weight a deployed model holds is
``round(W + ΔW)`` in its format: exact in float32, to 8 significant bits in bfloat16, and to one of
16 levels per block of 64 in NF4 (Dettmers et al. 2023, QLoRA, https://arxiv.org/abs/2305.14314).
An update smaller than half the format's step at an entry does not move that entry at all. With
``change = round(W + ΔW) - W`` (W already on the format's grid),

    retained(ΔW) = <change, ΔW> / <ΔW, ΔW>         1: every bit of the update is there; 0: none

:func:`merge_stored` and :func:`retained_fraction` measure it, :func:`grid_step` gives the format's
step at every entry (the yardstick an update is measured against).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError, closest

FORMATS = ("fp32", "bf16", "nf4")  # what a merged weight can be stored as
NF4_BLOCKSIZE = 64  # bitsandbytes' and QLoRA's block of one absmax


def unload(model: nn.Module, merge: bool = True, store: str | None = None) -> nn.Module:
    """The plain model: with ``merge``, the active adapter folded into the base weights (peft's
    ``merge_and_unload``); without, the adapters dropped and the base model given back (peft's
    ``unload``). Works in place and returns the model, whose modules are again its own class's
    (``nn.Linear``, ...), with no peftlab state and its class's own ``save_pretrained``.

    ``store`` picks the format the deployed model keeps its weights in, each merged weight computed
    in float32 as W + ΔW and rounded once (with ``merge=False``, "fp32" or "bf16": the base model
    alone, dequantised):

        None    the base's own (a 4-bit base is refused: merging would re-quantise it)
        "fp32"  float32; a 4-bit (NF4) base is dequantised first: a QLoRA adapter's usual deployment
        "bf16"  bfloat16, the whole model
        "nf4"   the merged weights re-quantised to NF4 (blocks of 64), as peft's merge into a
                bitsandbytes 4-bit layer does: an update smaller than the NF4 step is lost

    A method that cannot be merged (prefix tuning, bottleneck adapters, soft prompts) keeps running
    at inference; asking to merge it is an error that says so.
    """
    from peftlab import api, compose
    from peftlab.inject import AdaptedLayer, TrainableCopy, set_module
    from peftlab.state import STATE, peek

    if type(model).__module__.startswith("peft."):  # a peft model: peft's own way
        return model.merge_and_unload() if merge else model.unload()
    state = peek(model)
    if state is None or not state.records:
        raise ConfigError("This model has no peftlab adapter to unload. Expected a model returned by "
                          "peftlab.adapt(...) or peftlab.load_adapter(...); try peftlab.adapt(model, 'lora').")
    if state.backend != "reference":
        raise ConfigError(f"The model runs on the {state.backend!r} backend. Expected the reference backend; "
                          "try peftlab.production.fused.unfuse(model) first.")
    if store is not None:
        _check_format(store)
        if store == "nf4" and not merge:
            raise ConfigError("store='nf4' re-quantises merged weights, but merge=False merges nothing. "
                              "Expected merge=True with store='nf4' (or merge=False with store='fp32' or 'bf16': "
                              "the base model, dequantised).")
    active = state.active
    if merge:
        from peftlab.methods import METHODS

        spec = METHODS[state.records[active].method]
        if not spec.mergeable:
            raise ConfigError(
                f"The active adapter {active!r} ({spec.name}) cannot be merged into the base weights: it "
                "adds computation that keeps running at inference. Expected a mergeable method (lora, ia3, "
                "dora, ...). Keep it as an adapter (peftlab.save_adapter), or unload(model, merge=False) "
                "to drop it.")
    for name in [n for n in state.records if not merge or n != active]:
        compose.delete_adapter(model, name)  # hooks outside the layers go with it
    if merge:
        if store is None:
            api.merge(model)  # only the active adapter is left
        for name, module in list(model.named_modules()):
            if isinstance(module, AdaptedLayer):  # its weight now holds W + ΔW
                set_module(model, name, module.base_layer if store is None else _merged_layer(name, module, active, store))
            elif isinstance(module, TrainableCopy):  # a trained head (modules_to_save): keep the trained copy
                set_module(model, name, module.copies[active] if active in module.copies else module.original_module)
    model.__dict__.pop(STATE, None)
    model.__dict__.pop("save_pretrained", None)  # the class's own again (transformers' full model)
    if store in ("fp32", "bf16"):  # the layers no adapter touched: dequantised too, then one dtype throughout
        from peftlab.quant.nf4 import Linear4bitRef

        for name, module in list(model.named_modules()):
            if isinstance(module, Linear4bitRef):
                set_module(model, name, _linear(module.weight.float(), module.bias, torch.float32))
        model.to(torch.float32 if store == "fp32" else torch.bfloat16)
    return model


def _linear(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    layer.weight.data.copy_(weight)
    layer.weight.requires_grad_(False)
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
        layer.bias.requires_grad_(False)
    return layer


@torch.no_grad()
def _merged_layer(name: str, layer: nn.Module, adapter_name: str, fmt: str) -> nn.Module:
    """A plain layer holding round_fmt(W + ΔW), the sum in float32 (NF4: a Linear4bitRef again)."""
    from peftlab.inject.adapter import overrides
    from peftlab.quant.nf4 import Linear4bitRef

    base, adapter = layer.base_layer, layer.adapters[adapter_name]
    if type(base) not in (nn.Linear, Linear4bitRef) or overrides(adapter, "merge_into"):
        raise ConfigError(f"{name}: store= merges one weight delta into a linear layer (nn.Linear or peftlab's "
                          f"NF4 Linear4bitRef), but this layer is {type(base).__name__} with a {type(adapter).__name__}. "
                          "Expected a linear base; try unload(model) without store=.")
    merged = base.weight.float() + adapter.delta_weight(base).float()  # (d_out, d_in), in float32
    bias = base.bias
    bias_delta = adapter.delta_bias(base)
    if bias_delta is not None:
        bias = (bias.float() if bias is not None else 0) + bias_delta.float()
    if fmt != "nf4":
        return _linear(merged, bias, torch.float32)  # unload() casts the whole model to the format's dtype
    double = isinstance(base, Linear4bitRef) and base.absmax2 is not None
    blocksize = base.blocksize if isinstance(base, Linear4bitRef) else NF4_BLOCKSIZE
    compute = base.compute_dtype if isinstance(base, Linear4bitRef) else None
    return Linear4bitRef.from_linear(_linear(merged, bias, torch.float32), "nf4", blocksize, double, compute)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown storage format {fmt!r}.{closest(str(fmt), FORMATS)} Expected one of: "
                          f"{', '.join(FORMATS)}.")


def stored(w: Tensor, fmt: str) -> Tensor:
    """``w`` as a model stored in ``fmt`` holds it, back in float32 (NF4: blocks of 64, fp32 absmax,
    no double quantisation - bitsandbytes' default)."""
    from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4

    _check_format(fmt)
    w = w.detach().float()
    if fmt == "fp32":
        return w.clone()
    if fmt == "bf16":
        return w.to(torch.bfloat16).float()
    return dequantize_nf4(*quantize_nf4(w, NF4_BLOCKSIZE, double_quant=False), torch.float32)


def merge_stored(w: Tensor, delta: Tensor, fmt: str) -> Tensor:
    """The weight a model stored in ``fmt`` holds after merging ``delta``: ``stored(stored(w) + delta)``
    (a 4-bit base is dequantised, the update added, the sum quantised again, as peft's merge into a
    bitsandbytes layer does)."""
    if delta.shape != w.shape:
        raise ConfigError(f"ΔW has shape {tuple(delta.shape)} but the weight {tuple(w.shape)}. Expected the same "
                          "shape; try layer.delta_weight() of the layer whose weight this is.")
    return stored(stored(w, fmt) + delta.detach().float(), fmt)


def retained_fraction(delta: Tensor, change: Tensor) -> float:
    """How much of ``delta`` a stored ``change`` carries: <change, ΔW> / <ΔW, ΔW> (float64 sums)."""
    delta, change = delta.detach().double(), change.detach().double()
    norm = (delta * delta).sum()
    if norm == 0:
        raise ConfigError("ΔW is all zeros, so no fraction of it can be kept or lost. Expected a trained "
                          "update; a fresh LoRA has B = 0 - train it, or give B random values.")
    return float((change * delta).sum() / norm)


def grid_step(w: Tensor, fmt: str) -> Tensor:
    """The format's step at every entry of the stored ``w``: the mean distance to the two neighbouring
    values it can hold (bf16: one unit in the last place; NF4: absmax times the code's local gap)."""
    from peftlab.quant.nf4 import normal_float_code

    _check_format(fmt)
    w = w.detach().float()
    if fmt == "fp32":
        return torch.finfo(torch.float32).eps * w.abs().clamp(min=torch.finfo(torch.float32).tiny)
    if fmt == "bf16":
        exponent = torch.floor(torch.log2(w.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)))
        return torch.exp2(exponent - 7)  # 7 stored mantissa bits
    code = normal_float_code()  # 16 levels in [-1, 1]
    gaps = code[1:] - code[:-1]
    local = torch.cat([gaps[:1], (gaps[1:] + gaps[:-1]) / 2, gaps[-1:]])  # (16,): edges have one neighbour
    flat = w.reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCKSIZE
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, NF4_BLOCKSIZE)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    index = (blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)  # the nearest level of each entry
    return (local[index] * absmax).reshape(-1)[: flat.numel()].view_as(w)


def update_in_steps(w: Tensor, delta: Tensor, fmt: str) -> float:
    """The size of ``delta`` in units of the format's step at ``w``: RMS(ΔW) / RMS(step)."""
    step = grid_step(stored(w, fmt), fmt).double()
    return float(delta.detach().double().pow(2).mean().sqrt() / step.pow(2).mean().sqrt())


__all__ = ["FORMATS", "NF4_BLOCKSIZE", "grid_step", "merge_stored", "retained_fraction", "stored", "unload",
           "update_in_steps"]
