"""Comparing subspaces: LoRA paper sections 7.2 and 7.3 (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

The subspace similarity φ(A1, A2, i, j) = ||U_i^T V_j||_F^2 / min(i, j) of two updates, and the
amplification factor ||ΔW||_F / ||U^T W V||_F of an update against its pretrained weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer
from peftlab.spectra.layers import base_weight, is_peft_layer, layer_update
from peftlab.spectra.svd import Update, svd_of, working_copy


def _as_update(x: Tensor | Update | nn.Module) -> Update:
    if isinstance(x, nn.Module):
        if isinstance(x, AdaptedLayer) or is_peft_layer(x):
            return layer_update(x)
        raise ConfigError(
            f"Expected an adapted layer, a matrix or factors (left, right); got {type(x).__name__}."
        )
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return tuple(x)
    if isinstance(x, Tensor) and x.ndim == 2:
        return x
    raise ConfigError(
        f"Expected a matrix (2-D tensor), factors (left, right) or an adapted layer; got "
        f"{type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}."
    )


@torch.no_grad()
def subspace_similarity(
    a: Tensor | Update | nn.Module,
    b: Tensor | Update | nn.Module,
    i: int | None = None,
    j: int | None = None,
    side: str = "right",
) -> Tensor:
    """The grid φ(a, b, i', j') = ||U_i'^T V_j'||_F² / min(i', j') for i' <= i, j' <= j.

    U_i' are the top-i' singular vectors of ``a``, V_j' those of ``b``, on the ``side`` given.
    φ is 1 where one subspace contains the other and 0 where they are orthogonal; for random
    subspaces of R^d it is about max(i', j') / d. To reproduce the paper's Figure 3 pass the two
    LoRA ``A`` matrices (rank 8 and rank 64 runs of the same layer): it uses their right
    singular vectors. Matrices, factors (left, right) and adapted layers (their ΔW) all work.

    Returns:
        A (i, j) float tensor: entry [i'-1, j'-1] is φ(i', j'), ready for a heatmap.
    """
    if side not in ("right", "left"):
        raise ConfigError(f"side={side!r} is not known. Expected 'right' (inputs) or 'left' (outputs).")
    ua, sa, vha = svd_of(_as_update(a))
    ub, sb, vhb = svd_of(_as_update(b))
    basis_a = vha.T if side == "right" else ua  # (d, k_a)
    basis_b = vhb.T if side == "right" else ub  # (d, k_b)
    if basis_a.shape[0] != basis_b.shape[0]:
        raise ConfigError(
            f"The two updates live in different spaces: {side} dimension {basis_a.shape[0]} vs "
            f"{basis_b.shape[0]}. Expected the same layer (or layers of the same shape) adapted twice."
        )
    i = basis_a.shape[1] if i is None else i
    j = basis_b.shape[1] if j is None else j
    if not (1 <= i <= basis_a.shape[1] and 1 <= j <= basis_b.shape[1]):
        raise ConfigError(
            f"i={i}, j={j} are out of range. Expected 1 <= i <= {basis_a.shape[1]} and "
            f"1 <= j <= {basis_b.shape[1]} (the number of singular vectors of each input)."
        )
    overlap = (basis_a[:, :i].T @ basis_b[:, :j].to(basis_a)) ** 2  # (i, j): squared cosines
    cumulative = overlap.double().cumsum(0).cumsum(1)  # [i'-1, j'-1] = ||U_i'^T V_j'||_F^2
    rows = torch.arange(1, i + 1, dtype=torch.float64)[:, None]
    cols = torch.arange(1, j + 1, dtype=torch.float64)[None, :]
    return (cumulative.cpu() / torch.minimum(rows, cols)).float()


@dataclass(frozen=True)
class Amplification:
    """LoRA paper, Table 7: how much ΔW amplifies directions W already has."""

    r: int  # number of ΔW's singular directions projected on
    factor: float  # ||ΔW||_F / ||U^T W V||_F: the amplification factor
    delta_norm: float  # ||ΔW||_F
    weight_norm: float  # ||W||_F
    projected_norm: float  # ||U^T W V||_F with U, V the top-r singular vectors of ΔW
    top_weight_norm: float | None  # same with W's own top-r singular vectors (= sqrt Σ_top-r σ_W²)
    random_norm: float | None  # same with random orthonormal U, V (mean over trials)

    def table(self) -> dict[str, float | None]:
        """The paper's table as {row: value}."""
        return {
            "||U^T W V||_F, U,V of ΔW": self.projected_norm,
            "||U^T W V||_F, U,V of W": self.top_weight_norm,
            "||U^T W V||_F, random U,V": self.random_norm,
            "||W||_F": self.weight_norm,
            "||ΔW||_F": self.delta_norm,
            "amplification ||ΔW||_F / ||U^T W V||_F": self.factor,
        }


@torch.no_grad()
def amplification(
    delta: Tensor | Update | nn.Module,
    weight: Tensor | None = None,
    r: int | None = None,
    compare: bool = True,
    trials: int = 8,
    seed: int = 0,
) -> Amplification:
    """The amplification factor ||ΔW||_F / ||U^T W V||_F of LoRA paper section 7.3.

    Args:
        delta: ΔW (d_out, d_in), factors (left, right), or an adapted layer (then ``weight``
            defaults to its frozen base weight).
        weight: the pretrained W, (d_out, d_in) (nn.Linear layout).
        r: how many of ΔW's singular directions to use; default its numerical rank.
        compare: also project W on its own top-r directions and on random ones, as the paper's
            table does (costs one SVD of W).
        trials: random bases averaged for the random row.
        seed: seed of the random bases.
    """
    if weight is None:
        if not isinstance(delta, nn.Module):
            raise ConfigError(
                "amplification() needs the pretrained weight W. Expected weight=<(d_out, d_in) "
                "tensor>, or pass an adapted layer instead of a matrix."
            )
        weight = base_weight(delta)
    update = _as_update(delta)
    u, s, vh = svd_of(update)
    w = working_copy(weight).to(u)
    if w.shape != (u.shape[0], vh.shape[1]):
        raise ConfigError(
            f"ΔW is {u.shape[0]} x {vh.shape[1]} but W is {tuple(w.shape)}. Expected both in "
            "(d_out, d_in) layout (nn.Linear's); transpose a Conv1D or embedding weight."
        )
    if s.numel() == 0 or s[0] == 0:
        raise ConfigError(
            "ΔW is zero, so it has no directions to compare (LoRA's B starts at zero). Expected a "
            "trained adapter; train a few steps first, or randomise lora_B for a demonstration."
        )
    rank = int((s > s[0] * 1e-6).sum())
    r = rank if r is None else r
    if not 1 <= r <= s.numel():
        raise ConfigError(
            f"r={r} is out of range. Expected 1 <= r <= {s.numel()} (ΔW's singular directions)."
        )
    delta_norm = float(s.double().norm())
    projected = float((u[:, :r].T @ w @ vh[:r].T).norm())
    top = rand = None
    if compare:
        top = float(torch.linalg.svdvals(w)[:r].double().norm())
        gen = torch.Generator().manual_seed(seed)
        norms = []
        for _ in range(trials):
            qu = torch.linalg.qr(torch.randn(w.shape[0], r, generator=gen, dtype=w.dtype))[0].to(w.device)
            qv = torch.linalg.qr(torch.randn(w.shape[1], r, generator=gen, dtype=w.dtype))[0].to(w.device)
            norms.append(float((qu.T @ w @ qv).norm()))
        rand = sum(norms) / len(norms)
    factor = delta_norm / projected if projected > 0 else math.inf
    return Amplification(r, factor, delta_norm, float(w.double().norm()), projected, top, rand)
