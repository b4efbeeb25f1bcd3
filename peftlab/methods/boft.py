"""BOFT: Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization.

Liu et al., 2023 (ICLR 2024), https://arxiv.org/abs/2311.06243

OFT's block-diagonal R only mixes features inside a block. BOFT builds a dense orthogonal R from
m sparse factors, the way the FFT builds a dense transform from butterflies:

        R = B_m ··· B_2 B_1,        B_k = P_k · diag(R_k1, ..., R_kD) · P_k^T

Each B_k is block-diagonal (D blocks of size b, D · b = d_in, each block a Cayley transform
(I - S)(I + S)^-1 of S = (A - A^T)/2, so orthogonal) with its rows and columns shuffled by the
permutation P_k. P_k shuffles inside chunks of b · 2^(k-1) features: the chunk is cut into
half-blocks of b/2 and they are reordered evens first, then odds (P_1 = I):

    P_2, b = 4:  features  0 1 | 2 3 | 4 5 | 6 7     (half-blocks h0 h1 h2 h3)
                 permuted  0 1 | 4 5 | 2 3 | 6 7     (h0 h2 h1 h3)

so the block that sees features (0 1 4 5) joins the halves of two level-1 blocks. After m
levels each feature has met b · 2^(m-1) others; m = 1 is plain OFT. A learned per-output scale
s (d_out) rides along (paper, section 4):

        h = s ⊙ (W0 R^T x) + b         merged: W' = diag(s) W0 R^T  in nn.Linear's layout

The factors start at A = 0 (R = I) and s = 1, so the model starts at the pretrained one.
``dropout`` is multiplicative: in training, for one random level, a share of the blocks is set
to I. peft without its CUDA extension (any CPU) silently uses m = 1; peftlab always builds all
m levels, with the same math as peft's CUDA path.

On an nn.Conv2d (as peft) R turns the weight's flattened patch axis: W0 (C_out, C_in, k, k) is the
matrix (C_out, C_in·k·k), channel-major, R is (C_in·k·k, C_in·k·k) and the layer runs with the
rotated, scaled weight and its own stride and padding (the input is never rotated):

        h = conv(x; diag(s) W0 R^T) + b     (W0 R^T reshaped back to (C_out, C_in, k, k))

peft reads one number of kernel_size, stride and padding (``[0]``), ignores dilation and refuses
groups, so peftlab adapts square kernels with equal strides and paddings, zero padding, no
dilation and groups=1, and refuses the rest.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError, PeftlabWarning
from peftlab.inject import (Adapter, ConvShape, apply_weight, check_zero_padding, conv_shape, conv_with,
                            is_conv1d, matrix_dims)
from peftlab.methods.base import AdapterConfig, check_range, in_base_layout, is_count
from peftlab.methods.oft import block_dropout, check_conv_rotation, divisors, linear_weight, reject_embedding


@dataclass(frozen=True)
class BOFTConfig(AdapterConfig):
    # Give block_size or block_num, not both (block_num · block_size = d_in). Stored as peft
    # does it: 0 = derived from the other.
    block_size: int | None = None  # size b of each orthogonal block; default 4 when block_num is unset
    block_num: int | None = None  # number of blocks D per butterfly factor
    n_butterfly_factor: int = 1  # m, the number of butterfly factors; 1 = plain OFT
    dropout: float = 0.0  # multiplicative dropout: share of one level's blocks set to I in training

    def __post_init__(self) -> None:
        if self.block_size and self.block_num:
            raise ConfigError(
                f"BOFT got both block_size={self.block_size} and block_num={self.block_num}, but "
                "block_num · block_size must equal the layer's input size. Expected one of them; "
                "try block_size=4 alone."
            )
        object.__setattr__(self, "block_size", self.block_size or (0 if self.block_num else 4))
        object.__setattr__(self, "block_num", self.block_num or 0)  # peft's convention (frozen)
        for name in ("block_size", "block_num", "n_butterfly_factor"):
            value = getattr(self, name)
            if not is_count(value, minimum=0):
                raise ConfigError(f"BOFT {name}={value!r} is invalid. Expected a positive integer.")
        if self.n_butterfly_factor < 1:
            raise ConfigError("BOFT n_butterfly_factor must be at least 1 (1 = plain OFT). Try 1 or 2.")
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)


def boft_parameter_count(d_in: int, d_out: int, config: BOFTConfig, conv: ConvShape | None = None) -> int:
    """Trainable numbers on one layer: m factors of D = d_in / b full b x b blocks, plus s (d_out);
    on a convolution d_in = C_in/groups · K, the flattened patch that R turns."""
    if conv is not None:
        d_in = d_in // conv.groups * conv.taps
    b = config.block_size or d_in // config.block_num
    return config.n_butterfly_factor * d_in * b + d_out


def fits(d_in: int, b: int, m: int) -> bool:
    """Blocks of b tile d_in, and m levels of pairing need 2^(m-1) | D and an even b (m > 1)."""
    return b >= 1 and d_in % b == 0 and (m == 1 or ((d_in // b) % 2 ** (m - 1) == 0 and b % 2 == 0))


def butterfly_permutation(d: int, b: int, level: int) -> Tensor:
    """Index vector p of P_k, k = level + 1: P_k v = v[p]. Within each chunk of b · 2^level
    features, the half-blocks (size b/2) are put in the order 0, 2, 4, ..., 1, 3, 5, ...
    Level 0 is the identity (one block's two halves stay in place)."""
    if level == 0:
        return torch.arange(d)
    half, chunk = b // 2, b * 2**level
    halves = chunk // half
    order = list(range(0, halves, 2)) + list(range(1, halves, 2))
    index = [start + h * half + j for start in range(0, d, chunk) for h in order for j in range(half)]
    return torch.tensor(index)


def as_saved(config: BOFTConfig, state: dict[str, Tensor]) -> BOFTConfig:
    """The config with the butterfly factors a saved file holds (boft_R is (m, D, b, b)).

    peft 0.21.2 without its CUDA extension (any CPU) trains one factor whatever
    boft_n_butterfly_factor says, and saves the config it was given: the tensors, not the
    config, say what was trained, and peft loads them the same way."""
    counts = {t.shape[0] for key, t in state.items() if key.split(".")[-1] == "boft_R" and t.dim() == 4}
    if len(counts) != 1 or counts == {config.n_butterfly_factor}:
        return config
    m = counts.pop()
    warnings.warn(
        f"The adapter's config says n_butterfly_factor={config.n_butterfly_factor} but its boft_R "
        f"tensors hold {m} factor{'s' if m > 1 else ''} (peft trains one factor when its CUDA "
        f"extension is missing). Loaded as saved, with {m}; set n_butterfly_factor={m} to match it.",
        PeftlabWarning, stacklevel=3,
    )
    return dataclasses.replace(config, n_butterfly_factor=m)


class BOFT(Adapter):
    """h = s ⊙ (W0 R^T x) + b with R a product of butterfly factors; merged W' = diag(s) W0 R^T."""

    delta_uses_base = True  # ΔW = diag(s) W0 R^T - W0 depends on W0
    conv_layers = (nn.Conv2d,)  # peft's BOFT has no nn.Conv1d / nn.Conv3d
    layer_types = ("a linear layer (nn.Linear, transformers' Conv1D) or an nn.Conv2d (peft's BOFT has no "
                   "nn.Conv1d / nn.Conv3d)")

    def __init__(self, base: nn.Module, config: BOFTConfig) -> None:
        super().__init__()
        reject_embedding(base, "BOFT")
        check_conv_rotation(base, "BOFT")
        check_square_conv(base)
        self.conv = conv_shape(base) is not None
        d_in, d_out = matrix_dims(base)  # a convolution: (C_in·k·k, C_out)
        m = config.n_butterfly_factor
        b = config.block_size or (d_in // config.block_num if d_in % config.block_num == 0 else 0)
        if not fits(d_in, b, m):
            given = f"block_num={config.block_num}" if config.block_num else f"block_size={config.block_size}"
            valid = [k for k in divisors(d_in, 1) if fits(d_in, k, m)]
            raise ConfigError(
                f"BOFT {given} with n_butterfly_factor={m} does not fit a layer with d_in={d_in}: "
                f"blocks must tile the input{' and pair up over ' + str(m) + ' levels' if m > 1 else ''}. "
                f"Expected block_size in {valid} (or block_num = {d_in} / block_size). Try "
                "block_size=4, a smaller n_butterfly_factor, or other targets."
            )
        self.block_size, self.block_num, self.p = b, d_in // b, config.dropout
        self.transposed = is_conv1d(base)
        self.boft_R = nn.Parameter(torch.zeros(m, self.block_num, b, b))  # A per level and block
        # per-output scale s, in peft's shapes so it copies and saves 1:1
        self.boft_s = nn.Parameter(torch.ones((1, d_out) if self.conv else (d_out, 1)))
        perms = torch.stack([butterfly_permutation(d_in, b, k) for k in range(m)])  # (m, d_in)
        self.register_buffer("perms", perms, persistent=False)

    def rotation(self) -> Tensor:
        """R = B_m ··· B_1 as a (d_in, d_in) matrix (R acts on row vectors: x -> x R)."""
        m, D, b, _ = self.boft_R.shape
        A = self.boft_R.flatten(0, 1)  # (m·D, b, b)
        S = 0.5 * (A - A.transpose(-2, -1))  # skew-symmetric part
        eye = torch.eye(b, dtype=A.dtype, device=A.device).expand_as(S)
        blocks = torch.linalg.solve(eye + S, eye - S, left=False).view(m, D, b, b)  # Cayley
        if self.training and self.p > 0:  # one random level loses a share of its blocks
            level = int(torch.randint(0, m, (1,)).item())
            blocks = torch.cat([blocks[:level], block_dropout(blocks[level], self.p)[None], blocks[level + 1:]])
        R = None
        for k in range(m):
            p = self.perms[k]
            B_k = torch.block_diag(*blocks[k])[p][:, p]  # P_k diag(R_k1..R_kD) P_k^T
            R = B_k if R is None else B_k @ R
        return R

    def scale(self, h: Tensor) -> Tensor:
        """s shaped to multiply an output h: (d_out,) for a linear layer, (C_out, 1, 1) on a conv."""
        s = self.boft_s.flatten()
        return s.view(-1, *(1,) * (h.dim() - 2)) if self.conv else s

    def rotated_weight(self, base: nn.Module) -> Tensor:
        """diag(s) W0 R^T in matrix layout (d_out, d_in): each weight row turned, then scaled."""
        W0 = linear_weight(base)  # (d_out, d_in); a convolution: (C_out, C_in·k·k)
        R = self.rotation().to(W0.dtype)
        return (W0 @ R.T) * self.boft_s.flatten()[:, None]

    def layer_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> Tensor:
        if self.conv:  # h = conv(x; diag(s) W0 R^T) + b: the weight turns, not the input patches
            weight = self.rotated_weight(base)
            h = conv_with(base, x.to(weight.dtype), weight.reshape(base.weight.shape))
            return (h if base.bias is None else h + self.bias_of(base, h)).to(x.dtype)
        # h = s ⊙ (W0 (x R)) + b: the frozen layer runs on rotated inputs, then each output is scaled
        R = self.rotation()  # (d_in, d_in)
        h = base((x.to(R.dtype) @ R).to(x.dtype), *args, **kwargs)  # W0 (x R) + b
        bias = getattr(base, "bias", None)
        if bias is None:
            return h * self.scale(h).to(h.dtype)
        return ((h - bias) * self.scale(h).to(h.dtype) + bias).to(h.dtype)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # Stacked after another adapter: h = s ⊙ (W0 (x R)) + b, W0 (x R) = (result - b) + W0 (x R - x)
        R = self.rotation()  # (d_in, d_in)
        xr = x.to(R.dtype)
        bias = self.bias_of(base, result).to(R.dtype) if getattr(base, "bias", None) is not None else 0.0
        W0 = linear_weight(base).to(R.dtype)
        rotated = result.to(R.dtype) - bias + apply_weight(base, xr, W0 @ R.T - W0)  # W0 R^T x
        return (rotated * self.scale(result) + bias).to(result.dtype)

    def bias_of(self, base: nn.Module, h: Tensor) -> Tensor:
        """The base bias shaped to add to h (per channel on a convolution's (N, C_out, H, W))."""
        return base.bias.view(-1, *(1,) * (h.dim() - 2)) if self.conv else base.bias

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = self.rotated_weight(base) - linear_weight(base)  # W' = diag(s) W0 R^T, (d_out, d_in)
        if self.conv:
            return delta.reshape(base.weight.shape)  # (C_out, C_in, k, k)
        return in_base_layout(delta, self.transposed)


def check_square_conv(base: nn.Module) -> None:
    """peft's BOFT conv reads kernel_size[0], stride[0] and padding[0] only: refuse what that changes."""
    if not isinstance(base, nn.Conv2d):
        return
    check_zero_padding(base, "BOFT")  # peft's forward pads with zeros, whatever the base does
    settings = {"kernel_size": base.kernel_size, "stride": base.stride, "padding": base.padding}
    uneven = {k: v for k, v in settings.items() if isinstance(v, str) or len(set(v)) > 1}
    if uneven:
        raise ConfigError(
            f"BOFT on an nn.Conv2d with {', '.join(f'{k}={v!r}' for k, v in uneven.items())} is not "
            "supported: peft's BOFT reads one number of each (kernel_size[0], stride[0], padding[0]) "
            "and would compute another layer. Expected a square kernel, equal strides and an integer "
            "padding equal on both axes; try method 'lora', 'loha' or 'lokr' for this layer."
        )
