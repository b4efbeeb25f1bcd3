"""The exercises of lesson 2 (notebooks/02_rank_and_spectra.ipynb): the singular values of ΔW from
LoRA's factors, and the subspace similarity of two adapters.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _factors_inputs(g: torch.Generator) -> dict:
    d_in, d_out = (int(torch.randint(6, 30, (1,), generator=g)) for _ in range(2))
    r = int(torch.randint(1, 6, (1,), generator=g))
    return {"A": torch.randn(r, d_in, generator=g, dtype=torch.float64),
            "B": torch.randn(d_out, r, generator=g, dtype=torch.float64),
            "scaling": float(torch.randint(1, 9, (1,), generator=g)) / 4}


def _lora_singular_values(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    from peftlab.spectra import factored_svdvals

    return factored_svdvals(scaling * B, A)


def _phi_inputs(g: torch.Generator) -> dict:
    d, r1, r2 = int(torch.randint(16, 40, (1,), generator=g)), 4, 12
    shared = torch.randn(2, d, generator=g, dtype=torch.float64)  # two directions both runs found
    A1 = torch.cat([shared, torch.randn(r1 - 2, d, generator=g, dtype=torch.float64)]) * 3
    A2 = torch.cat([shared, torch.randn(r2 - 2, d, generator=g, dtype=torch.float64)])
    return {"A1": A1, "A2": A2, "i": int(torch.randint(1, r1 + 1, (1,), generator=g)),
            "j": int(torch.randint(1, r2 + 1, (1,), generator=g))}


def _subspace_phi(A1: Tensor, A2: Tensor, i: int, j: int) -> Tensor:
    from peftlab.spectra import subspace_similarity

    return subspace_similarity(A1, A2, i, j)[i - 1, j - 1].double()


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "lora_singular_values",
        "lora_singular_values(A, B, scaling) -> the r singular values of ΔW = scaling · B A, descending, "
        "without forming ΔW: thin QR of B and of Aᵀ, then the SVD of the small r x r core.",
        _lora_singular_values,
        _factors_inputs,
        "Multiplying by a matrix with orthonormal columns does not change singular values. A thin QR "
        "factorisation writes B as (orthonormal d_out x r) times (r x r), and Aᵀ the same way: what is "
        "left between the two orthonormal factors of ΔW is a small r x r matrix.",
        dense=lambda inputs: (inputs["B"].shape[0], inputs["A"].shape[1], inputs["A"].shape[0]),
    ),
    Exercise(
        "subspace_phi",
        "subspace_phi(A1, A2, i, j) -> φ = ‖U_iᵀ V_j‖_F² / min(i, j), U_i the top-i right singular vectors "
        "of A1 (r1, d), V_j the top-j of A2 (r2, d): a 0-d tensor between 0 and 1.",
        _subspace_phi,
        _phi_inputs,
        "The right singular vectors of A1 are the input directions it reads; torch.linalg.svd returns "
        "them sorted, as the rows of Vh. Take A1's top i and A2's top j as orthonormal bases of two "
        "subspaces of R^d; how much one lies in the other is the squared Frobenius norm of the product "
        "of the two bases.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
