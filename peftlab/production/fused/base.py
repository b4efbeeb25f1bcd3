"""The frozen base layer, seen by the fused Functions as "give me W (d_out, d_in) in the compute dtype".

A :class:`BasePlan` says how to reach W and b without running the base layer's forward: a view of
an ``nn.Linear``'s weight, the transpose of a GPT-2 ``Conv1D``'s, or a fresh dequantisation of a
4-bit weight (bitsandbytes ``Linear4bit`` or peftlab's ``Linear4bitRef``), made in forward and
again in backward so that no dense copy of W outlives either pass (QLoRA, Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314). Where no plan applies, the layer runs the reference forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.inject import is_conv1d, is_quantized
from peftlab.quant.nf4 import Linear4bitRef, dequantize_4bit


@dataclass
class BasePlan:
    """How the fused Function reaches a frozen base layer."""

    weight: Callable[[], Tensor]  # () -> W, (d_out, d_in) in `dtype`: a view, or a fresh dequant
    bias: Tensor | None  # (d_out,) in `dtype`, or None
    dtype: torch.dtype  # compute dtype of the matmuls
    out_dtype: torch.dtype  # dtype the base layer returns


def base_plan(base: nn.Module, x: Tensor) -> BasePlan | None:
    """A :class:`BasePlan` for ``base`` and input ``x``, or None where the fused path does not
    apply (then the reference forward runs): unknown layer types, trainable base weights, hooks."""
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return None  # someone (accelerate, a user) expects the base forward to run
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return None
    if isinstance(base, Linear4bitRef):  # peftlab's NF4 layer: codes and scales in buffers
        dtype = base.compute_dtype or x.dtype
        return BasePlan(lambda: dequantize_4bit(base.packed, base.state, dtype), _cast(bias, dtype),
                        dtype, x.dtype)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    if is_quantized(weight) and hasattr(base, "compute_type_is_set"):  # bitsandbytes Linear4bit
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return None  # repacked for an inference-only CPU kernel: let bitsandbytes handle it
        import bitsandbytes.functional as bnbf

        if not base.compute_type_is_set:  # bitsandbytes' own rule, on the first forward
            base.set_compute_type(x)
            base.compute_type_is_set = True
        dtype = base.compute_dtype or x.dtype
        return BasePlan(lambda: bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype),
                        _cast(bias, dtype), dtype, x.dtype)
    if weight.requires_grad or not weight.is_floating_point() or x.dtype != weight.dtype:
        return None  # a trained base, or a dtype mix the base itself would refuse
    if type(base) is nn.Linear:
        return BasePlan(lambda: weight, bias, weight.dtype, weight.dtype)
    if is_conv1d(base):  # transformers' GPT-2 layer stores W as (d_in, d_out)
        return BasePlan(lambda: weight.T, bias, weight.dtype, weight.dtype)
    return None


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


__all__ = ["BasePlan", "base_plan"]
