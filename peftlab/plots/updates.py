"""Figures of what an adapter learned: spectra of ΔW, subspace similarity, AdaLoRA's ranks, DoRA's changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.plots.style import COLORSCALE, PALETTE, as_array, styled

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go


def _padded(rows: Sequence[Any]) -> np.ndarray:
    """Stack 1-D arrays of different lengths into a NaN-padded 2-D array."""
    arrays = [as_array(r).ravel() for r in rows]
    width = max((len(a) for a in arrays), default=0)
    out = np.full((len(arrays), width), np.nan)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


def spectra_heatmap(
    spectra: Mapping[str, Any],
    max_index: int | None = None,
    log: bool = True,
    title: str = "Singular values of ΔW per layer",
) -> go.Figure:
    """Layers (rows) x singular index (columns), colour = σ on a log10 scale.

    Args:
        spectra: {layer: 1-D singular values}, e.g. ``peftlab.spectrum(model)``.
        max_index: show only the first ``max_index`` singular values.
        log: colour by log10 σ (zeros become blank); the hover shows σ itself.
    """
    import plotly.graph_objects as go

    layers = list(spectra)
    values = _padded([spectra[k] for k in layers])
    if max_index is not None:
        values = values[:, :max_index]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(values > 0, np.log10(values), np.nan) if log else values
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(1, values.shape[1] + 1), y=layers, customdata=values,
        colorscale=COLORSCALE, colorbar={"title": "log10 σ" if log else "σ"},
        hovertemplate="%{y}<br>σ_%{x} = %{customdata:.4g}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")  # first layer on top, as in the model
    return styled(fig, title, "singular value index i", "layer",
                  height=max(300, 60 + 22 * len(layers)))


def spectrum_evolution(
    steps: Sequence[int] | Any,
    values: Any,
    layer: str | None = None,
    top: int = 8,
    log: bool = True,
    title: str | None = None,
) -> go.Figure:
    """The top singular values of one layer's ΔW over training: one line per σ_i.

    Args:
        steps: the capture steps, shape (T,).
        values: (T, k) array for one layer, or {layer: (T, k)} as from
            ``SpectrumHistory.as_arrays()`` (then ``layer`` picks one; default the first).
        top: how many singular values to draw.
    """
    import plotly.graph_objects as go

    if isinstance(values, Mapping):
        layer = layer if layer is not None else next(iter(values))
        values = values[layer]
    grid = as_array(values)
    x = as_array(steps)
    fig = go.Figure()
    for i in range(min(top, grid.shape[1])):
        fig.add_scatter(x=x, y=grid[:, i], mode="lines+markers", name=f"σ{i + 1}",
                        line={"color": PALETTE[i % len(PALETTE)]}, marker={"size": 5},
                        hovertemplate=f"step %{{x}}<br>σ{i + 1} = %{{y:.4g}}<extra></extra>")
    title = title or ("Spectrum of ΔW over training" + (f": {layer}" if layer else ""))
    return styled(fig, title, "optimizer step", "singular value σ_i", yaxis_type="log" if log else "linear")


def subspace_similarity_heatmap(
    grid: Any,
    label_a: str = "adapter A",
    label_b: str = "adapter B",
    title: str = "Subspace similarity φ(i, j)",
) -> go.Figure:
    """φ(i, j) from ``peftlab.subspace_similarity`` as a heatmap (LoRA paper, Figure 3): 1 where
    the top-i directions of A contain the top-j of B (or vice versa), 0 where orthogonal."""
    import plotly.graph_objects as go

    z = as_array(grid)
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(1, z.shape[1] + 1), y=np.arange(1, z.shape[0] + 1),
        zmin=0.0, zmax=1.0, colorscale=COLORSCALE, colorbar={"title": "φ"},
        hovertemplate="i = %{y}, j = %{x}<br>φ = %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    return styled(fig, title, f"j: top-j singular vectors of {label_b}",
                  f"i: top-i singular vectors of {label_a}")


def rank_allocation(
    ranks: Mapping[str, Any] | Any,
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    title: str = "AdaLoRA rank allocation",
) -> go.Figure:
    """Rank each layer holds: a bar chart from {layer: rank}, or a steps x layers heatmap from
    {layer: [rank per step]} or a (steps, layers) array (with ``layers`` and ``steps``)."""
    import plotly.graph_objects as go

    if isinstance(ranks, Mapping):
        layers = list(ranks)
        first = as_array(ranks[layers[0]])
        if first.ndim == 0:  # {layer: rank}: one bar per layer
            y = [float(as_array(ranks[k])) for k in layers]
            fig = go.Figure(go.Bar(x=layers, y=y, marker_color=PALETTE[0],
                                   hovertemplate="%{x}<br>rank %{y:.0f}<extra></extra>"))
            return styled(fig, title, "layer", "rank (singular values kept)")
        grid = np.stack([as_array(ranks[k]) for k in layers], axis=1)  # (steps, layers)
    else:
        grid = as_array(ranks)
        if grid.ndim == 1:
            grid = grid[None, :]
        layers = list(layers) if layers is not None else [f"layer {i}" for i in range(grid.shape[1])]
    y = as_array(steps) if steps is not None else np.arange(grid.shape[0])
    fig = go.Figure(go.Heatmap(
        z=grid, x=layers, y=y, colorscale=COLORSCALE, colorbar={"title": "rank"},
        hovertemplate="%{x}<br>step %{y}: rank %{z:.0f}<extra></extra>",
    ))
    return styled(fig, title, "layer", "optimizer step")


def dora_changes(
    steps: Sequence[int] | Any,
    magnitude: Any,
    direction: Any,
    layers: Sequence[str] | None = None,
    title: str = "DoRA: magnitude vs direction change",
) -> go.Figure:
    """ΔM (magnitude change) against ΔD (direction change) per checkpoint, as DoRA's Figure 2.

    Args:
        steps: checkpoint steps, shape (T,).
        magnitude: ΔM_t = mean |m_t - m_0|, shape (T,) or (T, layers).
        direction: ΔD_t = mean (1 - cos(W_t, W_0)) over columns, same shape.
        layers: names of the layer columns.
    Liu et al. 2024, https://arxiv.org/abs/2402.09353: full fine-tuning and DoRA show a negative
    slope (large direction changes with small magnitude changes), LoRA a positive one.
    """
    import plotly.graph_objects as go

    m, d, s = as_array(magnitude), as_array(direction), as_array(steps)
    if m.ndim == 1:
        m, d = m[:, None], d[:, None]
    layers = list(layers) if layers is not None else (["ΔW"] if m.shape[1] == 1 else
                                                     [f"layer {i}" for i in range(m.shape[1])])
    fig = go.Figure()
    symbols = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon")
    for k, name in enumerate(layers):
        fig.add_scatter(
            x=d[:, k], y=m[:, k], mode="markers", name=name, customdata=s,
            marker={"color": s, "colorscale": COLORSCALE, "cmin": s.min(), "cmax": s.max(),  # one scale
                    "size": 9, "symbol": symbols[k % len(symbols)],
                    "showscale": k == 0, "colorbar": {"title": "step"}},
            hovertemplate=f"{name}<br>step %{{customdata}}<br>"
                          "ΔD %{x:.4g}<br>ΔM %{y:.4g}<extra></extra>",
        )
    return styled(fig, title, "ΔD: direction change (1 - cosine)", "ΔM: magnitude change (mean |Δm|)")
