"""HRA: Householder Reflection Adaptation.

Yuan et al., 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation, https://arxiv.org/abs/2405.17484

The frozen weight W0 (d_out x d_in) is multiplied on the right by a chain of r Householder
reflections, each a mirror through the hyperplane orthogonal to a trained unit vector u_i (paper,
eq. 3):

        W' = W0 H,      H = H_1 H_2 ... H_r,      H_i = I - 2 u_i u_iᵀ,  u_i = v_i / ||v_i||

        x ──▶ x Hᵀ ──▶ W0 ──▶ h = W0 (Hᵀ x) + b        (H orthogonal: angles between W0's rows kept)

H is orthogonal, so HRA is an orthogonal fine-tuning (like OFT) whose update W0 H - W0 has rank
at most r (like LoRA): it trains r · d_in numbers per layer, the columns v_i of ``hra_u``
(d_in, r). At init the columns come in equal pairs (v_1 = v_2, v_3 = v_4, ...): two equal
reflections cancel, H = I, and the model starts at the pretrained one (peft's symmetric init,
which needs an even r; an odd r starts Kaiming-uniform, H != I, with a warning, as in peft).
With ``apply_GS`` the columns are orthonormalised (Gram-Schmidt) first and H = I - 2 U Uᵀ.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError, PeftlabWarning
from peftlab.inject import LinearAdapter, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, check_rank, in_base_layout
from peftlab.methods.oft import linear_weight


@dataclass(frozen=True)
class HRAConfig(AdapterConfig):
    r: int = 8  # number of Householder reflections (columns of hra_u); even for H = I at init
    apply_GS: bool = False  # Gram-Schmidt the reflection vectors first: H = I - 2 U Uᵀ
    init_weights: bool = True  # peft's symmetric init (H = I); False: Kaiming-uniform, H != I

    def __post_init__(self) -> None:
        check_rank(self.r)
        for name in ("apply_GS", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid. Expected True or False.")


def hra_parameter_count(d_in: int, d_out: int, config: HRAConfig) -> int:
    """r reflection vectors of length d_in per layer."""
    return d_in * config.r


class HRA(LinearAdapter):
    """h = W0 (Hᵀ x) + b, H = ∏ (I - 2 u_i u_iᵀ); merged: W' = W0 H."""

    delta_uses_base = True  # ΔW = W0 (H - I) depends on W0
    def __init__(self, base: nn.Module, config: HRAConfig) -> None:
        super().__init__()
        d_in, _ = layer_dims(base)
        self.r, self.apply_GS, self.transposed = config.r, config.apply_GS, is_conv1d(base)
        self.hra_u = nn.Parameter(torch.empty(d_in, config.r))  # (d_in, r): one vector per column
        if config.init_weights and config.r % 2 == 0:  # pairs of equal reflections cancel: H = I
            half = torch.zeros(d_in, config.r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            with torch.no_grad():
                self.hra_u.copy_(torch.repeat_interleave(half, 2, dim=1))
        else:
            if config.init_weights:
                warnings.warn(f"HRA with odd r={config.r} cannot start at H = I (its reflections pair up); it "
                              "starts Kaiming-uniform, as peft's does. Try an even r.", PeftlabWarning, stacklevel=2)
            nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    def householder(self) -> Tensor:
        """H (d_in, d_in) = H_1 ... H_r (with apply_GS: I - 2 U Uᵀ, U orthonormalised)."""
        u = self.hra_u
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        if self.apply_GS:  # classical Gram-Schmidt, column by column, as peft
            basis = [u[:, :1] / u[:, 0].norm()]
            for i in range(1, self.r):
                ui = u[:, i : i + 1]
                for q in basis:
                    ui = ui - (q.T @ ui) * q
                basis.append(ui / ui.norm())
            U = torch.cat(basis, dim=1)  # (d_in, r)
            return eye - 2 * U @ U.T
        u = u / u.norm(dim=0)
        H = eye
        for i in range(self.r):  # H <- H (I - 2 u_i u_iᵀ)
            ui = u[:, i : i + 1]
            H = H - 2 * (H @ ui) @ ui.T
        return H

    def layer_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> Tensor:
        # h = W0 H x' + b with x' = x as a row: the frozen layer runs on x Hᵀ
        H = self.householder()
        return base((x.to(H.dtype) @ H.T).to(x.dtype), *args, **kwargs)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # stacked after another adapter: h = result + W0 (Hᵀ x - x), the same change
        H = self.householder()
        x = x.to(H.dtype)
        change = F.linear(x @ H.T - x, linear_weight(base).to(H.dtype))  # (..., d_out)
        return (result + change).to(result.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        W0 = linear_weight(base)  # (d_out, d_in)
        H = self.householder().to(W0.dtype)
        return in_base_layout(W0 @ H - W0, self.transposed)
