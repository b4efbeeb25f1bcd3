"""The SwiGLU MLP of Llama-style models, down(silu(gate(x)) * up(x)), with LoRA on down_proj or not.

Autograd keeps gate, silu(gate) and up for backward, and their product too when down_proj has
LoRA. :class:`SwiGLUFunction` keeps only gate and up and recomputes the rest (elementwise, cheap)
in backward: one or two fewer (tokens x intermediate) tensors per layer, the largest activations
of the model. It runs whether down_proj carries LoRA or is a frozen (full-precision or 4-bit)
layer, and steps aside while down_proj's LoRA dropout is active.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.inject import AdaptedLayer
from peftlab.methods.lora import LoRA
from peftlab.production.fused.base import base_plan
from peftlab.production.fused.layer import FusedAdaptedLayer
from peftlab.production.fused.lora import add_lora, add_lora_input_grad, lora_grads
from peftlab.production.fused.matmul import dense_linear
from peftlab.production.fused.wrap import forward_contains


class SwiGLUFunction(torch.autograd.Function):
    """y = a Wᵀ + b [+ s (a Aᵀ) Bᵀ] with a = silu(g) ⊙ u, saving g and u but never a.

    Autograd would keep g (for silu), silu(g) and u (for the product), and a as well when
    down_proj carries LoRA (for dA): three or four (tokens x intermediate) tensors per layer, the
    largest activations of the model. a and silu(g) are cheap to recompute from g and u, so
    backward does that (Unsloth's fused SwiGLU does the same). ``lora_A`` and ``lora_B`` are None
    for a frozen down_proj without an adapter (LoRA on attention only, peftlab's default).
    """

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight_fn: Callable[[], Tensor],
                bias: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None,
                scaling: float) -> Tensor:
        shape = gate.shape
        g, u = gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])  # (N, I)
        a = F.silu(g).mul_(u)  # (N, I), dropped after forward
        out = dense_linear(a, weight_fn(), bias)  # (N, d_out)
        xa = None if lora_A is None else add_lora(out, a, lora_A, lora_B, scaling)  # (N, r)
        ctx.weight_fn, ctx.scaling, ctx.shape = weight_fn, scaling, shape
        ctx.save_for_backward(g, u, xa, lora_A, lora_B)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        """The chain rule through y = a Wᵀ + b [+ s (a Aᵀ) Bᵀ], a = silu(g) ⊙ u, from dy (N, d_out):

            da    = dy W  [+ s (dy B) A]                (N, I)      the LoRA term when down_proj has one
            du    = da ⊙ silu(g)                        (N, I)
            dg    = da ⊙ u ⊙ silu'(g)                   (N, I)      silu'(g) = σ(g) (1 + g (1 - σ(g)))
            dA    = s (dy B)ᵀ a,   dB = s dyᵀ (a Aᵀ)                LoRA's backward with g = dy

        silu(g) and a are recomputed here from the saved g and u (one elementwise pass each);
        W and b are frozen, and a 4-bit W is dequantised again for dy W.
        """
        g, u, xa, lora_A, lora_B = ctx.saved_tensors
        need_g, need_u, _, _, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        silu = F.silu(g)  # recomputed: one elementwise pass instead of a saved tensor
        gB = dA = dB = None
        if lora_A is not None:
            a = silu * u if need_A else None  # recomputed likewise, for dA only
            gB, dA, dB = lora_grads(dy2, a, xa, lora_A, lora_B, s, need_A, need_B)
        dg = du = None
        if need_g or need_u:
            da = dense_linear(dy2, ctx.weight_fn().T)  # (N, I)
            if gB is not None:
                add_lora_input_grad(da, gB, lora_A, s)
            if need_u:
                du = (da * silu).view(ctx.shape)
            if need_g:  # silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))), in PyTorch's own kernel
                dg = torch.ops.aten.silu_backward(da.mul_(u), g).view(ctx.shape)
        return dg, du, None, None, dA, dB, None


_SWIGLU_LINE = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


def _forward_is_swiglu(cls: type) -> bool:
    """Llama, Mistral, Qwen2/3, SmolLM2 and ~130 other model files share the SwiGLU line."""
    return forward_contains(cls, _SWIGLU_LINE)


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP: gate_proj, up_proj, down_proj, a SiLU and transformers' exact forward."""
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    return (all(isinstance(p, nn.Module) for p in parts)
            and type(act).__name__ in ("SiLU", "SiLUActivation")
            and _forward_is_swiglu(type(module)))


def fused_swiglu_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The wrapped MLP forward (bound to the MLP): same result, a and silu(g) never kept.

    down_proj may carry one fusable LoRA adapter (without active dropout: dropout(a) would need
    a itself) or be a frozen base layer; anything else runs the MLP's own forward."""
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    lora = plan = None
    if isinstance(down, FusedAdaptedLayer):
        adapter = down.fusable_adapter(gate, (), {})
        if isinstance(adapter, LoRA) and not (isinstance(adapter.dropout, nn.Dropout)
                                              and adapter.dropout.training):
            lora, plan = adapter, base_plan(down.base_layer, gate)
    elif not isinstance(down, AdaptedLayer) and not torch.is_autocast_enabled(gate.device.type):
        plan = base_plan(down, gate)  # a frozen down_proj (nn.Linear, 4-bit): no adapter
    if plan is None or up.dtype != gate.dtype:
        return down(self.act_fn(gate) * up)
    dtype = plan.dtype
    lora_A, lora_B, scaling = (None, None, 1.0) if lora is None else (lora.lora_A, lora.lora_B,
                                                                      lora.scaling)
    out = SwiGLUFunction.apply(gate.to(dtype), up.to(dtype), plan.weight, plan.bias, lora_A,
                               lora_B, scaling)
    return out.to(plan.out_dtype)


__all__ = ["SwiGLUFunction", "is_swiglu_mlp", "fused_swiglu_forward"]
