"""Parameter accounting (and, as they land, the memory ledger and spectra of ΔW).

Counts are *logical*: a 4-bit weight of shape (d_out, d_in) counts d_out · d_in parameters even
though bitsandbytes stores it as d_out · d_in / 2 bytes in a uint8 tensor whose ``numel()`` is
half the logical count (a classic source of wrong "trainable %" figures).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor, nn


def logical_numel(param: Tensor) -> int:
    """Number of values the parameter represents, unpacking bitsandbytes' 4-bit storage."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        n = 1
        for d in quant_state.shape:
            n *= int(d)
        return n
    return param.numel()


@dataclass
class ParameterCount:
    trainable: int
    total: int
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)  # type -> {trainable, total}

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )

    def as_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent,
                "by_type": self.by_type}


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable / total / percent, plus a breakdown by the type of module owning each parameter.

    Adapter parameters are reported under the adapter's class (e.g. "LoRA"), the base model's
    under the layer class (e.g. "Linear", "Embedding", "LlamaRMSNorm"). Works for reference
    models, peft models and 4-bit models alike; shared (tied) weights count once.
    """
    owners: dict[int, str] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), type(module).__name__)
    trainable = total = 0
    by_type: dict[str, Counter] = {}
    seen: set[int] = set()
    for param in model.parameters():  # parameters() already skips tied duplicates
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = logical_numel(param)
        kind = owners.get(id(param), "other")
        row = by_type.setdefault(kind, Counter())
        row["total"] += n
        total += n
        if param.requires_grad:
            row["trainable"] += n
            trainable += n
    for module in model.modules():
        # peftlab's reference 4-bit layer keeps its frozen weight as packed buffers, not a
        # parameter: count the logical weight it stands for
        # (hasattr: transformers' PreTrainedModel also has an `is_quantized` flag, True for bnb models)
        if (getattr(module, "is_quantized", False) and hasattr(module, "in_features")
                and not isinstance(getattr(module, "weight", None), nn.Parameter)):
            n = module.in_features * module.out_features
            row = by_type.setdefault(type(module).__name__, Counter())
            row["total"] += n
            total += n
    return ParameterCount(
        trainable, total, {k: {"trainable": v["trainable"], "total": v["total"]} for k, v in by_type.items()}
    )

# The memory ledger lives in its own package (peftlab/memory/); re-exported here, its home in
# the design ("metrics: parameter accounting, memory ledger, spectra").
from peftlab.memory import MemoryLedger, estimate_memory, measure_memory  # noqa: E402,F401
