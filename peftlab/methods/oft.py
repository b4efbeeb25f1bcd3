"""OFT: Orthogonal Finetuning (Controlling Text-to-Image Diffusion by Orthogonal Finetuning).

Qiu et al., 2023, https://arxiv.org/abs/2306.07280 (peft's current form: Qiu et al., 2025,
"Orthogonal Finetuning Made Scalable", https://arxiv.org/abs/2506.19847).

OFT keeps the angles between a layer's neurons (its hyperspherical energy) by turning all of them
with one learned orthogonal matrix R. In the paper's (d_in x d_out) layout, W' = R W0. R is
block-diagonal, n blocks of size b (n · b = d_in), each block a Cayley transform of a skew-
symmetric matrix Q, which is orthogonal by construction:

        R_i = (I - Q_i)(I + Q_i)^-1,     Q_i = -Q_i^T     (b(b-1)/2 free numbers per block)

            ┌ R_1          ┐            x ── x R ──▶ W0 ──▶ h = W0 R^T x + b
        R = │     ...      │            (each input row is rotated block by block, then
            └         R_n  ┘             the frozen layer runs; the bias is not rotated)

In nn.Linear's (d_out x d_in) layout the merged weight is W0 R^T. Q starts at zero, so R = I and
the model starts exactly at the pretrained one. Options (all as in peft 0.21):

- ``use_cayley_neumann``: replace the inverse by a truncated series, R ≈ I + 2Q + 2Q² + ... + Q^k
  (cheap, nearly orthogonal for small Q). That series is the Cayley transform of -Q, i.e. R^T of
  the exact form; peft uses exactly these two conventions and so do we, to share weights.
- ``coft`` (constrained OFT): before each use, Q is pulled back into a Frobenius ball of radius
  eps / sqrt(#blocks) around 0, which keeps R close to I (paper, section 4).
- ``block_share``: one block R_1 repeated n times (b(b-1)/2 parameters in all).
- ``dropout``: multiplicative dropout; in training a random share of the blocks is set to I.
  (peft 0.21.2 builds this layer but never calls it; peftlab applies it as documented.)

On an embedding (peft adapts nn.Embedding too) R turns each looked-up row, h = E[x] R, and the
merged table is E' = E R (E: (num_embeddings, d), blocks tiling d = embedding_dim).

On a convolution (peft: nn.Conv2d, square kernels, no dilation) R is (C_in·k·k, C_in·k·k), its
blocks tiling one k x k input patch flattened channel-major: all C_in channels, also when the
layer is grouped (groups = g), since R turns the input before the frozen layer sees it. peft 0.21.2's
forward - what its users get from an unmerged adapter, so what a saved adapter means and what
peftlab computes - turns the *input*: it cuts x into every k x k patch (stride 1, no padding),
turns each, p -> p R, and folds them back (F.fold, adding where patches overlap), then runs the
frozen layer with its own stride and padding. It hands F.fold the turned patches in another
layout than F.fold reads, (C_in, H', W', k, k) memory read as (C_in·k·k, H'·W'), so with more than
one patch the numbers land away from the patch they came from:

        P  = unfold_k(x)               (N, L, C_in·k·k)   every patch a row, L = H'·W' = (H-k+1)(W-k+1)
        x' = fold_k(relaid(P R))       (N, C_in, H, W)    relaid: peft's layout, as above
        h  = conv(x'; W0) + b

Even at R = I, x' is a rearranged, partly summed copy of x, not x: for k > 1 peft's OFT does not
start at the pretrained model, and x -> x' is not a convolution, so no merged weight computes it
(peft's merge, W0 R^T reshaped, is another function: at init, the base model). peftlab follows the
forward, refuses to merge such a layer, and warns when it adapts one. With a single patch (an
input of exactly k x k) or k = 1 the layout is right; for k = 1 a patch is one pixel's channels:

        h = conv(x R; W0) + b   (x R: each pixel's channels turned)   ==   conv(x; W0 R^T) + b

so a 1x1 convolution merges exactly (any stride, padding or padding mode) - unless it is grouped:
W0 R^T then mixes channels across groups, a dense kernel that the grouped weight
(C_out, C_in/g, 1, 1) cannot hold (peft's merge fails on its shapes), so peftlab refuses to merge
it and its forward stays exact.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError, PeftlabWarning
from peftlab.inject import (Adapter, ConvShape, apply_weight, conv_shape, dense_weight, is_conv, is_conv1d,
                            is_linear, matrix_dims)
from peftlab.methods.base import AdapterConfig, check_range, in_base_layout, is_count


@dataclass(frozen=True)
class OFTConfig(AdapterConfig):
    # Give block_size or r, not both (r · block_size = d_in). Stored as peft does: 0 = derived.
    block_size: int | None = None  # size b of each orthogonal block; default 32 when r is not set
    r: int | None = None  # number of blocks per layer, n = d_in / b
    dropout: float = 0.0  # multiplicative dropout: chance of a block being set to I in training
    coft: bool = False  # constrained OFT: keep R within eps of the identity
    eps: float = 6e-5  # COFT's radius (only used when coft=True)
    block_share: bool = False  # one block shared by all n positions
    use_cayley_neumann: bool = True  # truncated series instead of the exact inverse (peft's default)
    num_cayley_neumann_terms: int = 5  # series length; the series ends at Q^max(terms-1, 3)

    def __post_init__(self) -> None:
        if self.block_size and self.r:
            raise ConfigError(
                f"OFT got both block_size={self.block_size} and r={self.r}, but r · block_size "
                "must equal the layer's input size. Expected one of them; try block_size=32 alone."
            )
        object.__setattr__(self, "block_size", self.block_size or (0 if self.r else 32))
        object.__setattr__(self, "r", self.r or 0)  # normalised to peft's convention (frozen)
        for name in ("block_size", "r"):
            value = getattr(self, name)
            if not is_count(value, minimum=0):
                raise ConfigError(f"OFT {name}={value!r} is invalid. Expected a positive integer.")
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_range("eps", self.eps, low=0.0, low_open=True)
        check_range("num_cayley_neumann_terms", self.num_cayley_neumann_terms, low=1)


def oft_parameter_count(d_in: int, d_out: int, config: OFTConfig, conv: ConvShape | None = None) -> int:
    """Trainable numbers on one layer: D · b(b-1)/2, D = d_in / b blocks (D = 1 with block_share);
    on a convolution d_in = C_in · K, the flattened patch that R turns (all channels, grouped or not)."""
    if conv is not None:
        d_in = d_in * conv.taps
    b = config.block_size or d_in // config.r
    return (1 if config.block_share else d_in // b) * b * (b - 1) // 2


def oft_embedding_parameter_count(num_embeddings: int, embedding_dim: int, config: OFTConfig) -> int:
    """On an nn.Embedding R turns each row: the count above with d_in = embedding_dim."""
    return oft_parameter_count(embedding_dim, num_embeddings, config)


def rotated_size(base: nn.Module) -> int:
    """The length of the vectors R turns: a linear layer's d_in, an nn.Conv2d's patch C_in·k·k (all
    input channels, also when grouped), an embedding's embedding_dim (each looked-up row)."""
    if isinstance(base, nn.Embedding):
        return base.embedding_dim
    shape = conv_shape(base)
    return base.in_channels * shape.taps if shape is not None else matrix_dims(base)[0]


def divisors(n: int, at_least: int = 2) -> list[int]:
    return [k for k in range(at_least, n + 1) if n % k == 0]


def linear_weight(base: nn.Module) -> Tensor:
    """The frozen weight in nn.Linear's (d_out, d_in) layout (Conv1D transposed, 4-bit dequantised;
    a convolution's (C_out, C_in/g, *kernel) flattened to (C_out, C_in/g · K), channel-major)."""
    weight = dense_weight(base)
    if is_conv(base):
        return weight.flatten(1)
    return weight.T if is_conv1d(base) else weight


def block_dropout(blocks: Tensor, p: float) -> Tensor:
    """Multiplicative dropout on (D, b, b) blocks: int(p · D) random blocks become the identity."""
    n_blocks, b, _ = blocks.shape
    if n_blocks == 1:  # a shared block is never dropped (peft does the same)
        return blocks
    n_dropped = int(p * n_blocks)
    mask = torch.cat([torch.ones(n_dropped), torch.zeros(n_blocks - n_dropped)])
    mask = mask[torch.randperm(n_blocks)].view(n_blocks, 1, 1).to(blocks)
    return (1 - mask) * blocks + mask * torch.eye(b, dtype=blocks.dtype, device=blocks.device)


def reject_embedding(base: nn.Module, method: str) -> None:
    if not (is_linear(base) or isinstance(base, nn.Conv2d)):
        raise ConfigError(
            f"peftlab's {method} adapts linear layers and nn.Conv2d, not {type(base).__name__}. Expected "
            "targets that name linear layers; try the defaults, 'all-linear', or names such as 'q_proj'."
        )


def check_conv_rotation(base: nn.Module, method: str, grouped: bool = False) -> None:
    """What OFT and BOFT share on a convolution: peft's forward runs it without dilation, and
    (BOFT, ``grouped=False``) without groups."""
    if not is_conv(base):
        return
    if base.groups > 1 and not grouped:
        raise ConfigError(
            f"{method} on an nn.Conv2d with groups={base.groups} is not supported: R turns all C_in·k·k "
            "inputs of a patch together, and a grouped weight only sees its group's channels, so the "
            "rotated weight is not a grouped weight (peft's BOFT refuses it). Expected groups=1; try "
            "method 'oft' (which turns the input and does not merge there), 'lora', 'loha' or 'lokr', "
            "or other targets."
        )
    if any(d != 1 for d in base.dilation):
        raise ConfigError(
            f"{method} on an nn.Conv2d with dilation={base.dilation} is not supported: peft's forward "
            "ignores or refuses dilation. Expected dilation=1; try method 'loha' or 'lokr', or other targets."
        )


class OFT(Adapter):
    """h = W0 (R^T x) + b with R block-diagonal orthogonal; merged: W' = W0 R^T. An embedding: h = E[x] R;
    a k x k convolution: h = conv(fold(relaid(unfold(x) R)); W0) + b, which does not merge for k > 1."""

    delta_uses_base = True  # ΔW = W0 R^T - W0 depends on W0
    conv_layers = (nn.Conv2d,)  # peft's OFT has no nn.Conv1d / nn.Conv3d
    layer_types = ("a linear layer (nn.Linear, transformers' Conv1D), an nn.Embedding or an nn.Conv2d "
                   "(peft's OFT has no nn.Conv1d / nn.Conv3d)")

    def __init__(self, base: nn.Module, config: OFTConfig) -> None:
        super().__init__()
        check_conv_rotation(base, "OFT", grouped=True)
        shape = conv_shape(base)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.kernel = None if shape is None else tuple(shape.kernel)  # patches of a convolution's input
        if shape is not None:
            check_oft_kernel(base)
        d_in = rotated_size(base)
        b = config.block_size or (d_in // config.r if d_in % config.r == 0 else 0)
        if b < 2 or d_in % b:
            given = f"r={config.r}" if config.r else f"block_size={config.block_size}"
            size = "embedding_dim" if self.is_embedding else "d_in"
            raise ConfigError(
                f"OFT {given} does not fit a layer with {size}={d_in}: blocks must tile the vectors R turns "
                f"exactly and hold at least 2 features. Expected block_size in {divisors(d_in)} "
                f"(or r = {d_in} / block_size). Try block_size=32 or other targets."
            )
        self.block_size, self.n_blocks = b, d_in // b
        self.transposed = is_conv1d(base)
        reason = merge_refusal(base)
        if reason is not None:  # instance attributes: only these layers refuse to merge
            self.mergeable, self.unmergeable_reason = False, reason
        self.coft, self.eps, self.p = config.coft, config.eps, config.dropout
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0
        # One row of b(b-1)/2 numbers per block: the strict upper triangle of Q_i.
        self.oft_R = nn.Parameter(torch.zeros(1 if config.block_share else self.n_blocks, b * (b - 1) // 2))
        rows, cols = torch.triu_indices(b, b, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, vec: Tensor) -> Tensor:
        """(D, b(b-1)/2) upper-triangle vectors -> (D, b, b) skew-symmetric Q = U - U^T."""
        upper = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        upper[:, self.rows, self.cols] = vec
        return upper - upper.transpose(-2, -1)

    @torch.no_grad()
    def project(self) -> None:
        """COFT: scale each block's Q back onto the ball ||Q||_F <= eps / sqrt(D) (in place)."""
        radius = self.eps / math.sqrt(self.oft_R.shape[0])
        norm = torch.linalg.matrix_norm(self.skew(self.oft_R)).unsqueeze(-1)  # (D, 1)
        self.oft_R.mul_(torch.where(norm <= radius, 1.0, radius / norm.clamp_min(1e-30)))

    def blocks(self) -> Tensor:
        """The n orthogonal blocks R_i, (n, b, b)."""
        if self.coft:
            self.project()
        Q = self.skew(self.oft_R)
        eye = torch.eye(self.block_size, dtype=Q.dtype, device=Q.device).expand_as(Q)
        if not self.neumann_terms:  # exact Cayley: R = (I - Q)(I + Q)^-1
            R = torch.linalg.solve(eye + Q, eye - Q, left=False)
        else:  # (I + Q)(I - Q)^-1 = (I + Q)(I + Q + Q² + ...) = I + 2Q + 2Q² + ..., cut off
            terms, power = self.neumann_terms, Q
            R = eye + 2 * Q if terms >= 2 else eye
            if terms >= 3:  # peft's cut-off: ends at Q^max(terms-1, 3) with weight 1, e.g.
                # 5 terms: I + 2Q + 2Q² + 2Q³ + Q⁴
                for _ in range(2, max(terms - 1, 3)):
                    power = power @ Q
                    R = R + 2 * power
                R = R + power @ Q
        if self.training and self.p > 0:
            R = block_dropout(R, self.p)
        return R.expand(self.n_blocks, -1, -1)  # block_share: the one block at every position

    def rotation(self) -> Tensor:
        """The full (d_in, d_in) block-diagonal R."""
        return torch.block_diag(*self.blocks())

    def turn(self, rows: Tensor, R: Tensor) -> Tensor:
        """rows R: each block of b features of every row (..., d) turned by its R_i."""
        blocks = rows.to(R.dtype).unflatten(-1, (self.n_blocks, self.block_size))  # (..., n, b)
        return torch.einsum("...nk,nkc->...nc", blocks, R).flatten(-2)  # (..., d)

    def rotate(self, x: Tensor) -> Tensor:
        """x R in R's dtype: a linear layer's inputs or an embedding's rows (..., d) turned; a
        convolution's input (N, C_in, H, W) as peft turns it: fold(relaid(unfold(x) R)), overlaps summed."""
        R = self.blocks()  # (n, b, b)
        if self.kernel is None:
            return self.turn(x, R)
        (n, c, h, w), (kh, kw) = x.shape, self.kernel
        patches = F.unfold(x.to(R.dtype), self.kernel).transpose(1, 2)  # (N, L, C_in·kh·kw), channel-major
        turned = self.turn(patches, R)  # every patch p -> p R
        # peft's layout for F.fold (module docstring): rows (N, H', W', C_in, kh, kw) relaid as
        # (N, C_in, H', W', kh, kw) and read as (N, C_in·kh·kw, L); right for k = 1 or L = 1
        relaid = turned.reshape(n, h - kh + 1, w - kw + 1, c, kh, kw).permute(0, 3, 1, 2, 4, 5)
        return F.fold(relaid.reshape(n, c * kh * kw, -1), (h, w), self.kernel)  # (N, C_in, H, W)

    def layer_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> Tensor:
        if self.is_embedding:  # h = E[x] R: the looked-up rows are turned
            rows = base(x, *args, **kwargs)  # (..., d)
            return self.rotate(rows).to(rows.dtype)
        # h = W0 (x R) + b: the frozen layer runs on rotated inputs (x a row, so x R is R^T x)
        return base(self.rotate(x).to(x.dtype), *args, **kwargs)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # Stacked after another adapter: h = result + W0 (x R - x) (an embedding: E[x] R - E[x]),
        # the same change as above.
        if self.is_embedding:
            rows = base(x)  # (..., d)
            return (result + self.rotate(rows) - rows).to(result.dtype)
        x_rot = self.rotate(x)
        change = apply_weight(base, x_rot - x.to(x_rot.dtype), linear_weight(base).to(x_rot.dtype))  # (..., d_out)
        return (result + change).to(result.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        if not self.mergeable:
            raise ConfigError(f"OFT has no merged weight on this layer: {self.unmergeable_reason}.")
        if self.is_embedding:  # E' = E R: every row turned
            E = dense_weight(base)  # (num_embeddings, d)
            return E @ self.rotation().to(E.dtype) - E
        W0 = linear_weight(base)  # (d_out, d_in)
        R = self.rotation().to(W0.dtype)
        delta = W0 @ R.T - W0  # W' = W0 R^T  (the paper's R W0, transposed)
        if self.kernel is not None:
            return delta.reshape(base.weight.shape)  # (C_out, C_in, 1, 1): groups = 1 (merge_refusal)
        return in_base_layout(delta, self.transposed)


def merge_refusal(base: nn.Module) -> str | None:
    """Why a merged weight cannot compute OFT's forward on this layer (None: it can). Warns when
    adapting a k x k convolution, whose forward does not start at the pretrained model either."""
    shape = conv_shape(base)
    if shape is not None and shape.taps == 1 and shape.groups > 1:
        return (f"with groups={shape.groups} the merged weight W0 R^T mixes channels across groups, a dense "
                f"kernel that the grouped weight (C_out, C_in/{shape.groups}, 1, 1) cannot hold (peft's merge "
                "fails on its shapes); the unmerged forward, which turns the input, is exact")
    if shape is not None and shape.taps > 1:
        warnings.warn(
            "OFT on a convolution with a kernel larger than 1x1 follows peft 0.21.2's forward, which "
            "folds the turned input patches back in another layout and sums their overlaps: the "
            "adapted model does not start at the pretrained one, and it cannot be merged. Try a 1x1 "
            "convolution, or method 'boft', 'lora', 'loha' or 'lokr', for an adapter that starts at "
            "the pretrained model and merges.",
            PeftlabWarning, stacklevel=4,
        )
        return (f"on a {shape.kernel[0]}x{shape.kernel[1]} convolution peft 0.21.2's forward (which peftlab "
                "follows: it is what a saved adapter means) turns every input patch and folds the patches "
                "back in another layout, summing overlaps; that map of the input is not a convolution, so "
                "no merged weight computes it (peft's merge W0 R^T computes another function)")
    if isinstance(base, nn.Embedding) and base.max_norm is not None:
        return (f"the embedding renormalises looked-up rows to max_norm={base.max_norm} before R turns "
                "them, and R (a truncated series unless use_cayley_neumann=False) need not keep their "
                "norms, so renormalising the merged rows E R gives other numbers")
    return None


def check_oft_kernel(base: nn.Module) -> None:
    """peft's OFT sizes R for a square kernel (C_in·k[0]²): other kernels fail in its forward."""
    kh, kw = base.kernel_size
    if kh != kw:
        raise ConfigError(
            f"OFT on an nn.Conv2d with kernel_size={base.kernel_size} is not supported: peft 0.21.2 sizes "
            f"R for a square kernel (C_in · {kh} · {kh}), but a patch holds C_in · {kh} · {kw} numbers, so "
            "its forward fails on this layer. Expected a square kernel such as (3, 3) or 1; try method "
            "'lora', 'loha' or 'lokr' for this layer."
        )
