"""Spectra of weight updates: how low-rank is what an adapter learned?

Every weight-space adapter changes a frozen weight W (d_out x d_in) by some ΔW. Its singular
values σ_1 >= σ_2 >= ... say how many directions the update really uses, and how strongly:

    ΔW = U diag(σ) V^T        U: (d_out, k)   σ: (k,)   V: (d_in, k)

For a factorised update ΔW = L R (LoRA: L = scaling · B, R = A) the SVD never needs the
d_out x d_in matrix. With thin QR factorisations L = Q1 R1 and R^T = Q2 R2,

    ΔW = Q1 (R1 R2^T) Q2^T,   and   R1 R2^T = Uc diag(σ) Vc^T   (a small k x k SVD)

so σ are the singular values of the k x k core, U = Q1 Uc and V = Q2 Vc. Cost: O((d_out + d_in)
k^2) instead of O(d_out d_in min(d_out, d_in)) — the difference between microseconds and seconds
for a 4096 x 4096 layer (``bench_spectra`` measures it).

Which route a layer takes (``adapter_singular_values``), first match wins:

1. the adapter has ``singular_values(base)``: it knows its spectrum in closed form (LoKr: the
   singular values of a Kronecker product are the products of the factors' singular values,
   see :func:`kronecker_singular_values`);
2. the adapter has ``factors()`` returning (left, right) with ΔW = left @ right in (d_out, d_in)
   layout (LoRA; AdaLoRA as (P Λ, Q); LoHa via :func:`hadamard_factors`);
3. otherwise a full SVD of ``delta_weight(base)``.

DoRA's ΔW = m ⊙ V / ||V||_c - W0 (V = W0 + s·B A) is full-rank: ``part="weight"`` (default) takes
that full SVD, ``part="direction"`` the spectrum of the direction update s·B A from its factors.

peft models work too: LoRA layers are read from ``lora_A``/``lora_B``/``scaling`` of the active
adapter (DoRA from its magnitude vector); other peft layers through ``get_delta_weight``.

The analyses follow the papers:

- effective rank: Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
  EUSIPCO 2007 (entropy of the normalised singular values), and the energy threshold rank;
- stable rank: ||ΔW||_F^2 / ||ΔW||_2^2 (Rudelson & Vershynin, 2007);
- intruder dimensions (Shuttleworth et al. 2024, https://arxiv.org/abs/2410.21228): leading
  singular vectors of W + ΔW unlike any of W's, found and scaled down as peft's
  ``reduce_intruder_dimension`` does (:mod:`peftlab.spectra.intruders`);
- subspace similarity φ(A1, A2, i, j) = ||U_i^T V_j||_F^2 / min(i, j) and the amplification
  factor ||ΔW||_F / ||U^T W V||_F: LoRA paper sections 7.2 and 7.3, Hu et al. 2021,
  https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

from peftlab.spectra.bench import bench_spectra, format_bench_spectra
from peftlab.spectra.changes import snapshot, weight_changes
from peftlab.spectra.history import SpectrumHistory
from peftlab.spectra.intruders import Intruders, find_intruders, intruder_dimensions, reduce_intruders
from peftlab.spectra.layers import PARTS, adapter_singular_values, adapter_update, spectrum
from peftlab.spectra.reports import update_report
from peftlab.spectra.subspaces import Amplification, amplification, subspace_similarity
from peftlab.spectra.summaries import effective_rank, energy_share, stable_rank
from peftlab.spectra.svd import (Update, factored_svd, factored_svdvals, hadamard_factors, kronecker_singular_values,
                                 svd_of, svdvals_of)

__all__ = [
    "Amplification",
    "Intruders",
    "SpectrumHistory",
    "Update",
    "adapter_singular_values",
    "adapter_update",
    "amplification",
    "bench_spectra",
    "effective_rank",
    "energy_share",
    "factored_svd",
    "factored_svdvals",
    "find_intruders",
    "format_bench_spectra",
    "hadamard_factors",
    "intruder_dimensions",
    "kronecker_singular_values",
    "reduce_intruders",
    "snapshot",
    "spectrum",
    "stable_rank",
    "subspace_similarity",
    "svd_of",
    "svdvals_of",
    "update_report",
    "weight_changes",
]
