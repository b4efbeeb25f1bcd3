"""The fused adapted layer: an ``AdaptedLayer`` whose forward runs the fused LoRA or DoRA
Function when it can and the reference forward otherwise.

Same parameters, same names as the reference, so saving, loading, merging, the peft weight bridge
and spectra work unchanged; :func:`~peftlab.production.fused.install.fuse` only swaps the class.
Dropout runs here, outside the Function, through the adapter's own ``nn.Dropout``: the same random
mask as the reference path. When the adapter's dtype differs from the base's compute dtype (bf16
base, fp32 adapters), LoRA computes its branch in the adapter's dtype as the reference does; DoRA
computes in the base's compute dtype (bf16 rounding: gradients within a few percent).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftlab.inject import AdaptedLayer
from peftlab.methods.dora import DoRA
from peftlab.methods.lora import LoRA
from peftlab.production.fused.base import base_plan
from peftlab.production.fused.dora import DoRAFunction
from peftlab.production.fused.gather import add_gathered, gather_rows
from peftlab.production.fused.lora import LoRAFunction


class FusedAdaptedLayer(AdaptedLayer):
    """An ``AdaptedLayer`` whose forward runs :class:`LoRAFunction` / :class:`DoRAFunction` when
    it can, and the reference forward otherwise. Same parameters and names as the reference."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.example_adapters is not None and not (args or kwargs or self.disabled or torch.is_grad_enabled()):
            return self.mixed_forward(x, self.example_adapters)
        adapter = self.fusable_adapter(x, args, kwargs)
        plan = base_plan(self.base_layer, x) if adapter is not None else None
        if plan is None:
            return super().forward(x, *args, **kwargs)
        dtype = plan.dtype
        x_c = x.to(dtype)
        dropout = adapter.dropout
        # dropout runs here, through the adapter's own module, so it draws the same mask as the
        # reference (same random calls in the same order); the Function gets both x and dropout(x)
        x_drop = dropout(x_c) if isinstance(dropout, nn.Dropout) and dropout.training else None
        if isinstance(adapter, DoRA):  # DoRA runs wholly in the base's compute dtype
            out = DoRAFunction.apply(x_c, x_drop, plan.weight, plan.bias, adapter.lora_A.to(dtype),
                                     adapter.lora_B.to(dtype), adapter.magnitude, adapter.scaling)
        else:
            out = LoRAFunction.apply(x_c, x_drop, plan.weight, plan.bias, adapter.lora_A,
                                     adapter.lora_B, adapter.scaling)
        return out.to(plan.out_dtype)

    def forget_gathered(self) -> None:
        self.gathered = None  # a new batch, a hot-swap or a padding: the rows gather their factors again

    def mixed_forward(self, x: Tensor, names: list[str]) -> Tensor:
        """A mixed batch at inference: the base output plus every row's LoRA update in two batched
        matmuls, from factors gathered once per batch (gather.py); the reference otherwise."""
        rows = getattr(self, "gathered", None)
        if rows is None or self.merged or x.shape[0] != len(names) or not rows.fresh(names):
            factors = self.mixed_factors(x, names)  # also refuses what no form can run
            if not factors:
                return super().forward(x)
            rows = self.gathered = gather_rows(factors, names)
        return add_gathered(self.base_layer(x), x, rows)

    def fusable_adapter(self, x: Tensor, args: tuple, kwargs: dict) -> LoRA | DoRA | None:
        """The one active LoRA or DoRA adapter the fused Functions can run for this call, or None
        (then the reference forward runs): several or no active adapters, merged or disabled,
        extra forward arguments, a mixed batch, integer input, autocast, LoRA on an embedding
        or with a bias of its own. Also asked by the SwiGLU fusion about a LoRA on down_proj."""
        if args or kwargs or self.disabled or len(self.active) != 1 or self.merged:
            return None
        if getattr(self, "example_adapters", None) is not None:
            return None  # a mixed batch (peftlab.compose): the reference forward routes it
        if not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
            return None
        adapter = self.adapters[self.active[0]]
        if isinstance(adapter, DoRA) or (isinstance(adapter, LoRA) and not adapter.is_embedding
                                         and adapter.lora_B_bias is None):  # lora_bias: the reference runs it
            return adapter
        return None


__all__ = ["FusedAdaptedLayer"]
