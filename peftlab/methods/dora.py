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

Other layers, in peft's layouts. An nn.Embedding's table W0 (vocab, d) is the (d, vocab) weight
of a linear map on one-hot ids, so ||·||_c is one norm per embedding dimension, over the whole
vocabulary; peft scales the looked-up row as a whole (no dropout, no bias):

        h = (m/n) ⊙ W0[x] + (m/n) ⊙ s·(B A)ᵀ[x]                   m, n: (d,)

A convolution's weight (C_out, C_in/g, *kernel) is a matrix (C_out, C_in/g·K) applied to every
patch (see ConvLoRA in lora.py, whose A and B :class:`ConvDoRA` lays out alike): one norm and one
magnitude per output channel, and the equations above with the convolution for the matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import (CONV_LAYERS, Adapter, ConvShape, adapted_layers, conv_shape, conv_with,
                            dense_weight, embed_scale, is_conv1d, layer_dims)
from peftlab.methods.base import (AdapterConfig, LayerActivations, SavedActivations, check_range,
                                  check_rank, in_base_layout, low_rank_activations)
from peftlab.methods.lora import check_conv_lora


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
    """h = m ⊙ (W0 + s·B A) dropout(x) / ||W0 + s·B A||_c + bias, for nn.Linear, Conv1D and nn.Embedding."""

    delta_uses_base = True  # ΔW = W' - W0 depends on W0

    def __init__(self, base: nn.Module, config: DoRAConfig) -> None:
        super().__init__()
        self.r, self.scaling = config.r, config.scaling
        self.lora_A, self.lora_B = self.make_factors(base, config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        with torch.no_grad():  # m = ||W0 + s·BA||_c, which is ||W0||_c while B A = 0
            self.magnitude = nn.Parameter(self.weight_norm(base))  # (d_out,); a conv's (1, C_out, 1, ...)

    def make_factors(self, base: nn.Module, config: DoRAConfig) -> tuple[nn.Parameter, nn.Parameter]:
        """A (r, d_in) and B (d_out, r), initialised as peft does."""
        d_in, d_out = layer_dims(base)
        check_rank(config.r, d_in, d_out)
        self.is_embedding = isinstance(base, nn.Embedding)
        if self.is_embedding and base.max_norm is not None:
            raise ConfigError(
                f"DoRA on an nn.Embedding with max_norm={base.max_norm} is not supported: the lookup "
                "would renormalise columns of the trainable A in place during the forward pass. "
                "Expected max_norm=None; try other targets, or an embedding without max_norm."
            )
        # Conv1D and nn.Embedding store W as (d_in, d_out)
        self.transposed = self.is_embedding or is_conv1d(base)
        lora_A = nn.Parameter(torch.empty(config.r, d_in))  # (r, d_in)
        lora_B = nn.Parameter(torch.zeros(d_out, config.r))  # (d_out, r)
        if self.is_embedding:  # peft's choice for embeddings, as in LoRA: A = 0, B ~ N(0, 1)
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)
        elif config.init == "gaussian":
            nn.init.normal_(lora_A, std=1 / config.r)
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        return lora_A, lora_B

    def base_weight(self, base: nn.Module) -> Tensor:
        """W0 as a (d_out, d_in) tensor in the adapter's dtype (4-bit weights dequantised)."""
        weight = dense_weight(base)
        return (weight.T if self.transposed else weight).to(self.lora_A.dtype)

    def lora_weight(self) -> Tensor:
        """B A, (d_out, d_in), multiplied as peft multiplies it, so that the norms round alike:
        (Aᵀ Bᵀ)ᵀ, with Aᵀ a contiguous copy on linear layers (peft pushes an identity through A)."""
        if self.is_embedding:
            return (self.lora_A.T @ self.lora_B.T).T
        return F.linear(self.lora_A.T.contiguous(), self.lora_B).T

    def weight_norm(self, base: nn.Module) -> Tensor:
        """n = ||W0 + s·B A||_c, (d_out,), detached: a constant to autograd (section 4.3)."""
        weight = self.base_weight(base)  # at init the factors may sit on another device than W0
        return row_norm(weight + self.scaling * self.lora_weight().detach().to(weight.device)).detach()

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # W' x = m ⊙ (W0 + s·BA) x / ||W0 + s·BA||_c, with the norm a constant (section 4.3)
        factor = self.magnitude / self.weight_norm(base)  # (d_out,): broadcasts over (..., d_out)
        if self.is_embedding:  # x holds token ids: "B A x" is a lookup of rows of (B A)ᵀ
            rows = F.embedding(x, self.lora_A.T, padding_idx=base.padding_idx,
                               scale_grad_by_freq=base.scale_grad_by_freq)  # (..., r)
            update = factor * (rows @ self.lora_B.T) * self.scaling
            scale = embed_scale(base)  # after the norm, as peft: a scaled embedding (Gemma) scales it
            return (factor * result + (update if scale is None else update * scale.to(update.dtype))).to(result.dtype)
        x = x.to(self.lora_A.dtype)
        dropped = self.dropout(x)
        if self.training and isinstance(self.dropout, nn.Dropout):
            base_out = F.linear(dropped, self.base_weight(base))  # W0 dropout(x)
        else:  # W0 x is the base output minus its bias: no need to compute it again
            bias = getattr(base, "bias", None)
            base_out = result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B)  # B A x, (..., d_out)
        # grouped as peft groups it, so that both round alike in float32
        return (result + ((factor - 1) * base_out + factor * lora * self.scaling)).to(result.dtype)

    def merged_weight(self, base: nn.Module) -> Tensor:
        """W' = m ⊙ (W0 + s·BA) / ||W0 + s·BA||_c, shape (d_out, d_in)."""
        directed = self.base_weight(base) + self.scaling * self.lora_weight()
        return (self.magnitude.view(-1) / row_norm(directed)).unsqueeze(1) * directed

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: LoRA's, and for m's gradient W0 x and B A x (the fused backend:
        z = W0 x + s B A x alone, in the compute dtype)."""
        kept = layer.compute_bytes if layer.fused else 2 * layer.adapter_bytes
        saved = low_rank_activations(layer, self.r, self.dropout)
        return replace(saved, outputs=layer.tokens * layer.d_out * kept)  # (N, d_out) twice, or z

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.merged_weight(base) - self.base_weight(base)  # (d_out, d_in)
        return in_base_layout(delta, self.transposed)

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
        magnitude_change = (self.magnitude.view(-1) - row_norm(weight)).abs().mean()
        direction_change = (1 - F.cosine_similarity(new, weight, dim=1)).mean()
        return {"magnitude_change": magnitude_change.item(), "direction_change": direction_change.item()}


class ConvDoRA(DoRA):
    """DoRA on a convolution (nn.Conv1d/2d/3d): A and B laid out as ConvLoRA's, one magnitude per channel.

        W0 (C_out, C_in/g, *kernel), read as the matrix (C_out, C_in/g·K)
        A (r, C_in, *kernel), B (C_out, r/g, 1, ...): flattened, ΔV = s · B A  (C_out, C_in·K)
        h = conv(x; W0) + b + (m/n - 1) ⊙ conv(x; W0) + (m/n) ⊙ s · B ⋆ (A ⋆ x),  n = ||W0 + ΔV||_c

    m has shape (1, C_out, 1, ...), as in peft's files, so that it broadcasts over the output
    (N, C_out, *spatial). With groups = g > 1, ΔV does not fit the grouped weight; peft then
    re-reads B's C_out·r/g numbers as a (C_out/g, r) matrix and reshapes that product to W0's
    shape, so its n is not the norm of the adapted weight. peftlab computes the same n, so that
    peft's adapters load and run unchanged, and, like peft, does not merge such a layer.
    """

    conv_layers = CONV_LAYERS
    layer_types = "a convolution (nn.Conv1d, nn.Conv2d, nn.Conv3d)"

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.conv_layers)

    def make_factors(self, base: nn.Module, config: DoRAConfig) -> tuple[nn.Parameter, nn.Parameter]:
        check_conv_lora(base, config)  # dilation 1, r a multiple of groups, zero padding, the rank
        c_in, c_out = layer_dims(base)
        shape = conv_shape(base)
        self.groups, self.transposed, self.is_embedding = shape.groups, False, False
        self.channels = (1, c_out) + (1,) * len(shape.kernel)  # m's shape
        ones = (1,) * len(shape.kernel)
        lora_A = nn.Parameter(torch.empty(config.r, c_in, *shape.kernel))  # (r, C_in, *kernel)
        lora_B = nn.Parameter(torch.zeros(c_out, config.r // shape.groups, *ones))  # (C_out, r/g, 1..)
        if config.init == "gaussian":
            nn.init.normal_(lora_A, std=1 / config.r)
        else:  # nn.Conv's default init, applied to A alone; B = 0, so ΔV = 0 at start
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if shape.groups > 1:  # instance attributes: only grouped layers refuse to merge
            self.mergeable = False
            self.unmergeable_reason = (f"with groups={shape.groups} its ΔV is a dense kernel that the "
                                       "grouped weight cannot hold (peft refuses too)")
        return lora_A, lora_B

    def base_weight(self, base: nn.Module) -> Tensor:
        """W0 as the matrix (C_out, C_in/g·K), in the adapter's dtype."""
        return base.weight.flatten(1).to(self.lora_A.dtype)

    def lora_weight(self) -> Tensor:
        """B A as a (C_out, C_in/g·K) matrix, B read as (C_out/g, r) rows as peft reads it (g = 1: B)."""
        return (self.lora_B.reshape(-1, self.r) @ self.lora_A.reshape(self.r, -1)).reshape(len(self.lora_B), -1)

    def weight_norm(self, base: nn.Module) -> Tensor:
        return super().weight_norm(base).view(self.channels)  # (1, C_out, 1, ...)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        factor = self.magnitude / self.weight_norm(base)  # (1, C_out, 1, ...)
        x = x.to(self.lora_A.dtype)
        dropped = self.dropout(x)
        if self.training and isinstance(self.dropout, nn.Dropout):
            base_out = conv_with(base, dropped, base.weight.to(x.dtype))  # conv(dropout(x); W0)
        else:  # conv(x; W0) is the base output minus its bias
            bias = base.bias.to(x.dtype).view(self.channels[1:]) if base.bias is not None else 0
            base_out = result.to(x.dtype) - bias
        h = conv_with(base, dropped, self.lora_A, groups=1)  # (N, r, *out): A sees every input channel
        lora = conv_with(base, h, self.lora_B, stride=1, padding=0)  # (N, C_out, *out), grouped 1 x 1
        return (result + ((factor - 1) * base_out + factor * lora * self.scaling)).to(result.dtype)

    def merged_weight(self, base: nn.Module) -> Tensor:
        if not self.mergeable:
            raise ConfigError(f"ConvDoRA has no merged weight on this layer: {self.unmergeable_reason}.")
        return super().merged_weight(base)  # (C_out, C_in·K)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return super().delta_weight(base).view_as(base.weight)  # (C_out, C_in, *kernel)

    def singular_values(self, base: nn.Module) -> Tensor:
        """Of ΔW = W' - W0 as the matrix (C_out, C_in·K), the layout the spectra read convolutions in."""
        return torch.linalg.svdvals(super().delta_weight(base))

    def direction_factors(self) -> tuple[Tensor, Tensor]:
        """(s·B, A) of the forward's update, (C_out, r) and (r, C_in·K); B's groups become a
        block-diagonal left factor."""
        blocks = self.lora_B.flatten(1).chunk(self.groups, dim=0)  # g blocks (C_out/g, r/g)
        return self.scaling * torch.block_diag(*blocks), self.lora_A.flatten(1)


def dora_parameter_count(d_in: int, d_out: int, config: DoRAConfig, conv: ConvShape | None = None) -> int:
    """LoRA's A and B plus one magnitude per output unit: r (d_in + d_out) + d_out; on a
    convolution r·C_in·K + C_out·r/groups + C_out."""
    if conv is None:
        return config.r * (d_in + d_out) + d_out
    return config.r * d_in * conv.taps + d_out * config.r // conv.groups + d_out


def dora_stats(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """{layer name: {"magnitude_change": ΔM, "direction_change": ΔD}} for every DoRA layer.

    Call it every few training steps and plot the pairs to redraw the paper's figure 2 (DoRA moves
    magnitude and direction with a negative correlation, LoRA/full fine-tuning a positive one).
    Grouped convolutions are left out: there W' is not defined (see :class:`ConvDoRA`).
    """
    out = {}
    for name, layer in adapted_layers(model).items():
        key = adapter_name or layer.active[0]
        adapter = layer.adapters[key] if key in layer.adapters else None
        if not isinstance(adapter, DoRA) or not adapter.mergeable:
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
