"""DoRA: Weight-Decomposed Low-Rank Adaptation.

Liu et al., 2024, https://arxiv.org/abs/2402.09353

DoRA writes each pretrained weight as a magnitude times a direction, W0 = m ⊙ V / ||V||_c, and
fine-tunes the two apart: the magnitude vector m directly (one number per output unit), the
direction through a LoRA update of V = W0 (paper, eq. 5):

        W' = m ⊙ (W0 + s·B A) / ||W0 + s·B A||_c            s = alpha / r

||·||_c is the norm of each output unit's weight vector: a row of our (d_out, d_in) weight, a
"column" in the paper's x W layout. m starts at ||W0||_c and B at zero, so W' = W0 at first.

        x ──┬───────────── W0 ──────────────┐
            │                              (+) ── ⊙ m / ||W0 + s·BA||_c ──▶ h (+ bias)
            └─ dropout ─ A ─ B ─ · s ───────┘        └─ a constant to autograd (section 4.3)

The paper (section 4.3) treats ||W0 + s·BA||_c as a constant in backpropagation: it follows the
current B A but receives no gradient, which saves much memory at no loss of accuracy; peft does
the same. The base layer has already computed W0 x + bias, so the adapter adds

        (m/n - 1) ⊙ W0 x + (m/n) ⊙ s·B A x,          n = ||W0 + s·BA||_c (detached)

With dropout on, both terms see dropout(x) (peft's choice), so W0 dropout(x) is recomputed.
``dora_stats`` measures the paper's figure 2: how far magnitude and direction moved from W0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, adapted_layers, dense_weight, layer_dims
from peftlab.methods.base import AdapterConfig, check_rank, check_range


@dataclass(frozen=True)
class DoRAConfig(AdapterConfig):
    r: int = 8  # rank of the direction update B A
    alpha: float = 8.0  # scale numerator: s = alpha / r (alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.0  # dropout on the adapter's input; the frozen base output never drops
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    init: str = "kaiming"  # "kaiming" (A Kaiming-uniform, B = 0) or "gaussian" (A ~ N(0, 1/r))

    def __post_init__(self) -> None:
        check_rank(self.r)
        check_range("alpha", self.alpha, low=0.0, low_open=True)
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"DoRA init={self.init!r} is not known. Expected 'kaiming' or 'gaussian'.")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def row_norm(weight: Tensor) -> Tensor:
    """||W||_c of a (d_out, d_in) weight: one L2 norm per output unit, shape (d_out,)."""
    return torch.linalg.vector_norm(weight, dim=1)


class DoRA(Adapter):
    """h = m ⊙ (W0 + s·B A) dropout(x) / ||W0 + s·B A||_c + bias, for nn.Linear and Conv1D."""

    delta_uses_base = True  # ΔW = W' - W0 depends on W0

    def __init__(self, base: nn.Module, config: DoRAConfig) -> None:
        super().__init__()
        if isinstance(base, nn.Embedding):
            raise ConfigError(
                "peftlab's DoRA adapts linear layers, not embeddings. Expected targets that name "
                "nn.Linear layers; try 'all-linear', or method 'lora' for the embedding."
            )
        d_in, d_out = layer_dims(base)
        check_rank(config.r, d_in, d_out)
        self.r, self.scaling = config.r, config.scaling
        self.transposed = type(base).__name__ == "Conv1D"  # Conv1D stores W as (d_in, d_out)
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, config.r))  # (d_out, r)
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        with torch.no_grad():  # m = ||W0 + s·BA||_c, which is ||W0||_c while B = 0
            weight = self.base_weight(base).float()
            norm = row_norm(weight + self.scaling * (self.lora_B @ self.lora_A).to(weight.device))
        self.magnitude = nn.Parameter(norm.to(self.lora_A.device))  # (d_out,)

    def base_weight(self, base: nn.Module) -> Tensor:
        """W0 as a (d_out, d_in) tensor in the adapter's dtype (4-bit weights dequantised)."""
        weight = dense_weight(base)
        return (weight.T if self.transposed else weight).to(self.lora_A.dtype)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # W' x = m ⊙ (W0 + s·BA) x / ||W0 + s·BA||_c, with the norm a constant (section 4.3)
        weight = self.base_weight(base)  # (d_out, d_in)
        lora_weight = (self.lora_B @ self.lora_A).detach()
        norm = row_norm(weight + self.scaling * lora_weight).detach()  # (d_out,)
        factor = self.magnitude / norm  # (d_out,): broadcasts over the last dim of (..., d_out)
        x = x.to(self.lora_A.dtype)
        dropped = self.dropout(x)
        if self.training and isinstance(self.dropout, nn.Dropout):
            base_out = F.linear(dropped, weight)  # W0 dropout(x)
        else:  # W0 x is the base output minus its bias: no need to compute it again
            bias = getattr(base, "bias", None)
            base_out = result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B)  # B A x, (..., d_out)
        # grouped as peft groups it, so that both round alike in float32
        return (result + ((factor - 1) * base_out + factor * lora * self.scaling)).to(result.dtype)

    def merged_weight(self, base: nn.Module) -> Tensor:
        """W' = m ⊙ (W0 + s·BA) / ||W0 + s·BA||_c, shape (d_out, d_in)."""
        directed = self.base_weight(base) + self.scaling * (self.lora_B @ self.lora_A)
        return (self.magnitude / row_norm(directed)).unsqueeze(1) * directed

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.merged_weight(base) - self.base_weight(base)  # (d_out, d_in)
        return delta.T if self.transposed else delta

    def direction_factors(self) -> tuple[Tensor, Tensor]:
        """(s·B, A): the low-rank update of the direction's numerator, V = W0 + (s·B) A.

        ΔW itself is not low-rank (m / ||V||_c rescales every row of W0), but the direction moves
        only through this rank-r product, so its spectrum comes from the factors.
        """
        return self.scaling * self.lora_B, self.lora_A  # (d_out, r), (r, d_in)

    @torch.no_grad()
    def stats(self, base: nn.Module) -> dict[str, float]:
        """The paper's ΔM and ΔD (section 3, figure 2) against the pretrained W0:
        ΔM = mean_n |m_n - ||W0_n|||,  ΔD = mean_n (1 - cos(W'_n, W0_n)) over output units n."""
        weight = self.base_weight(base)
        new = self.merged_weight(base)
        magnitude_change = (self.magnitude - row_norm(weight)).abs().mean()
        direction_change = (1 - F.cosine_similarity(new, weight, dim=1)).mean()
        return {"magnitude_change": magnitude_change.item(), "direction_change": direction_change.item()}


def dora_stats(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """{layer name: {"magnitude_change": ΔM, "direction_change": ΔD}} for every DoRA layer.

    Call it every few training steps and plot the pairs to redraw the paper's figure 2 (DoRA moves
    magnitude and direction with a negative correlation, LoRA/full fine-tuning a positive one).
    """
    out = {}
    for name, layer in adapted_layers(model).items():
        key = adapter_name or layer.active[0]
        adapter = layer.adapters[key] if key in layer.adapters else None
        if not isinstance(adapter, DoRA):
            continue
        if key in layer.merged:
            raise ConfigError(
                f"Layer {name!r} has DoRA merged into its weight, so W0 is no longer at hand. "
                "Expected an unmerged model; try peftlab.unmerge(model) first."
            )
        out[name] = adapter.stats(layer.base_layer)
    if not out:
        raise ConfigError(
            "This model has no DoRA adapter. Expected a model from peftlab.adapt(model, 'dora')."
        )
    return out
