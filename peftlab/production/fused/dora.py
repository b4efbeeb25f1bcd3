"""DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) as one hand-written
``torch.autograd.Function``: LoRA's kernel with the output scaled per unit by
f = m / ||W + s·BA||_c, a constant to autograd (the paper's section 4.3):

    y = f ⊙ z + b,  z = x Wᵀ + s (x Aᵀ) Bᵀ;   g = f ⊙ dy;  dm = Σ_tokens (dy ⊙ z) / ||W + s·BA||_c
    dx = g W + s (g B) A,   dA = s (g B)ᵀ x,   dB = s gᵀ (x Aᵀ)

With dropout the base sees x and the adapted direction dropout(x): two big matmuls instead of one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from peftlab.production.fused.lora import add_lora, add_lora_input_grad, lora_grads
from peftlab.production.fused.matmul import dense_linear


class DoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + b + (f-1) ⊙ (x_d Wᵀ) + f ⊙ s (x_d Aᵀ) Bᵀ,  f = m / ||W + s·BA||_c (constant).

    Without dropout (x_d = x) this is y = f ⊙ z + b with z = x Wᵀ + s (x Aᵀ) Bᵀ: one big matmul.
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_drop: Tensor | None, weight_fn: Callable[[], Tensor],
                bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        weight = weight_fn()  # (d_out, d_in)
        # ||W + s·BA||_c per output unit, in fp32 like the reference (paper, section 4.3: no grad)
        norm = torch.linalg.vector_norm(
            torch.addmm(weight.float(), lora_B.float(), lora_A.float(), alpha=scaling), dim=1)
        factor = (magnitude.float() / norm).to(x.dtype)  # (d_out,)
        if x_drop is None:
            xd = x2
            z = dense_linear(x2, weight)  # (N, d_out)
            xa = add_lora(z, x2, lora_A, lora_B, scaling)
            out = z * factor
            if bias is not None:
                out += bias
        else:  # the base sees x, the adapted direction sees dropout(x): two big matmuls
            xd = x_drop.reshape(-1, shape[-1])
            xa = dense_linear(xd, lora_A)
            update = (xa @ lora_B.T).mul_(scaling)  # (N, d_out)
            zb = dense_linear(xd, weight)  # W dropout(x)
            out = dense_linear(x2, weight, bias).addcmul_(zb, factor - 1).addcmul_(update, factor)
            z = zb.add_(update)
        ctx.weight_fn, ctx.scaling, ctx.x_shape = weight_fn, scaling, shape
        ctx.has_drop, ctx.magnitude_dtype = x_drop is not None, magnitude.dtype
        ctx.save_for_backward(xd, xa, z, lora_A, lora_B, factor, norm)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        """The chain rule through y = x Wᵀ - x_d Wᵀ + f ⊙ z + b, z = x_d Wᵀ + s (x_d Aᵀ) Bᵀ (the
        forward's two forms, rewritten), f = m / n, n = ||W + s·BA||_c held constant (section 4.3):

            g     = f ⊙ dy                  (N, d_out)   the gradient reaching z
            dm    = Σ_tokens (dy ⊙ z) / n   (d_out,)     ∂y/∂m = z / n; z was saved in forward
            gB, dA, dB                                   LoRA's backward of s (x_d Aᵀ) Bᵀ with g:
                                                         gB = g B, dA = s gBᵀ x_d, dB = s gᵀ (x_d Aᵀ)
            without dropout (x_d = x, y = f ⊙ z + b):
            dx    = g W + s gB A            (N, d_in)
            with dropout:
            dx    = dy W                    (N, d_in)    the base path x Wᵀ only
            dx_d  = g W - dy W + s gB A     (N, d_in)    nn.Dropout's backward takes it to dx

        W and b are frozen; a 4-bit W is dequantised once more, only if an input needs a gradient.
        """
        xd, xa, z, lora_A, lora_B, factor, norm = ctx.saved_tensors
        need_x, need_xd, _, _, need_A, need_B, need_m, _ = ctx.needs_input_grad
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        g = dy2 * factor  # gradient reaching z
        gB, dA, dB = lora_grads(g, xd, xa, lora_A, lora_B, s, need_A, need_B)
        dx = dxd = dm = None
        if need_m:  # y depends on m through f = m / norm only
            dm = ((dy2 * z).sum(0, dtype=torch.float32) / norm).to(ctx.magnitude_dtype)
        need_w = need_x or (ctx.has_drop and need_xd)
        weight = ctx.weight_fn() if need_w else None
        if not ctx.has_drop:
            if need_x:
                dx = add_lora_input_grad(dense_linear(g, weight.T), gB, lora_A, s).view(ctx.x_shape)
        elif need_w:  # (the first layer's input may need no gradient at all)
            dy_w = dense_linear(dy2, weight.T)  # through the base path x W^T
            if need_xd:  # (f-1) ⊙ W x_d  and  f ⊙ s B A x_d
                dxd = dense_linear(g, weight.T).sub_(dy_w)
                dxd = add_lora_input_grad(dxd, gB, lora_A, s).view(ctx.x_shape)
            if need_x:
                dx = dy_w.view(ctx.x_shape)
        return dx, dxd, None, None, dA, dB, dm, None


__all__ = ["DoRAFunction"]
