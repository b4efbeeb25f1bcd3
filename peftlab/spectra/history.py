"""Spectra over training: a callback that records the singular values of ΔW every few steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.spectra.layers import spectrum


class SpectrumHistory:
    """A training callback that records the spectra of ΔW every ``every`` steps.

        history = peftlab.spectra.SpectrumHistory(every=10)
        peftlab.train(model, data, callbacks=[history])
        steps, values = history.as_arrays()        # values[layer]: (n_captures, k)

    Cheap: factorised adapters cost one thin QR per layer per capture, no d_out x d_in SVD.

    Args:
        every: capture when ``record["step"] % every == 0``.
        layers: only these layers (regex or names / suffixes, as ``targets``); None: all.
        adapter_name: which adapter; default the active one.
        top: keep only the top-``top`` singular values per layer (memory for long runs).
    """

    def __init__(
        self,
        every: int = 10,
        layers: str | Sequence[str] | None = None,
        adapter_name: str | None = None,
        top: int | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every={every!r} is invalid. Expected a positive integer, e.g. every=10.")
        self.every, self.layers, self.adapter_name, self.top = every, layers, adapter_name, top
        self.history: dict[int, dict[str, Tensor]] = {}

    def capture(self, model: nn.Module, step: int) -> dict[str, Tensor]:
        """Record the spectra now, under ``step`` (e.g. step 0 before training)."""
        values = spectrum(model, self.adapter_name, self.layers)
        if self.top is not None:
            values = {k: v[: self.top] for k, v in values.items()}
        self.history[int(step)] = values
        return values

    def __call__(self, record: Mapping[str, Any] | Any, model: nn.Module) -> None:
        step = record["step"] if isinstance(record, Mapping) else record.step
        if step % self.every == 0:
            self.capture(model, step)

    def __len__(self) -> int:
        return len(self.history)

    @property
    def steps(self) -> list[int]:
        return sorted(self.history)

    def as_arrays(self) -> tuple[Any, dict[str, Any]]:
        """(steps, {layer: values}) as numpy arrays: steps (n,), values (n, k), NaN-padded
        where a layer's spectrum is shorter at some step."""
        import numpy as np

        steps = self.steps
        names = list(dict.fromkeys(n for s in steps for n in self.history[s]))
        out = {}
        for name in names:
            rows = [self.history[s].get(name) for s in steps]
            width = max(len(v) for v in rows if v is not None)
            grid = np.full((len(steps), width), np.nan)
            for t, v in enumerate(rows):
                if v is not None:
                    grid[t, : len(v)] = v.double().numpy()
            out[name] = grid
        return np.asarray(steps, dtype=np.int64), out
