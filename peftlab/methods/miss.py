"""MiSS: Matrix Shard Sharing (first published as Bone, Block-Affine adaptation).

Kang et al., 2024, MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing,
https://arxiv.org/abs/2409.15371

The update ΔW (d_out x d_in) is one trained shard D (r x d_out) shared by every block of r input
columns (paper, eq. 4): ΔW = [Dᵀ Dᵀ ... Dᵀ] (the last copy cut to d_in's remainder), so

        h = W0 x + Dᵀ (x_1 + x_2 + ... + x_{d_in/r})      x_k: the k-th chunk of r features of x

        x ──┬──────────── W0 ──────────────────────┐
            │                                      (+) ──▶ h
            └─ dropout ─ sum of r-chunks (r) ─ D ─┘        (x zero-padded to a multiple of r)

D starts at zero, so the model starts at the pretrained one; a layer trains r · d_out numbers,
and the "matrix" A of LoRA is a fixed sum, so one fewer matrix multiply than LoRA. peft's two
variants (``init_weights``): "mini" shares a smaller shard D (r x mini_r) across blocks of output
features too (r · mini_r numbers, d_out divisible by mini_r); "bat" (the paper's Bat) updates
each r x r block W_ij of W0 by W_ij D_i + D_i, with D (d_out / r, r, r), so ΔW depends on W0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import LinearAdapter, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, check_range, in_base_layout, is_count
from peftlab.methods.oft import linear_weight


@dataclass(frozen=True)
class MissConfig(AdapterConfig):
    r: int = 64  # shard rows: x is summed in chunks of r features (at most the layer's d_in)
    dropout: float = 0.0  # dropout on the adapter's input (not in "bat", which updates W0 itself)
    mini_r: int = 1  # "mini": the shard's columns, repeated d_out / mini_r times
    init_weights: bool | str = True  # True: MiSS (balance); "mini"; "bat"; False: Kaiming-uniform D

    def __post_init__(self) -> None:
        for name in ("r", "mini_r"):
            if not is_count(getattr(self, name)):
                raise ConfigError(f"MiSS {name}={getattr(self, name)!r} is invalid. Expected a positive integer; "
                                  f"try {name}={64 if name == 'r' else 1}.")
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.init_weights not in (True, False, "mini", "bat"):
            raise ConfigError(f"MiSS init_weights={self.init_weights!r} is unknown. Expected True (MiSS), "
                              "'mini', 'bat' or False (random D).")


def miss_parameter_count(d_in: int, d_out: int, config: MissConfig) -> int:
    """r · d_out per layer (mini: r · mini_r; bat: (d_out / r) · r · r = r · d_out too)."""
    return config.r * config.mini_r if config.init_weights == "mini" else config.r * d_out


class MiSS(LinearAdapter):
    """h = W0 x + Dᵀ Σ_k x_k (MiSS, mini); h = (W0 + ΔW(W0)) x (bat)."""

    def __init__(self, base: nn.Module, config: MissConfig) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        r, self.kind = config.r, config.init_weights
        if r > d_in:
            raise ConfigError(f"MiSS r={r} is above this layer's d_in={d_in} (peft refuses it too). Expected "
                              f"r <= {d_in}; try r={d_in} or smaller.")
        if self.kind == "bat" and (d_in % r or d_out % r):
            raise ConfigError(f"MiSS 'bat' cuts W0 ({d_out} x {d_in}) into r x r blocks, and r={r} does not divide "
                              f"both sides. Expected r dividing {math.gcd(d_in, d_out)}; try r=8.")
        if self.kind == "mini" and d_out % config.mini_r:
            raise ConfigError(f"MiSS 'mini' repeats its shard d_out / mini_r times, and mini_r={config.mini_r} does "
                              f"not divide d_out={d_out}. Expected a divisor of {d_out}; try mini_r=1.")
        self.delta_uses_base = self.kind == "bat"  # bat's ΔW = W0 D + D depends on W0
        self.d_in, self.d_out, self.transposed = d_in, d_out, is_conv1d(base)
        shape = {"bat": (d_out // r, r, r), "mini": (r, config.mini_r)}.get(self.kind, (r, d_out))
        self.miss_block = nn.Parameter(torch.zeros(shape))
        if self.kind is False:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def shard(self) -> Tensor:
        """D (r, d_out); for mini the (r, mini_r) shard repeated across the outputs."""
        if self.kind == "mini":
            return self.miss_block.repeat(1, self.d_out // self.miss_block.shape[1])
        return self.miss_block

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        if self.kind == "bat":  # h = W0 x + ΔW x, ΔW from the blocks of W0
            delta = self.bat_delta(linear_weight(base).to(self.miss_block.dtype))
            return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)
        D = self.shard()  # (r, d_out)
        r = D.shape[0]
        x = F.pad(x, (0, (r - x.shape[-1] % r) % r)).to(D.dtype)  # d_in up to a multiple of r
        summed = self.dropout(x).unflatten(-1, (-1, r)).sum(dim=-2)  # (..., r): Σ_k x_k
        return (result + summed @ D).to(result.dtype)  # (..., d_out)

    def bat_delta(self, W0: Tensor) -> Tensor:
        """Bat: each r x r block W_ij of W0 (d_out, d_in) -> W_ij D_i + D_i."""
        D = self.miss_block  # (d_out / r, r, r)
        r = D.shape[-1]
        blocks = W0.reshape(self.d_out // r, r, self.d_in // r, r).permute(2, 0, 1, 3)  # (d_in/r, d_out/r, r, r)
        return (blocks @ D + D).permute(1, 2, 0, 3).reshape(W0.shape)

    def delta_weight(self, base: nn.Module) -> Tensor:
        if self.kind == "bat":
            W0 = linear_weight(base)
            return in_base_layout(self.bat_delta(W0.to(self.miss_block.dtype)).to(W0.dtype), self.transposed)
        D = self.shard()  # (r, d_out)
        copies = -(-self.d_in // D.shape[0])
        delta = D.T.repeat(1, copies)[:, : self.d_in]  # (d_out, d_in) = [Dᵀ ... Dᵀ], cut to d_in
        return in_base_layout(delta, self.transposed)
