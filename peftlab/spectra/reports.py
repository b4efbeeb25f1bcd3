"""One JSON-ready summary per changed layer: what training did to a model's weights.

The same for an adapter's update and for full fine-tuning's (compared with a :func:`snapshot`
taken before training), which is how ``peftlab study --updates`` and lesson 19 set full
fine-tuning's ΔW beside LoRA's (Biderman et al. 2024, "LoRA Learns Less and Forgets Less",
https://arxiv.org/abs/2405.09673, section 6: full fine-tuning's updates have a rank 10-100 times
larger than typical LoRA ranks).

    before = snapshot(model, ("q_proj", "v_proj"))      # before full fine-tuning
    ...                                                  # train every weight
    report = update_report(model, before)               # {layer: {"effective_rank": ..., ...}}
    report = update_report(lora_model)                  # an adapted model needs no snapshot
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.spectra.changes import dense, weight_changes
from peftlab.spectra.intruders import EPSILON, TOP_K, intruder_dimensions
from peftlab.spectra.summaries import effective_rank, stable_rank
from peftlab.spectra.svd import svdvals_of


@torch.no_grad()
def update_report(
    model: nn.Module,
    before: dict[str, Tensor] | None = None,
    layers: str | Sequence[str] | None = None,
    keep: int = 64,
    top_k: int = TOP_K,
    epsilon: float = EPSILON,
) -> dict[str, dict[str, Any]]:
    """One summary per changed layer (:func:`weight_changes`), JSON-ready:

    ``norm`` ||ΔW||_F, ``relative_norm`` ||ΔW||_F / ||W||_F, ``effective_rank`` (entropy, Roy &
    Vetterli 2007), ``stable_rank``, ``rank_90`` (the directions holding 90% of ΔW's energy),
    ``intruders`` (among the ``top_k`` leading directions of W + ΔW, :mod:`peftlab.spectra.intruders`),
    ``similarity`` (those directions' best |cosine| with W's, 4 digits) and ``singular_values``,
    the largest ``keep`` of ΔW's, 4 significant digits.
    """
    out = {}
    for name, weight, delta in weight_changes(model, before, layers):
        values = svdvals_of(delta).double()
        intruders = intruder_dimensions(weight, weight + dense(delta), top_k, epsilon)
        norm = float(values.pow(2).sum().sqrt())
        out[name] = {"norm": round(norm, 6), "relative_norm": round(norm / float(weight.norm()), 6),
                     "effective_rank": round(effective_rank(values), 3), "stable_rank": round(stable_rank(values), 3),
                     "rank_90": int(effective_rank(values, "energy", 0.9)) if norm > 0 else 0,
                     "intruders": intruders.count,
                     "similarity": [round(v, 4) for v in intruders.similarity.tolist()],
                     "singular_values": [float(f"{v:.4g}") for v in values[:keep].tolist()]}
    return out
