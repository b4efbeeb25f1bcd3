"""HiRA: Hadamard high-rank adaptation.

Huang et al., 2025, HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language
Models, ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS

The update is LoRA's low-rank product B A taken element-wise (Hadamard, ⊙) with the frozen weight
itself:

        h = W0 x + b + (W0 ⊙ (B A)) x        B (d_out x r), A (r x d_in)

        x ──┬──────────────── W0 ─────────────────┐
            │                                    (+) ──▶ h
            └─ dropout ─▶ (W0 ⊙ B A) ────────────┘

rank(W0 ⊙ B A) can reach rank(W0) · r, so the update is high-rank while a layer trains LoRA's
r (d_in + d_out) numbers. B starts at zero, A Kaiming-uniform (peft's init, ``init_weights=True``):
the model starts at the pretrained one. No scaling factor (no alpha). Merging is W' = W0 + W0 ⊙ B A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import LinearAdapter, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, check_range, check_rank, in_base_layout
from peftlab.methods.oft import linear_weight


@dataclass(frozen=True)
class HiraConfig(AdapterConfig):
    r: int = 32  # rank of B A, the factor that W0 is multiplied by element-wise (peft's default)
    dropout: float = 0.0  # dropout on the adapter's input
    init_weights: bool | str = True  # True: A Kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r); False: both N(0, 1)

    def __post_init__(self) -> None:
        check_rank(self.r)
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.init_weights not in (True, False, "gaussian"):
            raise ConfigError(f"HiRA init_weights={self.init_weights!r} is unknown. Expected True (B = 0), "
                              "'gaussian' (B = 0, A Gaussian) or False (random A and B, not a no-op).")


def hira_parameter_count(d_in: int, d_out: int, config: HiraConfig) -> int:
    """LoRA's count: A (r x d_in) and B (d_out x r)."""
    return config.r * (d_in + d_out)


class HiRA(LinearAdapter):
    """h = W0 x + b + (W0 ⊙ B A) x; merged: W' = W0 + W0 ⊙ B A."""

    delta_uses_base = True  # ΔW = W0 ⊙ B A depends on W0

    def __init__(self, base: nn.Module, config: HiraConfig) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        self.transposed = is_conv1d(base)
        self.hira_A = nn.Parameter(torch.randn(config.r, d_in))  # (r, d_in)
        self.hira_B = nn.Parameter(torch.randn(d_out, config.r))  # (d_out, r)
        if config.init_weights is True:
            nn.init.kaiming_uniform_(self.hira_A, a=math.sqrt(5))
        elif config.init_weights == "gaussian":
            nn.init.normal_(self.hira_A, std=1 / config.r)
        if config.init_weights:
            nn.init.zeros_(self.hira_B)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        W0 = linear_weight(base).to(self.hira_A.dtype)  # (d_out, d_in)
        update = W0 * (self.hira_B @ self.hira_A)  # (d_out, d_in): W0 ⊙ B A
        return (result + F.linear(self.dropout(x.to(update.dtype)), update)).to(result.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        W0 = linear_weight(base)  # (d_out, d_in)
        delta = W0 * (self.hira_B @ self.hira_A).to(W0.dtype)
        return in_base_layout(delta, self.transposed)
