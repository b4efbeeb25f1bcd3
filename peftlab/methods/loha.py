"""LoHa: Low-rank Hadamard product adaptation.

Hyeon-Woo et al., 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning, https://arxiv.org/abs/2108.06098; as a fine-tuning method in LyCORIS (Yeh et al., 2024,
Navigating Text-To-Image Customization, https://arxiv.org/abs/2309.14859).

The update is the element-wise (Hadamard) product of two LoRA-style low-rank matrices:

        ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)      W1a, W2a: (d_out, r)   W1b, W2b: (r, d_in)

        x ──┬─────────────────── W0 ────────────────────┐
            │                                          (+) ──▶ h = W0 x + ΔW x
            └── ΔW = s · (W1a W1b) ⊙ (W2a W2b) ─────────┘

rank(X ⊙ Y) <= rank(X) · rank(Y) (FedPara, proposition 1), so with 2 r (d_in + d_out) numbers,
twice LoRA's at the same r, ΔW can reach rank r² instead of r. The same identity gives a thin
factorisation (``factors``): (W1a W1b) ⊙ (W2a W2b) = (W1a ⊙_row W2a)(W1b ⊙_col W2b), where
⊙_row pairs every column of W1a with every column of W2a row by row (inner dimension r²), since
    Σ_k W1a[i,k] W1b[k,j] · Σ_l W2a[i,l] W2b[l,j] = Σ_(k,l) (W1a[i,k] W2a[i,l]) (W1b[k,j] W2b[l,j]).

Init (peft, after FedPara's He init): W1a, W1b, W2a Kaiming-uniform, W2b = 0, so ΔW = 0 at start.
LyCORIS' regularisers, as in peft: ``rank_dropout`` zeroes whole rows of ΔW (output units) during
training and divides the kept ones by their mean; ``module_dropout`` skips the whole adapter for
a training step with that probability.

On a convolution (nn.Conv1d, nn.Conv2d; peft has no LoHa for nn.Conv3d) the same update is the
weight seen as a matrix (C_out, C_in/g · K), K = the kernel's size, reshaped to the conv weight
(C_out, C_in/g, *kernel): h = conv(x; W0 + ΔW) with the layer's stride, padding, dilation and
groups (peft's default, use_effective_conv2d=False). peft computes the Hadamard product with a hand-written
autograd function to save memory; plain autograd gives the same gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, ConvShape, apply_weight, check_zero_padding, conv_shape, matrix_dims
from peftlab.methods.base import AdapterConfig, check_rank, check_range


@dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    r: int = 8  # rank of each of the two factors; ΔW can reach rank r²
    alpha: float = 8.0  # scale numerator: scaling = alpha / r
    rank_dropout: float = 0.0  # probability of dropping each output row of ΔW in training
    module_dropout: float = 0.0  # probability of skipping the whole adapter for a training step
    # peft's CP-decomposed kernel for convolutions (FedPara, proposition 3): not in peftlab, so
    # True is refused on convolutions with a kernel larger than 1 (read from peft's files)
    use_effective_conv2d: bool = False

    def __post_init__(self) -> None:
        check_rank(self.r)
        check_range("alpha", self.alpha, low=0.0, low_open=True)
        check_range("rank_dropout", self.rank_dropout, low=0.0, high=1.0, high_open=True)
        check_range("module_dropout", self.module_dropout, low=0.0, high=1.0, high_open=True)


def drop_rows(delta: Tensor, p: float, rescale: bool = True) -> Tensor:
    """LyCORIS' rank dropout: keep each output row of ΔW with probability 1 - p, then (optionally)
    divide by the fraction kept, as peft does."""
    keep = (torch.rand(delta.shape[0]) > p).to(delta)  # (d_out,)
    if rescale:
        keep = keep / keep.mean().clamp_min(1e-12)  # all rows dropped: ΔW = 0, not NaN
    return delta * keep.unsqueeze(1)


def skip_module(adapter: nn.Module, p: float) -> bool:
    """Module dropout: in training, skip the adapter with probability p. One random draw per
    call in training even when p = 0, like peft, so both draw the same random numbers."""
    return adapter.training and torch.rand(1).item() <= p


class LoHa(Adapter):
    """h = W0 x + s · ((W1a W1b) ⊙ (W2a W2b)) x, for nn.Linear, Conv1D, nn.Conv1d and nn.Conv2d."""

    conv_layers = (nn.Conv1d, nn.Conv2d)  # peft 0.21 has no LoHa for nn.Conv3d
    layer_types = "a linear layer (nn.Linear, transformers' Conv1D) or an nn.Conv1d / nn.Conv2d (peft's LoHa has no nn.Conv3d)"

    def __init__(self, base: nn.Module, config: LoHaConfig) -> None:
        super().__init__()
        if isinstance(base, nn.Embedding):
            raise ConfigError(
                "LoHa adapts linear layers, not embeddings (peft neither). Expected targets that "
                "name nn.Linear layers; try 'all-linear'."
            )
        check_conv_lycoris(base, config, "LoHa")
        d_in, d_out = matrix_dims(base)  # a convolution: (C_in/g · K, C_out)
        check_rank(config.r, d_in, d_out)
        r = config.r
        self.scaling = config.alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.transposed = type(base).__name__ == "Conv1D"  # Conv1D stores W as (d_in, d_out)
        # a convolution's weight (C_out, C_in/g, *kernel): ΔW takes that shape to merge
        self.conv_weight_shape = tuple(base.weight.shape) if conv_shape(base) is not None else None
        self.hada_w1_a = nn.Parameter(torch.empty(d_out, r))  # (d_out, r)
        self.hada_w1_b = nn.Parameter(torch.empty(r, d_in))  # (r, d_in)
        self.hada_w2_a = nn.Parameter(torch.empty(d_out, r))  # (d_out, r)
        self.hada_w2_b = nn.Parameter(torch.zeros(r, d_in))  # (r, d_in): zero, so ΔW = 0
        for w in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def update(self) -> Tensor:
        """ΔW in (d_out, d_in) layout: s · (W1a W1b) ⊙ (W2a W2b)."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + ΔW x,  ΔW = s · (W1a W1b) ⊙ (W2a W2b)
        if skip_module(self, self.module_dropout):
            return result
        delta = self.update()  # (d_out, d_in)
        if self.training and self.rank_dropout > 0:
            delta = drop_rows(delta, self.rank_dropout)
        update = apply_weight(base, x.to(delta.dtype), delta)  # (..., d_out), or (N, C_out, ...)
        return (result + update).to(result.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.update()  # (d_out, d_in): on a convolution reshaped to (C_out, C_in/g, *kernel)
        if self.conv_weight_shape is not None:
            return delta.reshape(self.conv_weight_shape)
        return delta.T if self.transposed else delta

    def factors(self) -> tuple[Tensor, Tensor]:
        """(left (d_out, r²), right (r², d_in)) with ΔW = left @ right in (d_out, d_in) layout."""
        d_out, r = self.hada_w1_a.shape
        left = (self.hada_w1_a.unsqueeze(2) * self.hada_w2_a.unsqueeze(1)).reshape(d_out, r * r)
        right = (self.hada_w1_b.unsqueeze(1) * self.hada_w2_b.unsqueeze(0)).reshape(r * r, -1)
        return left * self.scaling, right


def check_conv_lycoris(base: nn.Module, config: LoHaConfig, method: str) -> None:
    """LoHa and LoKr on a convolution: zero padding (as peft's adapter path pads) and the
    flattened kernel (peft's default); peft's CP-decomposed kernel is not in peftlab."""
    shape = conv_shape(base)
    if shape is None:
        return
    check_zero_padding(base, method)
    if config.use_effective_conv2d and shape.taps > 1:
        raise ConfigError(
            f"{method} with use_effective_conv2d=True (peft's CP-decomposed kernel) is not implemented "
            f"in peftlab. Expected use_effective_conv2d=False (peft's default: the kernel is part of the "
            "flattened weight); try that, or backend='peft'."
        )


def loha_parameter_count(d_in: int, d_out: int, config: LoHaConfig, conv: ConvShape | None = None) -> int:
    """2 r (d_in + d_out) per layer; on a convolution d_in = C_in/groups · K (the matrix view)."""
    if conv is not None:
        d_in = d_in // conv.groups * conv.taps
    return 2 * config.r * (d_in + d_out)
