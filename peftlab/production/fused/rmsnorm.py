"""Llama-style RMSNorm, y = w ⊙ x / rms(x), with a hand-written backward.

RMSNorm is five elementwise steps that autograd replays one by one in backward;
:class:`RMSNormFunction` writes the gradient in two passes and keeps only x and one float per row.
Used while the norm's weight is frozen (a trained norm keeps autograd's forward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftlab.production.fused.wrap import forward_contains, unfused_forward


class RMSNormFunction(torch.autograd.Function):
    """y = w ⊙ x · r,  r = 1 / sqrt(mean(x²) + eps) per row, for a frozen weight w.

    Autograd runs the forward's five elementwise steps backwards one by one (pow, mean, add,
    rsqrt, two products), keeping their outputs. By hand, with ĝ = dy ⊙ w:

        dx = r ĝ - x r³ mean(ĝ ⊙ x)

    saving only x and r (one float per row). Computed in float32 as transformers does.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        """The chain rule through y = w ⊙ x · r, r = (mean(x²) + eps)^(-1/2), with ĝ = dy ⊙ w:

            ∂r/∂x_j = -r³ x_j / H                   (H features per row)
            dx_j    = r ĝ_j + Σ_k ĝ_k x_k ∂r/∂x_j
                    = r ĝ_j - x_j r³ mean(ĝ ⊙ x)    one row-mean, then one fused multiply-add

        in float32 from the saved x and r; w is frozen (no gradient), eps is a constant.
        """
        x, rstd, weight = ctx.saved_tensors
        xf = x.float()
        g = (dy * weight).float()
        dot = (g * xf).mean(-1, keepdim=True)  # mean(ĝ ⊙ x) per row
        dx = torch.addcmul(g.mul_(rstd), xf, dot.mul_(rstd.pow(3)), value=-1)
        return dx.to(x.dtype), None, None


_RMS_NORM_LINES = (  # transformers' LlamaRMSNorm.forward, shared by Mistral, Qwen2/3, SmolLM2, ...
    "hidden_states=hidden_states.to(torch.float32)"
    "variance=hidden_states.pow(2).mean(-1,keepdim=True)"
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
    "returnself.weight*hidden_states.to(input_dtype)"
)


def is_rms_norm(module: nn.Module) -> bool:
    """A Llama-style RMSNorm: transformers' exact forward, a weight and ``variance_epsilon``."""
    return (isinstance(getattr(module, "weight", None), Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and forward_contains(type(module), _RMS_NORM_LINES))


def fused_rms_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """The wrapped RMSNorm forward: :class:`RMSNormFunction` while the weight is frozen."""
    if self.weight.requires_grad or torch.is_autocast_enabled(hidden_states.device.type):
        return unfused_forward(self)(hidden_states)  # a trained norm: autograd's way
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


__all__ = ["RMSNormFunction", "is_rms_norm", "fused_rms_norm_forward"]
