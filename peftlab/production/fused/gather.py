"""A mixed batch on the fused backend: each row's LoRA factors gathered once, used at every step.

The reference (peftlab/inject/gather.py) stacks the adapters and gathers each row's slot on every
call. Serving calls a layer many times with the same rows - once for the prompt, then once per
generated token with the KV cache - so this keeps the gathered factors of one batch, with the
scaling folded in, and each call is two batched matmuls (Punica's BGMV,
https://arxiv.org/abs/2310.18547):

    A_rows (batch, d_in, r) = 𝔸[a_i]ᵀ          B_rows (batch, r, d_out) = (s_{a_i} 𝔹[a_i])ᵀ

    h = W0 x + (x A_rows) B_rows                x: (batch, T, d_in); torch.bmm, then baddbmm

Rows that run no adapter on the layer gather zeros. The kept factors are rebuilt when the batch's
routing changes, when any A or B is written in place (a training step: tensor versions), and when
a hot-swap or a rank padding says so (peftlab/io/hotswap.py resets the layers). Checking costs a
few integer reads per call, so a generation step does not pay for the number of adapters.
Inference only: with gradients on, the reference form runs (it differentiates through the stack).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from peftlab.inject.gather import LowRank


class GatheredRows:
    """The gathered, scaled factors of one mixed batch on one layer, and what they came from."""

    def __init__(self, names: list[str], tensors: list[Tensor], A_rows: Tensor, B_rows: Tensor) -> None:
        self.names = names  # the layer's routing list itself (one object per routed call or block)
        self.tensors = tensors  # every A and B gathered from
        self.versions = [t._version for t in tensors]  # in-place writes (hot-swap, optimiser) bump these
        self.A_rows = A_rows  # (batch, d_in, r)
        self.B_rows = B_rows  # (batch, r, d_out)

    def fresh(self, names: list[str]) -> bool:
        """Still right for this call: the same routing and no tensor written since. O(adapters)
        integer reads per call, nothing else: the per-step cost does not grow with the batch."""
        return names is self.names and all(t._version == v for t, v in zip(self.tensors, self.versions))


def gather_rows(factors: Mapping[str, LowRank], names: list[str]) -> GatheredRows:
    """Row i's Aᵀ and (s B)ᵀ, ranks padded with zeros to the largest; zeros for other rows. Each
    adapter is laid out once, then one torch.stack per factor copies the rows (no per-row op)."""
    rank = max(f.A.shape[0] for f in factors.values())
    first = next(iter(factors.values()))
    At = {n: F.pad(f.A.T, (0, rank - f.A.shape[0])) for n, f in factors.items()}  # (d_in, r)
    Bt = {n: F.pad(f.B.T * f.scaling, (0, 0, 0, rank - f.B.shape[1])) for n, f in factors.items()}  # (r, d_out)
    zero_A = first.A.new_zeros(first.A.shape[1], rank)
    zero_B = first.B.new_zeros(rank, first.B.shape[0])
    A_rows = torch.stack([At.get(n, zero_A) for n in names])  # (batch, d_in, r)
    B_rows = torch.stack([Bt.get(n, zero_B) for n in names])  # (batch, r, d_out)
    tensors = [t for f in factors.values() for t in (f.A, f.B)]
    return GatheredRows(names, tensors, A_rows, B_rows)


def add_gathered(result: Tensor, x: Tensor, rows: GatheredRows) -> Tensor:
    """result + (x A_rows) B_rows, in the factors' dtype, returned in result's dtype."""
    batch, d_out = x.shape[0], rows.B_rows.shape[-1]
    x3 = x.reshape(batch, -1, x.shape[-1]).to(rows.A_rows.dtype)  # (batch, T, d_in)
    u = torch.bmm(x3, rows.A_rows)  # (batch, T, r)
    out = result.reshape(batch, -1, d_out)
    if out.dtype == u.dtype:
        out = torch.baddbmm(out, u, rows.B_rows)
    else:  # a bf16 base with fp32 adapters: add in the wider dtype, round once (as the reference)
        out = (out + torch.bmm(u, rows.B_rows)).to(result.dtype)
    return out.reshape(result.shape)


__all__ = ["GatheredRows", "gather_rows", "add_gathered"]
