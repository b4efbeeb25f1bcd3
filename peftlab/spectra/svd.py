"""The SVD of a factorised update ΔW = L R without forming the d_out x d_in matrix.

With thin QR factorisations L = Q1 R1 and R^T = Q2 R2,

    ΔW = Q1 (R1 R2^T) Q2^T,   and   R1 R2^T = Uc diag(σ) Vc^T   (a small k x k SVD)

so σ are the singular values of the k x k core, U = Q1 Uc and V = Q2 Vc. Cost: O((d_out + d_in)
k^2) instead of O(d_out d_in min(d_out, d_in)).
"""

from __future__ import annotations

import torch
from torch import Tensor

# An update in (d_out, d_in) layout: either the explicit matrix ΔW or factors (left, right) with
# ΔW = left @ right, left (d_out, k), right (k, d_in).
Update = Tensor | tuple[Tensor, Tensor]


def working_copy(t: Tensor) -> Tensor:
    """A detached copy in a dtype the linear-algebra kernels accept (float64 stays float64)."""
    t = t.detach()
    return t if t.dtype == torch.float64 else t.float()


def _core(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Q1, core, Q2) with left @ right = Q1 @ core @ Q2^T and core small (k1 x k2)."""
    left, right = working_copy(left), working_copy(right).to(left.device)
    q1, r1 = torch.linalg.qr(left)  # (d_out, k1), (k1, k)
    q2, r2 = torch.linalg.qr(right.T)  # (d_in, k2), (k2, k)
    return q1, r1 @ r2.T, q2  # core: (k1, k2)


def factored_svdvals(left: Tensor, right: Tensor) -> Tensor:
    """Singular values of ``left @ right`` (descending) from the factors alone.

    Args:
        left: (d_out, k) factor.
        right: (k, d_in) factor.

    Returns:
        min(d_out, d_in, k) singular values, descending; the remaining ones of the full matrix
        are exactly zero.
    """
    _, core, _ = _core(left, right)
    return torch.linalg.svdvals(core)


def factored_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vh) of ``left @ right`` without forming the d_out x d_in matrix."""
    q1, core, q2 = _core(left, right)
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return q1 @ uc, s, vhc @ q2.T  # (d_out, k), (k,), (k, d_in)


def hadamard_factors(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of the Hadamard product (b1 @ a1) * (b2 @ a2), as LoHa uses.

    The face-splitting identity (B1 A1) ⊙ (B2 A2) = (B1 •row B2) (A1 •col A2) gives a left factor
    of shape (d_out, r1 r2) and a right factor of shape (r1 r2, d_in): rank <= r1 · r2.
    """
    d_out, d_in = b1.shape[0], a1.shape[1]
    left = (b1[:, :, None] * b2[:, None, :]).reshape(d_out, -1)  # (d_out, r1 r2)
    right = (a1[:, None, :] * a2[None, :, :]).reshape(-1, d_in)  # (r1 r2, d_in)
    return left, right


def kronecker_singular_values(a: Tensor, b: Tensor) -> Tensor:
    """Singular values of kron(a, b), descending: all products σ_i(a) σ_j(b) (as LoKr uses)."""
    outer = torch.outer(torch.linalg.svdvals(working_copy(a)), torch.linalg.svdvals(working_copy(b)))
    return outer.flatten().sort(descending=True).values


def svd_of(update: Update) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vh) of an explicit ΔW or of factors (left, right)."""
    if isinstance(update, tuple):
        return factored_svd(*update)
    return torch.linalg.svd(working_copy(update), full_matrices=False)


def svdvals_of(update: Update) -> Tensor:
    """Singular values, descending, of an explicit ΔW or of factors (left, right)."""
    if isinstance(update, tuple):
        return factored_svdvals(*update)
    return torch.linalg.svdvals(working_copy(update))
