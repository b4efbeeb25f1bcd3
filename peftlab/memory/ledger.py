"""The ledger itself: bytes per category of one training step, and what the estimate and the
measurement both ask of a model (its distinct parameters, its architecture, its head)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

CATEGORIES = ("weights", "adapter_weights", "gradients", "optimizer", "activations", "temporaries")


@dataclass
class MemoryLedger:
    """Bytes per category of one training step; ``source`` is "estimate" or "measured"."""

    weights: int = 0
    adapter_weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    source: str = "estimate"
    details: dict[str, Any] = field(default_factory=dict)  # per-term bytes, settings, peaks

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def as_dict(self) -> dict[str, int]:
        """{category: bytes} (for ``peftlab.plots.memory_ledger``), plus the total."""
        return {**{c: getattr(self, c) for c in CATEGORIES}, "total": self.total}

    def relative_error(self, measured: MemoryLedger) -> dict[str, float]:
        """(self - measured) / measured per category ``measured`` has (non-zero), and "total"
        over those categories only (a measurement has no ``temporaries``)."""
        out = {}
        mine, theirs = self.as_dict(), measured.as_dict()
        shared = [c for c in CATEGORIES if theirs[c]]
        for c in shared:
            out[c] = (mine[c] - theirs[c]) / theirs[c]
        if shared:
            a, b = sum(mine[c] for c in shared), sum(theirs[c] for c in shared)
            out["total"] = (a - b) / b
        return out

    def table(self, other: MemoryLedger | None = None) -> str:
        """A text table in MB; with ``other``, side by side with the relative difference."""
        rows = [f"{'category':<16}{self.source:>12}" + (f"{other.source:>12}{'diff':>8}" if other else "")]
        for c in CATEGORIES + ("total",):
            a = self.as_dict()[c] / 2**20
            line = f"{c:<16}{a:>12.2f}"
            if other is not None:
                b = other.as_dict()[c] / 2**20
                line += f"{b:>12.2f}" + (f"{(a - b) / b:>+8.1%}" if b else f"{'':>8}")
            rows.append(line)
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


class SavedTensors:
    """The tensors autograd saves for backward inside ``with saved.hooks():``, by storage.

    ``key(t)`` names a tensor's storage; the storages in ``skip`` (parameters and buffers, which
    the ledger counts as weights: saving one, or a view of one, costs nothing) are left out. An
    address freed during forward may come back for another storage, so bytes are kept per tensor.
    """

    def __init__(self, key: Callable[[Tensor], int], skip: set[int]) -> None:
        self.key, self.skip = key, skip
        self.saved: dict[int, list[tuple[weakref.ref, int]]] = {}  # storage -> [(tensor, its bytes)]

    def pack(self, t: Tensor) -> Tensor:
        key = self.key(t)
        if key not in self.skip:
            self.saved.setdefault(key, []).append((weakref.ref(t), t.untyped_storage().nbytes()))
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def held_bytes(self) -> int:
        """Bytes of the saved storages the graph still holds: a branch whose result was dropped
        (a weight norm computed and then detached, say) has freed what it saved."""
        return sum(max((nbytes for ref, nbytes in refs if ref() is not None), default=0)
                   for refs in self.saved.values())


def unique_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) once per parameter: a tied weight (embeddings and head) counts once."""
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def is_bert(config) -> bool:
    """A BERT-style encoder (post-LayerNorm, GELU, a classifier head), by ``config.model_type``."""
    return getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta")


def is_causal(config) -> bool:
    """A causal LM (its loss keeps the logits), as the ledger builds it: all but BERT-style."""
    return not is_bert(config)


def is_classifier(model: nn.Module) -> bool:
    """A ``*ForSequenceClassification`` model (under peft's wrapper too): one label per row."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForSequenceClassification")
