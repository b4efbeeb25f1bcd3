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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, layer_dims
from peftlab.methods.base import AdapterConfig, check_range
from peftlab.methods.oft import block_dropout, divisors, linear_weight, reject_embedding


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
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"BOFT {name}={value!r} is invalid. Expected a positive integer.")
        if self.n_butterfly_factor < 1:
            raise ConfigError("BOFT n_butterfly_factor must be at least 1 (1 = plain OFT). Try 1 or 2.")
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)


def boft_parameter_count(d_in: int, d_out: int, config: BOFTConfig) -> int:
    """Trainable numbers on one layer: m factors of D = d_in / b full b x b blocks, plus s (d_out)."""
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


class BOFT(Adapter):
    """h = s ⊙ (W0 R^T x) + b with R a product of butterfly factors; merged W' = diag(s) W0 R^T."""

    delta_uses_base = True  # ΔW = diag(s) W0 R^T - W0 depends on W0

    def __init__(self, base: nn.Module, config: BOFTConfig) -> None:
        super().__init__()
        reject_embedding(base, "BOFT")
        d_in, d_out = layer_dims(base)
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
        self.transposed = type(base).__name__ == "Conv1D"
        self.boft_R = nn.Parameter(torch.zeros(m, self.block_num, b, b))  # A per level and block
        self.boft_s = nn.Parameter(torch.ones(d_out, 1))  # per-output scale s
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

    def layer_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> Tensor:
        # h = s ⊙ (W0 (x R)) + b: the frozen layer runs on rotated inputs, then each output is scaled
        R = self.rotation()  # (d_in, d_in)
        h = base((x.to(R.dtype) @ R).to(x.dtype), *args, **kwargs)  # W0 (x R) + b
        bias = getattr(base, "bias", None)
        if bias is None:
            return h * self.boft_s.squeeze(-1).to(h.dtype)
        return ((h - bias) * self.boft_s.squeeze(-1).to(h.dtype) + bias).to(h.dtype)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # Stacked after another adapter: h = s ⊙ (W0 (x R)) + b, W0 (x R) = (result - b) + W0 (x R - x)
        R = self.rotation()  # (d_in, d_in)
        xr = x.to(R.dtype)
        bias = base.bias.to(R.dtype) if getattr(base, "bias", None) is not None else 0.0
        rotated = result.to(R.dtype) - bias + F.linear(xr @ R - xr, linear_weight(base).to(R.dtype))
        return (rotated * self.boft_s.squeeze(-1) + bias).to(result.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        W0 = linear_weight(base)  # (d_out, d_in)
        R = self.rotation().to(W0.dtype)
        delta = (W0 @ R.T) * self.boft_s - W0  # W' = diag(s) W0 R^T
        return delta.T if self.transposed else delta
