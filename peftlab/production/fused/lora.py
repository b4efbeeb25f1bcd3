"""LoRA as one hand-written ``torch.autograd.Function`` (Unsloth's "manual autograd",
https://github.com/unslothai/unsloth), for the one case that matters: frozen W, trainable A, B.

    forward   y  = x Wᵀ + b  (+)=  s · (x Aᵀ) Bᵀ          one matmul, then addmm_ into it
    backward  dx = dy W + s · (dy B) A                   W never gets a gradient
              dA = s · (dy B)ᵀ x        (r, d_in)
              dB = s · dyᵀ (x Aᵀ)       (d_out, r)         x Aᵀ is r wide: saved, not recomputed

Saved for backward: x (needed for dA anyway) and x Aᵀ (r columns). The adapter's side of that
(:func:`add_lora` in forward, :func:`lora_grads` and :func:`add_lora_input_grad` in backward) is
shared with DoRA (:mod:`~peftlab.production.fused.dora`) and with a LoRA on SwiGLU's down_proj
(:mod:`~peftlab.production.fused.swiglu`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from peftlab.production.fused.matmul import dense_linear


def add_lora(out: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """out += s (x Aᵀ) Bᵀ in place, in the adapter's dtype; returns x Aᵀ (N, r) for backward."""
    xa = dense_linear(x.to(lora_A.dtype), lora_A)  # (N, r)
    if xa.dtype == out.dtype:
        out.addmm_(xa, lora_B.T, alpha=scaling)
    else:
        out.add_(xa @ lora_B.T, alpha=scaling)  # summed in the wider dtype, rounded once
    return xa


def lora_grads(g: Tensor, x: Tensor, xa: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
               need_A: bool, need_B: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The adapter's side of a LoRA backward, from the gradient g (N, d_out) reaching
    s (x Aᵀ) Bᵀ: returns gB = g B (N, r), dA = s gBᵀ x (r, d_in), dB = s gᵀ (x Aᵀ) (d_out, r)."""
    g = g.to(lora_A.dtype)
    gB = dense_linear(g, lora_B.T)
    dA = dense_linear(gB.T, x.to(lora_A.dtype).T).mul_(scaling) if need_A else None
    dB = dense_linear(xa.T, g.T).mul_(scaling).T.contiguous() if need_B else None
    return gB, dA, dB


def add_lora_input_grad(dx: Tensor, gB: Tensor, lora_A: Tensor, scaling: float) -> Tensor:
    """dx += s gB A in place (the LoRA branch's share of the input gradient)."""
    if dx.dtype == gB.dtype:
        return dx.addmm_(gB, lora_A, alpha=scaling)
    return dx.add_(gB @ lora_A, alpha=scaling)


class LoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s (x_d Aᵀ) Bᵀ with a hand-written backward; x_d = dropout(x) or x.

    The base matmul runs in the base's compute dtype, the LoRA branch in the adapter's dtype (as
    the reference and peft do: a bf16 base with fp32 adapters adds an fp32 update, rounded once).
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_drop: Tensor | None, weight_fn: Callable[[], Tensor],
                bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        xd = x2 if x_drop is None else x_drop.reshape(-1, shape[-1])
        out = dense_linear(x2, weight_fn(), bias)  # (N, d_out); weight_fn() is W (d_out, d_in)
        xa = add_lora(out, xd, lora_A, lora_B, scaling)  # += s · (x A^T) B^T, in place
        ctx.weight_fn, ctx.scaling, ctx.x_shape = weight_fn, scaling, shape
        ctx.has_drop = x_drop is not None
        ctx.save_for_backward(xd, xa, lora_A, lora_B)  # x itself is not needed: dx = dy W
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        """The chain rule through y = x Wᵀ + b + s (x_d Aᵀ) Bᵀ, with g = dy (N, d_out):

            gB    = g B                     (N, r)       shared by the three lines below
            dA    = s gBᵀ x_d               (r, d_in)    ∂y/∂A: x_d, through B and s
            dB    = s gᵀ (x_d Aᵀ)           (d_out, r)   x_d Aᵀ was saved in forward
            dx    = g W  [+ s gB A]         (N, d_in)    the LoRA term here only without dropout
            dx_d  = s gB A                  (N, d_in)    with dropout; nn.Dropout's own backward
                                                         then masks and rescales it into dx

        W and b are frozen (no gradient); a 4-bit W is dequantised again for g W.
        """
        xd, xa, lora_A, lora_B = ctx.saved_tensors
        need_x, need_xd, _, _, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        gB, dA, dB = lora_grads(g, xd, xa, lora_A, lora_B, s, need_A, need_B)
        dx = dxd = None
        if need_x:
            dx = dense_linear(g, ctx.weight_fn().T)  # (N, d_in) = dy W; a 4-bit W is dequantised again
            if not ctx.has_drop:  # with dropout the LoRA branch's gradient goes to x_drop below
                add_lora_input_grad(dx, gB, lora_A, s)
            dx = dx.view(ctx.x_shape)
        if ctx.has_drop and need_xd:
            dxd = (gB @ lora_A).mul_(s).to(xd.dtype).view(ctx.x_shape)
        return dx, dxd, None, None, dA, dB, None


__all__ = ["add_lora", "lora_grads", "add_lora_input_grad", "LoRAFunction"]
