"""What every method shares: the config fields common to all, checks with helpful errors, and
the form in which an adapter tells the memory ledger what it saves for backward.

The memory ledger (peftlab/memory/activations.py) asks each adapted layer of a model's first
block one question, through the adapter's optional method

    saved_activations(layer: LayerActivations) -> SavedActivations

(``layer``: the layer's shapes and dtypes in the step; the answer: what the adapter keeps for
its own gradients). The ledger adds the model's own tensors around it, so that no method's
name appears in the ledger. A soft prompt reports the positions it adds to every sequence with
``prompt_positions() -> PromptPositions``. An adapter that reports nothing is counted as LoRA of
its ``r`` (:func:`low_rank_activations`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields

from torch import Tensor, nn

from peftlab.errors import ConfigError, PeftlabWarning


@dataclass(frozen=True)
class AdapterConfig:
    # Which modules to adapt: "all-linear", a regex (full match), or a tuple of module names /
    # name suffixes. None means the method's default for the model's architecture.
    targets: str | tuple[str, ...] | None = None
    # Whole modules trained next to the adapter (e.g. a classifier head); None: the head of a
    # sequence-classification model, nothing otherwise.
    modules_to_save: tuple[str, ...] | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def for_layer(self, name: str) -> AdapterConfig:
        """The config the layer called ``name`` gets: this one, unless the method has per-layer
        settings (LoRA's rank_pattern / alpha_pattern)."""
        return self


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first of ``patterns`` that names the layer ``name``, as peft 0.21.2 matches rank_pattern
    and alpha_pattern keys (``get_pattern_key``): the key as a regex, ending ``name`` at a dot."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def in_base_layout(delta: Tensor, transposed: bool) -> Tensor:
    """ΔW (d_out, d_in) in the base weight's own layout, so that merging is W += ΔW: transposed
    where the base stores W as (d_in, d_out) (transformers' Conv1D)."""
    return delta.T if transposed else delta


def is_count(value: object, minimum: int = 1) -> bool:
    """Whether ``value`` is an int (a bool is not) of at least ``minimum``: a rank, a size, a count."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_rank(r: int, d_in: int | None = None, d_out: int | None = None, name: str = "r") -> None:
    """Rank must be a positive integer; above the layer's smaller side it is allowed (peft allows
    it) but redundant, which a warning says."""
    if not is_count(r):
        raise ConfigError(
            f"Rank {name}={r!r} is invalid. Expected a positive integer (typical values: 4, 8, 16, "
            "64). Try r=8."
        )
    if d_in is not None and d_out is not None and r > min(d_in, d_out):
        # ΔW = B·A is d_out x d_in, so rank(ΔW) <= min(d_out, d_in) whatever r is
        warnings.warn(
            f"Rank {name}={r} is above min(d_out, d_in) = {min(d_in, d_out)} for a {d_out} x {d_in} "
            f"layer: its update can have rank {min(d_in, d_out)} at most, so the "
            f"{r - min(d_in, d_out)} extra rank{'s' if r - min(d_in, d_out) > 1 else ''} add "
            "parameters without adding expressiveness (peft allows "
            f"it too). Try {name} <= {min(d_in, d_out)} for this layer, or other targets.",
            PeftlabWarning, stacklevel=2,
        )


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """value must lie in [low, high] (open ends where asked); says the expected interval."""
    bad = (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or value != value  # NaN
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ConfigError(f"{name}={value!r} is out of range. Expected a number in {lo}, {hi}. "
                          f"Try a value of {name} inside that interval, or leave it out for the default.")


# --------------------------------------------------------------------------------------------
# What an adapter saves for backward, as the memory ledger asks it (module docstring)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerActivations:
    """One adapted layer in one training step, as the memory ledger sees it."""

    tokens: int  # N = batch · positions: the rows of the layer's input x
    d_in: int  # x's width
    d_out: int  # the layer's output width
    adapter_bytes: int  # a: bytes per adapter value (4: peftlab's adapters are fp32)
    compute_bytes: int  # e: bytes per value of the model's activations (4 fp32, 2 bf16)
    input_grad: bool  # x needs a gradient (in the first block only if something upstream trains)
    fused: bool  # backend="fused" runs the step (peftlab.production.fused)


@dataclass(frozen=True)
class SavedActivations:
    """What one adapted layer keeps for backward beyond the base layer's own tensors."""

    own: int = 0  # bytes of the adapter's own saved tensors (LoRA: x Aᵀ, N·r·a)
    # x itself is kept for a trained tensor's gradient (the ledger shares it with the model's
    # copy where the dtypes agree); False: VeRA's x meets a frozen A first, BitFit's bias
    # gradient is the output's gradient alone
    keeps_input: bool = True
    # a training-time dropout comes first: dropout(x) and its mask are kept instead of x (the
    # ledger sizes both, by device and backend)
    dropout: bool = False
    outputs: int = 0  # bytes of output-wide tensors kept (DoRA: W0 x and B A x, for m's gradient)


@dataclass(frozen=True)
class PromptPositions:
    """Positions a soft prompt adds to every sequence, as the memory ledger counts them."""

    inputs: int = 0  # virtual tokens before the input: the whole model runs on T + n positions
    prefix: int = 0  # trained keys and values before every attention's own (n + T keys)


def trains_dropout(module: nn.Module | None) -> bool:
    """Whether ``module`` is a dropout that drops something in training (p > 0)."""
    return isinstance(module, nn.Dropout) and module.p > 0


def low_rank_activations(layer: LayerActivations, rank: int,
                         dropout: nn.Module | None = None) -> SavedActivations:
    """A LoRA-style adapter, h = W0 x + B A dropout(x): x (or dropout(x) and its mask) for A's
    gradient and x Aᵀ, N·r·a, for B's."""
    return SavedActivations(own=layer.tokens * rank * layer.adapter_bytes, dropout=trains_dropout(dropout))
