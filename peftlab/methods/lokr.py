"""LoKr: Low-rank Kronecker product adaptation.

Edalati et al., 2022, KronA: Parameter-Efficient Tuning with Kronecker Adapter,
https://arxiv.org/abs/2212.10650; as LoKr in LyCORIS (Yeh et al., 2024,
https://arxiv.org/abs/2309.14859).

The update is the Kronecker product of a small matrix and a larger one:

        ΔW = (alpha / r) · W1 ⊗ W2      W1: (a, c)   W2: (b, d)   d_out = a·b,  d_in = c·d

        ΔW = s · ┌ W1[0,0]·W2   W1[0,1]·W2  ... ┐     every block of ΔW is W2, scaled by one
                 │ W1[1,0]·W2   W1[1,1]·W2  ... │     entry of W1
                 └     ...          ...         ┘

        x ──┬────────────── W0 ─────────────┐
            │                              (+) ──▶ h = W0 x + ΔW x
            └──── ΔW = s · W1 ⊗ W2 ─────────┘

``factorization`` splits d_out and d_in into two factors each, near the square root (or one of
them equal to ``decompose_factor``). W2 becomes a low-rank product W2a W2b (r columns) when
r < max(b, d) / 2, and W1 too when ``decompose_both``; otherwise they train as full matrices.
rank(A ⊗ B) = rank(A) rank(B), so a few hundred numbers can make a full-rank update.

On a convolution (nn.Conv1d, nn.Conv2d; peft has no LoKr for nn.Conv3d) the channels factor as
above, d_out = C_out = a·b and C_in/g = c·d, and the kernel goes into W2: a full W2 is
(b, d, *kernel), a low-rank one W2a (b, r) W2b (r, d·K). For nn.Conv2d

        ΔW[i·b + j, k·d + l, :, :] = s · W1[i, k] · W2[j, l, :, :]     (W1 ⊗ W2, kernel kept whole)

and the result has the conv weight's shape (C_out, C_in/g, *kernel); h = conv(x; W0 + ΔW) with the
layer's stride, padding, dilation and groups. One quirk is peft's and kept, so that a saved
adapter means the same in both: for nn.Conv1d with a full (b, d, k) W2, torch.kron pads the 2-D
W1 to (1, a, c), so the product is (b, a·d, c·k) and its reshape to (C_out, C_in/g, k) orders the
entries differently - still W1 ⊗ W2's numbers, in other places.

``use_effective_conv2d=True`` (kernels larger than 1, and only where W2 is low-rank) keeps the
kernel out of W2's factors, as LoHa's CP form does: a core T (r, r, kh, kw) between W2a (r, b) and
W2b (r, d) (nn.Conv1d: T is (r, r, k, 1), as peft stores it),

        W2[j, l, :, :] = Σ_(p,q) W2a[p, j] · W2b[q, l] · T[p, q, :, :]      (b, d, kh, kw)

then ΔW = s · W1 ⊗ W2 with the kernel kept whole, as for a full W2 (on nn.Conv1d too: W2 is 4-D,
so the Conv1d quirk above does not arise); W2 costs r² K + r (b + d) numbers instead of r (b + d K).

Init (peft): W1 (or W1a) = 0, the other factors Kaiming-uniform, so ΔW = 0 at start.
The singular values of W1 ⊗ W2 are all products σ_i(W1) σ_j(W2), so ``singular_values`` gets
ΔW's spectrum from two tiny SVDs. ``rank_dropout`` and ``module_dropout`` as in LoHa (peft's
LoKr divides by the kept fraction only with ``rank_dropout_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, ConvShape, apply_weight, conv_shape, is_conv1d, layer_dims
from peftlab.methods.base import (AdapterConfig, LayerActivations, SavedActivations, check_range,
                                  check_rank, in_base_layout)
from peftlab.methods.loha import check_conv_lycoris, drop_rows, skip_module, uses_cp


@dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    r: int = 8  # rank of the low-rank Kronecker factors (used where r < half their size)
    alpha: float = 8.0  # scale numerator: scaling = alpha / r
    rank_dropout: float = 0.0  # probability of dropping each output row of ΔW in training
    module_dropout: float = 0.0  # probability of skipping the whole adapter for a training step
    rank_dropout_scale: bool = False  # divide kept rows by the fraction kept (like dropout does)
    decompose_both: bool = False  # also make the small factor W1 a low-rank product
    decompose_factor: int = -1  # a factor of each dim to split at; -1: near the square root
    # convolutions with a kernel > 1: a low-rank W2 as a core (r, r, *kernel) between its
    # factors (peft's "CP-decomposed kernel"; see the module docstring)
    use_effective_conv2d: bool = False

    def __post_init__(self) -> None:
        check_rank(self.r)
        check_range("alpha", self.alpha, low=0.0, low_open=True)
        check_range("rank_dropout", self.rank_dropout, low=0.0, high=1.0, high_open=True)
        check_range("module_dropout", self.module_dropout, low=0.0, high=1.0, high_open=True)
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ConfigError(
                f"decompose_factor={self.decompose_factor!r} is invalid. Expected -1 (split near "
                "the square root) or a positive integer such as 4 or 8."
            )


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n: m = factor if it divides dimension, otherwise
    the divisor pair with the smallest sum that keeps m <= factor (-1: no limit, near sqrt)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


Shape = tuple[int, int]


def lokr_shapes(d_in: int, d_out: int, config: LoKrConfig) -> tuple[Shape, Shape, bool, bool]:
    """((a, c), (b, d), W1 full?, W2 full?): W1 is (a, c), W2 is (b, d), as peft chooses
    (on a convolution d_in = C_in / groups; W2 also carries the kernel)."""
    c, d = factorization(d_in, config.decompose_factor)
    a, b = factorization(d_out, config.decompose_factor)
    w1_full = not (config.decompose_both and config.r < max(a, c) / 2)
    w2_full = not (config.r < max(b, d) / 2)
    return (a, c), (b, d), w1_full, w2_full


def lokr_parameter_count(d_in: int, d_out: int, config: LoKrConfig, conv: ConvShape | None = None) -> int:
    """Trainable numbers of one layer: each factor is rows·cols when full, r·(rows + cols) if not;
    on a convolution (d_in = C_in/groups) W2 is b·d·K full, r·(b + d·K) low-rank, or
    r²·K + r·(b + d) low-rank with use_effective_conv2d (K > 1)."""
    taps, r = 1 if conv is None else conv.taps, config.r
    (a, c), (b, d), w1_full, w2_full = lokr_shapes(d_in if conv is None else d_in // conv.groups, d_out, config)
    w1 = a * c if w1_full else r * (a + c)
    if w2_full:
        w2 = b * d * taps
    elif config.use_effective_conv2d and taps > 1:
        w2 = r * r * taps + r * (b + d)
    else:
        w2 = r * (b + d * taps)
    return w1 + w2


def kaiming(*shape: int) -> nn.Parameter:
    """A parameter initialised like nn.Linear's weight (Kaiming-uniform, a = sqrt(5))."""
    return nn.Parameter(nn.init.kaiming_uniform_(torch.empty(*shape), a=math.sqrt(5)))


class LoKr(Adapter):
    """h = W0 x + s · (W1 ⊗ W2) x, for nn.Linear, Conv1D, nn.Conv1d and nn.Conv2d bases."""

    conv_layers = (nn.Conv1d, nn.Conv2d)  # peft 0.21 has no LoKr for nn.Conv3d
    layer_types = "a linear layer (nn.Linear, transformers' Conv1D) or an nn.Conv1d / nn.Conv2d (peft's LoKr has no nn.Conv3d)"

    def __init__(self, base: nn.Module, config: LoKrConfig) -> None:
        super().__init__()
        if isinstance(base, nn.Embedding):
            raise ConfigError(
                "LoKr adapts linear layers, not embeddings (peft neither). Expected targets that "
                "name nn.Linear layers; try 'all-linear'."
            )
        check_conv_lycoris(base, config, "LoKr")
        d_in, d_out = layer_dims(base)
        conv = conv_shape(base)
        kernel = () if conv is None else conv.kernel  # W2 carries a convolution's kernel
        d_in = d_in if conv is None else d_in // conv.groups
        (a, c), (b, d), w1_full, w2_full = lokr_shapes(d_in, d_out, config)
        r = config.r
        self.scaling = config.alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.rank_dropout_scale = config.rank_dropout_scale
        self.transposed = is_conv1d(base)  # Conv1D stores W as (d_in, d_out)
        # a convolution's weight (C_out, C_in/g, *kernel): ΔW takes that shape to merge
        self.conv_weight_shape = tuple(base.weight.shape) if conv_shape(base) is not None else None
        if w1_full:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c))  # zero, so ΔW = 0 at start
        else:
            self.lokr_w1_a = nn.Parameter(torch.zeros(a, r))  # (a, r)
            self.lokr_w1_b = kaiming(r, c)  # (r, c)
        if w2_full:
            self.lokr_w2 = kaiming(b, d, *kernel)  # (b, d, *kernel)
        elif uses_cp(base, config):  # core (r, r, kh, kw) (Conv1d: (r, r, k, 1)), (r, b), (r, d)
            self.lokr_t2 = kaiming(r, r, *kernel, *(1,) * (2 - len(kernel)))
            self.lokr_w2_a, self.lokr_w2_b = kaiming(r, b), kaiming(r, d)
        else:  # (b, r), (r, d·K)
            self.lokr_w2_a, self.lokr_w2_b = kaiming(b, r), kaiming(r, d * math.prod(kernel))

    def kron_factors(self) -> tuple[Tensor, Tensor]:
        """(W1 (a, c), W2 (b, d)), multiplying out the low-rank ones (W2 of the CP form: (b, d, kh, kw))."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif hasattr(self, "lokr_t2"):  # W2[j, l] = Σ_(p,q) W2a[p, j] W2b[q, l] T[p, q]
            w2 = torch.einsum("pqhw,pj,ql->jlhw", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
            # fresh strides: torch.kron cannot view einsum's result when a size-1 dim keeps an odd
            # stride, which .contiguous() leaves (Conv1d's (b, d, k, 1) at r = 1: peft 0.21.2 fails there)
            w2 = w2.clone(memory_format=torch.contiguous_format)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def update(self) -> Tensor:
        """ΔW in (d_out, d_in) layout: s · W1 ⊗ W2 (a convolution's: (C_out, C_in/g · K))."""
        w1, w2 = self.kron_factors()
        if w2.dim() == 4:  # a full Conv2d W2 (b, d, kh, kw): W1 (a, c, 1, 1) keeps the kernel whole
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(w1.shape[0] * w2.shape[0], -1) * self.scaling

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + ΔW x,  ΔW = s · W1 ⊗ W2
        if skip_module(self, self.module_dropout):
            return result
        delta = self.update()  # (d_out, d_in)
        if self.training and self.rank_dropout > 0:
            delta = drop_rows(delta, self.rank_dropout, rescale=self.rank_dropout_scale)
        update = apply_weight(base, x.to(delta.dtype), delta)  # (..., d_out), or (N, C_out, ...)
        return (result + update).to(result.dtype)

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: x, and the materialised W1 ⊗ W2 wherever x needs a gradient."""
        return SavedActivations(own=layer.d_out * layer.d_in * layer.adapter_bytes if layer.input_grad else 0)

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.update()  # (d_out, d_in): on a convolution reshaped to (C_out, C_in/g, *kernel)
        if self.conv_weight_shape is not None:
            return delta.reshape(self.conv_weight_shape)
        return in_base_layout(delta, self.transposed)

    @torch.no_grad()
    def singular_values(self) -> Tensor:
        """ΔW's singular values, descending, min(d_out, d_in) of them: σ(W1 ⊗ W2) = {|s| σ_i(W1) σ_j(W2)}
        plus zeros, from SVDs of the two small factors instead of the whole ΔW (on a convolution,
        of ΔW as the matrix (C_out, C_in/g · K))."""
        w1, w2 = self.kron_factors()
        if w2.dim() == 3:  # peft's Conv1d order (module docstring): no Kronecker product of matrices
            return torch.linalg.svdvals(self.update().float())
        w2 = w2.reshape(w2.shape[0], -1)  # a Conv2d kernel joins W2's columns: (b, d·K)
        products = torch.outer(torch.linalg.svdvals(w1.float()), torch.linalg.svdvals(w2.float()))
        values = (products.flatten() * abs(self.scaling)).sort(descending=True).values
        size = min(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        return torch.cat([values, values.new_zeros(size - values.numel())])
