"""One-number summaries of a spectrum: effective rank, stable rank, energy share.

- effective rank: Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
  EUSIPCO 2007 (entropy of the normalised singular values), and the energy threshold rank;
- stable rank: ||ΔW||_F^2 / ||ΔW||_2^2 (Rudelson & Vershynin, 2007).
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.errors import ConfigError
from peftlab.spectra.svd import Update, svdvals_of


def _values(x: Tensor | Update) -> Tensor:
    """Singular values (float64, descending) of a 1-D spectrum, a matrix or factors."""
    if isinstance(x, Tensor) and x.ndim == 1:
        s = x.detach().double().abs()
        return s.sort(descending=True).values
    if isinstance(x, tuple) or (isinstance(x, Tensor) and x.ndim == 2):
        return svdvals_of(x).double()
    raise ConfigError(
        f"Expected singular values (1-D tensor), a matrix (2-D tensor) or factors (left, right); "
        f"got {type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}."
    )


def effective_rank(x: Tensor | Update, method: str = "entropy", threshold: float = 0.9) -> float:
    """How many directions the update uses.

    - ``"entropy"`` (Roy & Vetterli 2007): exp(H(p)) with p_i = σ_i / Σσ. Equals k for k equal
      singular values and 1 for a rank-1 matrix; fractional in between.
    - ``"energy"``: the smallest k whose top-k singular values hold ``threshold`` of the energy
      Σσ² (e.g. 90%).

    A zero update has effective rank 0.
    """
    s = _values(x)
    if s.numel() == 0 or s[0] == 0:
        return 0.0
    if method == "entropy":
        p = s / s.sum()
        p = p[p > 0]  # 0 · log 0 = 0
        return float(torch.exp(-(p * p.log()).sum()))
    if method == "energy":
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"threshold={threshold!r} is out of range. Expected a number in (0, 1].")
        share = (s**2).cumsum(0) / (s**2).sum()
        return float(int((share < threshold - 1e-12).sum()) + 1)
    raise ConfigError(f"Unknown effective-rank method {method!r}. Expected 'entropy' or 'energy'.")


def stable_rank(x: Tensor | Update) -> float:
    """||ΔW||_F^2 / ||ΔW||_2^2 = Σσ² / σ_1²: between 1 (one direction) and the rank; robust to
    tiny singular values, unlike the rank itself. A zero update gives 0."""
    s = _values(x)
    return float((s**2).sum() / s[0] ** 2) if s.numel() and s[0] > 0 else 0.0


def energy_share(x: Tensor | Update, k: int) -> float:
    """Share of the energy Σσ² held by the top-k singular values (1.0 if k >= the rank)."""
    s = _values(x)
    total = (s**2).sum()
    return float((s[:k] ** 2).sum() / total) if total > 0 else 0.0
