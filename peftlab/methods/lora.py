"""LoRA: Low-Rank Adaptation of Large Language Models.

Hu et al., 2021, https://arxiv.org/abs/2106.09685 (rsLoRA scaling: Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732).

The pretrained weight W0 (d_out x d_in) stays frozen; the update is a product of two thin
matrices, so only r (d_in + d_out) numbers train per layer:

        x ──┬──────────── W0 ─────────────┐
            │                             (+) ──▶ h = W0 x + (alpha / r) · B A x
            └─ dropout ─ A (r x d_in) ─ B (d_out x r) ─ · alpha/r ┘

A starts Kaiming-uniform and B at zero, so B A = 0 and the adapted model starts exactly at the
pretrained one (paper, section 4.1). ``scaling = alpha / r`` keeps the update's size roughly
independent of r when alpha is fixed; rsLoRA uses ``alpha / sqrt(r)``, which keeps learning
stable at large ranks.

For an embedding layer the input is token ids, so ``A x`` becomes a row lookup in A's
transpose; for transformers' GPT-2 ``Conv1D`` the base weight is stored transposed. On a
convolution (nn.Conv1d/2d/3d) A and B are themselves convolutions: see :class:`ConvLoRA`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import CONV_LAYERS, Adapter, ConvShape, check_zero_padding, conv_shape, conv_with, layer_dims
from peftlab.methods.base import AdapterConfig, check_rank, check_range


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    r: int = 8  # rank of the update B A
    alpha: float = 8.0  # scale numerator: scaling = alpha / r (alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.0  # dropout on the adapter's input only; the base path never drops
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # "kaiming" (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r)) or "loftq" (see
    # peftlab/quant/loftq.py: the base weight becomes NF4-quantised, B A carries the error)
    init: str = "kaiming"

    def __post_init__(self) -> None:
        check_rank(self.r)
        check_range("alpha", self.alpha, low=0.0, low_open=True)
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.init not in ("kaiming", "gaussian", "loftq"):
            raise ConfigError(
                f"LoRA init={self.init!r} is not known. Expected 'kaiming', 'gaussian' or 'loftq'."
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class LoftQConfig(LoRAConfig):
    """LoRA initialised by LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659)."""

    init: str = "loftq"
    loftq_bits: int = 4  # bits of the quantised base (NF4: only 4)
    loftq_iter: int = 1  # alternating quantise / SVD rounds (peft's default: 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "loftq":
            raise ConfigError(f"The loftq method is LoRA with init='loftq'; got init={self.init!r}. "
                              "Expected init='loftq'; for another init use method 'lora'.")
        if self.loftq_bits != 4:
            raise ConfigError(f"loftq_bits={self.loftq_bits!r} is not supported. Expected 4 (NF4).")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_iter={self.loftq_iter!r} is invalid. Expected a positive integer.")


class LoRA(Adapter):
    """h = W0 x + scaling · B A dropout(x), for nn.Linear, Conv1D and nn.Embedding bases."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        check_rank(config.r, d_in, d_out)
        self.r, self.scaling = config.r, config.scaling
        self.is_embedding = isinstance(base, nn.Embedding)
        self.transposed = type(base).__name__ == "Conv1D"  # Conv1D stores W as (d_in, d_out)
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(d_out, config.r))  # (d_out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters(config.init)
        if config.init == "loftq":  # LoftQ also replaces the base weight W by its NF4 version Q
            from peftlab.quant.loftq import loftq_init_lora

            loftq_init_lora(base, self, getattr(config, "loftq_bits", 4), getattr(config, "loftq_iter", 1))

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        if self.is_embedding:  # peft's choice for embeddings: A = 0, B ~ N(0, 1)
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:  # same as nn.Linear's default init, applied to A alone
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        if self.is_embedding:  # x holds token ids: "A x" is a lookup of rows of A^T
            update = F.embedding(x, self.lora_A.T) @ self.lora_B.T  # (..., d_out)
            return (result + update * self.scaling).to(result.dtype)
        x = self.dropout(x.to(self.lora_A.dtype))
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., r) -> (..., d_out)
        return (result + update * self.scaling).to(result.dtype)  # add in the adapter's precision

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (d_out, d_in)
        return delta.T if (self.transposed or self.is_embedding) else delta

    def factors(self) -> tuple[Tensor, Tensor]:
        """(left, right) with ΔW = left @ right in (d_out, d_in) layout: for spectra via QR."""
        return self.lora_B * self.scaling, self.lora_A


class ConvLoRA(Adapter):
    """LoRA on a convolution (nn.Conv1d/2d/3d), laid out as peft lays it out:

        h = conv(x; W0) + scaling · B ⋆ (A ⋆ dropout(x))          ⋆: convolution

        A: C_in -> r      the layer's kernel, stride and padding     weight (r, C_in, *kernel)
        B: r -> C_out     1 x 1, the layer's groups                  weight (C_out, r/groups, 1, ...)

    Two convolutions in a row with a 1 x 1 second one are one convolution, so with groups = 1

        ΔW[o, i, k] = scaling · Σ_j B[o, j] A[j, i, k]    i.e.  ΔW = scaling · (B A) reshaped,

    B and A flattened to (C_out, r) and (r, C_in·K), K = the kernel's size; ΔW has the conv weight's
    shape (C_out, C_in, *kernel) and merges. With groups = g > 1, B maps each block of r/g channels
    to its block of C_out/g outputs (a block-diagonal (C_out, r) matrix) but A reads all C_in
    channels, so ΔW is a dense (C_out, C_in, *kernel) kernel that the grouped weight
    (C_out, C_in/g, *kernel) cannot hold: like peft, this adapter then does not merge, and r must be
    a multiple of g. Trainable numbers: r·C_in·K + C_out·r/g.
    """

    conv_layers = CONV_LAYERS
    layer_types = "a convolution (nn.Conv1d, nn.Conv2d, nn.Conv3d)"

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.conv_layers)

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        check_conv_lora(base, config)
        c_in, c_out = layer_dims(base)
        shape = conv_shape(base)
        self.r, self.scaling, self.groups = config.r, config.scaling, shape.groups
        ones = (1,) * len(shape.kernel)
        self.lora_A = nn.Parameter(torch.empty(config.r, c_in, *shape.kernel))  # (r, C_in, *kernel)
        self.lora_B = nn.Parameter(torch.zeros(c_out, config.r // shape.groups, *ones))  # (C_out, r/g, 1..)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / config.r)
        else:  # nn.Conv's default init, applied to A alone; B = 0, so ΔW = 0 at start
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if shape.groups > 1:  # instance attributes: only grouped layers refuse to merge
            self.mergeable = False
            self.unmergeable_reason = (f"its A reads all input channels, so ΔW is a dense kernel that a "
                                       f"conv with groups={shape.groups} cannot hold (peft refuses too)")

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        h = conv_with(base, x, self.lora_A, groups=1)  # (N, r, *out): A sees every input channel
        update = conv_with(base, h, self.lora_B, stride=1, padding=0)  # (N, C_out, *out), grouped 1 x 1
        return (result + update * self.scaling).to(result.dtype)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(left (C_out, r), right (r, C_in·K)) with the dense update = left @ right; B's groups
        become a block-diagonal left factor."""
        blocks = self.lora_B.flatten(1).chunk(self.groups, dim=0)  # g blocks (C_out/g, r/g)
        return torch.block_diag(*blocks) * self.scaling, self.lora_A.flatten(1)

    def delta_weight(self, base: nn.Module) -> Tensor:
        if not self.mergeable:
            raise ConfigError(f"ConvLoRA has no merge on this layer: {self.unmergeable_reason}.")
        left, right = self.factors()
        return (left @ right).view_as(base.weight)  # (C_out, C_in, *kernel)


def check_conv_lora(base: nn.Module, config: LoRAConfig) -> None:
    """The convolutions peft's LoRA computes exactly as its merge does; clear errors for the rest."""
    shape = conv_shape(base)
    if config.init == "loftq":
        raise ConfigError("LoftQ initialises linear layers only. Expected init='kaiming' or 'gaussian' "
                          "for convolutions; try targets that name linear layers for LoftQ.")
    if any(d != 1 for d in base.dilation):
        raise ConfigError(
            f"LoRA on a {type(base).__name__} with dilation={base.dilation} is not supported: peft's "
            "A convolution ignores the dilation, so its output has another size (or, with padding="
            "'same', its merge computes something else). Expected dilation=1; try other targets."
        )
    if config.r % shape.groups:
        raise ConfigError(
            f"Rank r={config.r} is not a multiple of the layer's groups={shape.groups}: B is a grouped "
            f"1 x 1 convolution with r/groups inputs per group. Expected r divisible by {shape.groups}; "
            f"try r={max(shape.groups, config.r - config.r % shape.groups)}."
        )
    check_zero_padding(base, "LoRA")
    c_in, c_out = layer_dims(base)
    check_rank(config.r, c_in * shape.taps, c_out)  # ΔW as a matrix: (C_out, C_in·K)


def lora_parameter_count(d_in: int, d_out: int, config: LoRAConfig, conv: ConvShape | None = None) -> int:
    """r (d_in + d_out) per layer; on a convolution r·C_in·K + C_out·r/groups (A and B above)."""
    if conv is None:
        return config.r * (d_in + d_out)
    return config.r * d_in * conv.taps + d_out * config.r // conv.groups
