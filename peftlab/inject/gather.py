"""Batched multi-LoRA: a batch whose row i runs its own adapter a_i, in one pass per layer.

How serving systems run many adapters on one base (S-LoRA, Sheng et al. 2023,
https://arxiv.org/abs/2311.03285; Punica, Chen et al. 2023, https://arxiv.org/abs/2310.18547,
whose BGMV and SGMV kernels vLLM runs). For row i of the batch

        h_i = W0 x_i + s_{a_i} · B_{a_i} A_{a_i} x_i

Stack the factors of the adapters the batch uses, padding every rank to the largest r with zeros
(a zero row of A meets a zero column of B: it adds exactly nothing), and keep slot 0 for the rows
that use no adapter on this layer:

        𝔸 (L+1, r, d_in)    𝔹 (L+1, d_out, r)    s (L+1,)        𝔸[0] = 0, 𝔹[0] = 0

**Gather form** (BGMV): each row picks its slot; two batched matmuls do every row at once

        u_i = 𝔸[a_i] x_i      (T, r)        h_i = W0 x_i + s[a_i] · 𝔹[a_i] u_i      (T, d_out)

**Segment form** (SGMV): when the rows that share an adapter sit together, run the segments
(start, end, slot) on slices of the batch; each segment reads its adapter's slot of the stack,
so no factor is copied per row:

        h[start:end] += s_a · (x[start:end] 𝔸[a]ᵀ) 𝔹[a]ᵀ

peft computes the same sum by looping over the adapters present and indexing their rows
(peft/tuners/lora/layer.py, ``_mixed_batch_forward``); all three agree to rounding. The fused
backend keeps the gathered factors of one batch for every step of a generation
(peftlab/production/fused/gather.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class LowRank(NamedTuple):
    """An update s · B A x that a mixed batch may stack (what ``Adapter.low_rank`` returns)."""

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scaling: float


class Stack(NamedTuple):
    """The stacked, rank-padded factors of the adapters one batch uses; slot 0 is "no adapter"."""

    A: Tensor  # (L+1, r_max, d_in)
    B: Tensor  # (L+1, d_out, r_max)
    scaling: Tensor  # (L+1,)


def stack(factors: Sequence[LowRank]) -> Stack:
    """Slot 0 (zeros) then each adapter's A, B, ranks padded with zeros to the largest."""
    first = factors[0]
    rank = max(f.A.shape[0] for f in factors)
    d_out, d_in = first.B.shape[0], first.A.shape[1]
    A = first.A.new_zeros(len(factors) + 1, rank, d_in)
    B = first.B.new_zeros(len(factors) + 1, d_out, rank)
    for slot, f in enumerate(factors, start=1):
        A[slot, : f.A.shape[0]] = f.A
        B[slot, :, : f.B.shape[1]] = f.B
    scaling = torch.tensor([0.0, *(f.scaling for f in factors)], dtype=A.dtype, device=A.device)
    return Stack(A, B, scaling)


def gathered(x: Tensor, stacked: Stack, index: Tensor) -> Tensor:
    """The gather form: row i's update s[a_i] 𝔹[a_i] 𝔸[a_i] x_i, for x (batch, T, d_in) and the
    slot of each row, index (batch,); returns (batch, T, d_out)."""
    A, B = stacked.A[index], stacked.B[index]  # (batch, r, d_in), (batch, d_out, r)
    u = torch.einsum("btd,brd->btr", x, A)  # (batch, T, r)
    return torch.einsum("btr,bor->bto", u, B) * stacked.scaling[index].view(-1, 1, 1)


def segments(slots: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """The runs (start, end, slot) of equal slots, or None if some slot appears in two runs
    (then the rows sharing an adapter are not contiguous and the gather form applies)."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][2] == slot:
            runs[-1] = (runs[-1][0], i + 1, slot)
        else:
            runs.append((i, i + 1, slot))
    return runs if len({slot for _, _, slot in runs}) == len(runs) else None


def segmented(x: Tensor, stacked: Stack, runs: Sequence[tuple[int, int, int]]) -> Tensor:
    """The segment form: each run's rows times its adapter, on a slice; slot 0 adds nothing."""
    update = x.new_zeros(*x.shape[:-1], stacked.B.shape[1])  # (batch, T, d_out)
    for start, end, slot in runs:
        if slot:
            u = x[start:end] @ stacked.A[slot].T  # (rows, T, r)
            update[start:end] = (u @ stacked.B[slot].T) * stacked.scaling[slot]
    return update


def mixed_update(x: Tensor, factors: Mapping[str, LowRank], names: Sequence[str]) -> Tensor:
    """The update of a mixed batch on one layer: row i runs ``factors[names[i]]`` (a name that
    is not in ``factors``, like "__base__", runs none). Segment form when the rows sharing an
    adapter are contiguous, gather form otherwise. x is (batch, ..., d_in), in the factors' dtype."""
    order = list(factors)
    slot_of = {name: slot for slot, name in enumerate(order, start=1)}
    slots = [slot_of.get(name, 0) for name in names]
    stacked = stack([factors[name] for name in order])
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, T, d_in): a 2-D input is T = 1
    runs = segments(slots)
    if runs is not None:
        update = segmented(x3, stacked, runs)
    else:
        update = gathered(x3, stacked, torch.tensor(slots, device=x.device))
    return update.reshape(*x.shape[:-1], update.shape[-1])


__all__ = ["LowRank", "Stack", "stack", "gathered", "segments", "segmented", "mixed_update"]
