"""What every method shares: the config fields common to all, and checks with helpful errors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

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


def check_rank(r: int, d_in: int | None = None, d_out: int | None = None, name: str = "r") -> None:
    """Rank must be a positive integer; above the layer's smaller side it is allowed (peft allows
    it) but redundant, which a warning says."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
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
