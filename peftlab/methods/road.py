"""RoAd: 2D rotary adaptation.

Liao et al., 2024, 3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and
Composability, https://arxiv.org/abs/2409.00119

The layer's output h = W0 x + b is cut into pairs of features, and each pair is rotated by a
trained angle θ and scaled by a trained α (paper, eq. 4):

        ⎡y_i⎤   ⎡α cos θ  -α sin θ⎤ ⎡h_i⎤        pairs (i, i + g/2) inside each group of g
        ⎣y_j⎦ = ⎣α sin θ   α cos θ⎦ ⎣h_j⎦        features (g = group_size), j = i + g/2

        x ──▶ W0 ──▶ h ──▶ R h = h ⊙ c + rot_half(h) ⊙ s        c = α cos θ,  s = α sin θ

so y = R (W0 x + b), with R block-sparse (two entries per row): only element-wise products run,
and merging is W' = R W0, b' = R b. ``variant`` decides how many numbers train per layer:
road_1 d_out (one θ, α per pair: d_out / 2 each), road_2 2 d_out (one per feature), road_4
4 d_out (cos and sin parts with their own θ and α). θ = 0, α = 1 at init: R = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import LinearAdapter, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, in_base_layout, is_count
from peftlab.methods.oft import linear_weight

VARIANTS = {"road_1": 1, "road_2": 2, "road_4": 4}  # variant -> trained numbers per output feature, θ and α together


@dataclass(frozen=True)
class RoadConfig(AdapterConfig):
    variant: str = "road_1"  # road_1 | road_2 | road_4: shared, per-feature, or split cos/sin θ and α
    group_size: int = 64  # features per group; feature i pairs with i + group_size/2 (even; divides d_out)
    init_weights: bool = True  # θ = 0, α = 1 (R = I); False: θ ~ N(0, 0.5), α ~ N(1, 0.5) (peft's test init)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"RoAd variant={self.variant!r} is unknown. Expected one of {', '.join(VARIANTS)}; "
                              "try 'road_1' (fewest parameters).")
        if not is_count(self.group_size, 2) or self.group_size % 2:
            raise ConfigError(f"RoAd group_size={self.group_size!r} is invalid. Expected an even positive "
                              "integer that divides the adapted layers' d_out; try 64, or 8 on tiny models.")


def road_parameter_count(d_in: int, d_out: int, config: RoadConfig) -> int:
    """θ and α, d_out / 2 each for road_1, d_out each for road_2, 2 d_out each for road_4."""
    return d_out * VARIANTS[config.variant]


class RoAd(LinearAdapter):
    """h = R (W0 x + b), R a grouped 2D rotation-and-scale; merged: W' = R W0, b' = R b."""

    delta_uses_base = True  # ΔW = (R - I) W0
    def __init__(self, base: nn.Module, config: RoadConfig) -> None:
        super().__init__()
        _, d_out = layer_dims(base)
        if d_out % config.group_size:
            fits = [g for g in range(2, min(d_out, 64) + 1, 2) if d_out % g == 0]
            raise ConfigError(
                f"RoAd group_size={config.group_size} does not divide this layer's d_out={d_out} (peft refuses it "
                "too). Expected an even group_size that divides every adapted layer's output; try "
                + (f"group_size={fits[-1]}, or " if fits else "") + "other targets."
            )
        self.variant, self.group_size, self.transposed = config.variant, config.group_size, is_conv1d(base)
        size = d_out * VARIANTS[config.variant] // 2
        self.road_theta = nn.Parameter(torch.zeros(size))
        self.road_alpha = nn.Parameter(torch.ones(size))
        if not config.init_weights:
            with torch.no_grad():
                self.road_theta.normal_(0.0, 0.5)
                self.road_alpha.normal_(1.0, 0.5)

    def columns(self) -> tuple[Tensor, Tensor]:
        """(c, s), each (d_out,): the coefficients of h and of rot_half(h) in R h."""
        half, theta, alpha = self.group_size // 2, self.road_theta, self.road_alpha
        if self.variant == "road_1":  # one θ, α per pair: both halves of a group read the same
            theta = theta.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
            alpha = alpha.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        if self.variant == "road_4":  # per group: first g numbers for c, next g for s
            theta, alpha = theta.reshape(-1, 2, self.group_size), alpha.reshape(-1, 2, self.group_size)
            return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()
        return alpha * theta.cos(), alpha * theta.sin()

    def rotate(self, h: Tensor) -> Tensor:
        """R h on the last axis of h (..., d_out)."""
        c, s = self.columns()
        halves = h.reshape(-1, 2, self.group_size // 2)  # (groups, 2, g/2): first and second half
        rot_half = torch.stack((-halves[:, 1], halves[:, 0]), dim=1).reshape(h.shape)
        return h * c + rot_half * s

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = R (W0 x + b): the output turned, pair by pair
        return self.rotate(result.to(self.road_theta.dtype)).to(result.dtype)

    def rotation(self) -> Tensor:
        """R (d_out, d_out): rotate() applied to the identity's rows gives Rᵀ."""
        d_out = self.road_theta.shape[0] * 2 // VARIANTS[self.variant]
        return self.rotate(torch.eye(d_out, dtype=self.road_theta.dtype, device=self.road_theta.device)).T

    def delta_weight(self, base: nn.Module) -> Tensor:
        W0 = linear_weight(base)  # (d_out, d_in)
        return in_base_layout(self.rotation().to(W0.dtype) @ W0 - W0, self.transposed)

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        bias = getattr(base, "bias", None)
        return None if bias is None else self.rotation().to(bias.dtype) @ bias - bias
