"""C3A: circular convolution adaptation.

Chen et al., 2025, Parameter-Efficient Fine-Tuning via Circular Convolution, ACL 2025,
https://arxiv.org/abs/2407.19342

x (d_in) and the output (d_out) are cut into blocks of b features; block m of the update is a sum
of circular convolutions of the input blocks x_n with trained kernels w_mn (b numbers each),
computed with the FFT (F the DFT, F⁻¹ its inverse; the normalisation by d_in is peft's):

        Δh_m = (1/d_in) Σ_n Re F( F⁻¹(x_n) ⊙ F(w_mn) )        m < d_out / b,  n < d_in / b

        x ──┬───────────────────── W0 ──────────────────────┐
            │                                              (+) ──▶ h
            └─ blocks (d_in/b, b) ─ FFT conv with w / d_in ─┘

so ΔW is block-circulant: (d_out/b) x (d_in/b) blocks, each a b x b circulant matrix built from
one kernel. A layer trains d_in · d_out / b numbers, kept in ``c3a_kernel`` (d_out/b, d_in/b, b),
in fp32 whatever the model's dtype (as peft). peft's default init is Xavier-uniform (not a no-op);
``init_weights=True`` starts at zero. b must divide both d_in and d_out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import LinearAdapter, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, in_base_layout, is_count

INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclass(frozen=True)
class C3AConfig(AdapterConfig):
    block_size: int = 256  # b: features per block; divides every adapted layer's d_in and d_out
    # "xavier_uniform" (peft's default; False too), "kaiming_uniform", "gaussian", or True: zeros (a no-op)
    init_weights: bool | str = "xavier_uniform"

    def __post_init__(self) -> None:
        if not is_count(self.block_size):
            raise ConfigError(f"C3A block_size={self.block_size!r} is invalid. Expected a positive integer dividing "
                              "every adapted layer's d_in and d_out; try their greatest common divisor.")
        if self.init_weights not in INITS:
            raise ConfigError(f"C3A init_weights={self.init_weights!r} is unknown. Expected one of "
                              f"{', '.join(map(repr, INITS))}; try 'xavier_uniform' (peft's default).")


def c3a_parameter_count(d_in: int, d_out: int, config: C3AConfig) -> int:
    """One kernel of b numbers per (output block, input block) pair: d_in · d_out / b."""
    return d_in * d_out // config.block_size


def block_circular_conv(x: Tensor, kernel: Tensor) -> Tensor:
    """Σ_n Re F(F⁻¹(x_n) ⊙ F(w_mn)) for x (..., d_in) and kernel (d_out/b, d_in/b, b) -> (..., d_out)."""
    _, n, b = kernel.shape
    blocks = x.reshape(*x.shape[:-1], n, b)  # (..., d_in/b, b)
    mixed = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(blocks), torch.fft.fft(kernel))  # (..., d_out/b, b)
    return torch.fft.fft(mixed).real.flatten(-2)  # (..., d_out)


class C3A(LinearAdapter):
    """h = W0 x + b + C x / d_in, C block-circulant from the kernels; merged: W' = W0 + C / d_in."""

    def __init__(self, base: nn.Module, config: C3AConfig) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        b = config.block_size
        if d_in % b or d_out % b:
            fits = math.gcd(d_in, d_out)
            raise ConfigError(f"C3A block_size={b} does not divide this layer's d_in={d_in} and d_out={d_out} (peft "
                              f"refuses it too). Expected a divisor of both; try block_size={fits} or a divisor of it.")
        self.d_in, self.transposed = d_in, is_conv1d(base)
        self.c3a_kernel = nn.Parameter(torch.zeros(d_out // b, d_in // b, b, dtype=torch.float32))
        with torch.no_grad():
            if config.init_weights == "gaussian":
                nn.init.normal_(self.c3a_kernel)
            elif config.init_weights in ("xavier_uniform", False):  # Xavier's bound for the whole d_out x d_in layer
                bound = math.sqrt(3.0) * math.sqrt(2.0 / (d_in + d_out))
                nn.init.uniform_(self.c3a_kernel, -bound, bound)
            elif config.init_weights == "kaiming_uniform":
                bound = math.sqrt(1.0 / d_in)
                nn.init.uniform_(self.c3a_kernel, -bound, bound)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + b + (1/d_in) C x, in fp32
        delta = block_circular_conv(x.to(torch.float32), self.c3a_kernel.to(torch.float32)) / self.d_in
        return result + delta.to(result.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        # column j of C is C applied to the j-th unit vector
        eye = torch.eye(self.d_in, dtype=torch.float32, device=self.c3a_kernel.device)
        delta = block_circular_conv(eye, self.c3a_kernel.to(torch.float32)).T / self.d_in  # (d_out, d_in)
        weight = base.weight
        return in_base_layout(delta.to(weight.dtype), self.transposed)
