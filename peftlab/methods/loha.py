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

``use_effective_conv2d=True`` (FedPara, proposition 3; kernels larger than 1) keeps the kernel out
of the low-rank factors: each factor is a small core T (r, r, kh, kw) read by an output factor
U (r, C_out) and an input factor V (r, C_in/g) (a Tucker-2 form; peft and LyCORIS call it CP),

        W1[o, i, :, :] = Σ_(a,b) U1[a, o] · V1[b, i] · T1[a, b, :, :]          (C_out, C_in/g, kh, kw)
        ΔW = s · W1 ⊙ W2                      2 (r² K + r (C_out + C_in/g)) numbers instead of
                                              2 r (C_out + C_in/g · K)

(nn.Conv1d: T is (r, r, k, 1), as peft stores it). As a matrix W1 = U1^T M1, M1 = Σ_b V1[b] T1[:, b]
(r, C_in/g · K), so ``factors`` and rank(ΔW) <= r² hold as above. peft's hand-written backward
for this form returns wrong gradients for U1 and U2 (hada_w1_a, hada_w2_a: it uses the other
factor's core); peftlab's are autograd's, the true ones. Outputs, and the other gradients, agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import (Adapter, ConvShape, apply_weight, check_zero_padding, conv_shape, is_conv1d,
                            matrix_dims)
from peftlab.methods.base import (AdapterConfig, LayerActivations, SavedActivations, check_range,
                                  check_rank, in_base_layout)


@dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    r: int = 8  # rank of each of the two factors; ΔW can reach rank r²
    alpha: float = 8.0  # scale numerator: scaling = alpha / r
    rank_dropout: float = 0.0  # probability of dropping each output row of ΔW in training
    module_dropout: float = 0.0  # probability of skipping the whole adapter for a training step
    # convolutions with a kernel larger than 1: each factor as a core (r, r, *kernel) between
    # channel factors (FedPara, proposition 3), peft's "CP-decomposed kernel"
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
    """h = W0 x + s · ((W1a W1b) ⊙ (W2a W2b)) x, for nn.Linear, Conv1D, nn.Conv1d and nn.Conv2d
    (with use_effective_conv2d on a convolution W_i = U_i^T M_i, see the module docstring)."""

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
        self.transposed = is_conv1d(base)  # Conv1D stores W as (d_in, d_out)
        # a convolution's weight (C_out, C_in/g, *kernel): ΔW takes that shape to merge
        shape = conv_shape(base)
        self.conv_weight_shape = tuple(base.weight.shape) if shape is not None else None
        self.cp = uses_cp(base, config)
        if self.cp:  # U (r, C_out), V (r, C_in/g), core T (r, r, *kernel); Conv1d: (r, r, k, 1)
            kernel = (*shape.kernel, 1) if len(shape.kernel) == 1 else shape.kernel
            c_in = d_in // shape.taps
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel))
            self.hada_w1_a = nn.Parameter(torch.empty(r, d_out))
            self.hada_w1_b = nn.Parameter(torch.empty(r, c_in))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            self.hada_w2_a = nn.Parameter(torch.empty(r, d_out))
            self.hada_w2_b = nn.Parameter(torch.zeros(r, c_in))  # zero, so ΔW = 0
        else:
            self.hada_w1_a = nn.Parameter(torch.empty(d_out, r))  # (d_out, r)
            self.hada_w1_b = nn.Parameter(torch.empty(r, d_in))  # (r, d_in)
            self.hada_w2_a = nn.Parameter(torch.empty(d_out, r))  # (d_out, r)
            self.hada_w2_b = nn.Parameter(torch.zeros(r, d_in))  # (r, d_in): zero, so ΔW = 0
        for name, w in self.named_parameters():
            if name != "hada_w2_b":
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        """(A (d_out, r), B (r, d_in)) with the i-th Hadamard factor W_i = A B in matrix layout;
        in the CP form A = U^T and B = M, V read through the core: (r, C_in/g · K)."""
        a, b = getattr(self, f"hada_w{i}_a"), getattr(self, f"hada_w{i}_b")
        if not self.cp:
            return a, b
        core = getattr(self, f"hada_t{i}")  # (r, r, kh, kw)
        read = torch.einsum("abhw,bc->achw", core, b)  # (r, C_in/g, kh, kw)
        return a.T, read.flatten(1)  # (C_out, r), (r, C_in/g · K)

    def update(self) -> Tensor:
        """ΔW in (d_out, d_in) layout: s · (W1a W1b) ⊙ (W2a W2b)."""
        (a1, b1), (a2, b2) = self.pair(1), self.pair(2)
        return (a1 @ b1) * (a2 @ b2) * self.scaling

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + ΔW x,  ΔW = s · (W1a W1b) ⊙ (W2a W2b)
        if skip_module(self, self.module_dropout):
            return result
        delta = self.update()  # (d_out, d_in)
        if self.training and self.rank_dropout > 0:
            delta = drop_rows(delta, self.rank_dropout)
        update = apply_weight(base, x.to(delta.dtype), delta)  # (..., d_out), or (N, C_out, ...)
        return (result + update).to(result.dtype)

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: x, the two Hadamard factors (d_out, d_in) each, and the
        materialised ΔW wherever x needs a gradient (x's gradient is ΔWᵀ times the output's)."""
        weight = layer.d_out * layer.d_in * layer.adapter_bytes
        return SavedActivations(own=2 * weight + (weight if layer.input_grad else 0))

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.update()  # (d_out, d_in): on a convolution reshaped to (C_out, C_in/g, *kernel)
        if self.conv_weight_shape is not None:
            return delta.reshape(self.conv_weight_shape)
        return in_base_layout(delta, self.transposed)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(left (d_out, r²), right (r², d_in)) with ΔW = left @ right in (d_out, d_in) layout."""
        (a1, b1), (a2, b2) = self.pair(1), self.pair(2)
        d_out, r = a1.shape
        left = (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(d_out, r * r)
        right = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(r * r, -1)
        return left * self.scaling, right


def check_conv_lycoris(base: nn.Module, config: LoHaConfig, method: str) -> None:
    """LoHa and LoKr on a convolution: zero padding, as peft's adapter path pads."""
    if conv_shape(base) is not None:
        check_zero_padding(base, method)


def uses_cp(base: nn.Module, config: LoHaConfig) -> bool:
    """Whether a layer gets the CP form: use_effective_conv2d on a convolution with a kernel larger
    than 1 (peft keeps 1 x 1 kernels flat: there the core would be a plain r x r matrix)."""
    shape = conv_shape(base)
    return config.use_effective_conv2d and shape is not None and shape.taps > 1


def loha_parameter_count(d_in: int, d_out: int, config: LoHaConfig, conv: ConvShape | None = None) -> int:
    """2 r (d_in + d_out) per layer; on a convolution d_in = C_in/groups · K (the matrix view), or
    with use_effective_conv2d (K > 1) 2 (r² K + r (C_in/groups + C_out)): two cores and their factors."""
    r = config.r
    if conv is not None and config.use_effective_conv2d and conv.taps > 1:
        return 2 * (r * r * conv.taps + r * (d_in // conv.groups + d_out))
    if conv is not None:
        d_in = d_in // conv.groups * conv.taps
    return 2 * r * (d_in + d_out)
