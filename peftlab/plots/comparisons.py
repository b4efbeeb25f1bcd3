"""Several runs or series in one figure: the lessons' comparisons of methods, ranks and runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.plots.style import PALETTE, as_array, styled

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go


def curves(
    series: Mapping[str, Any],
    steps: Sequence[float] | None = None,
    x_title: str = "step",
    y_title: str = "value",
    title: str = "",
    log_y: bool = False,
) -> go.Figure:
    """One line with markers per named series, on shared axes.

    Args:
        series: {label: values}; series may differ in length.
        steps: shared x values; default 1, 2, ... for each series.
        x_title, y_title, title: axis labels (with units) and title; ``log_y``: log10 y axis.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for k, (label, values) in enumerate(series.items()):
        y = as_array(values).ravel()
        x = np.arange(1, len(y) + 1) if steps is None else as_array(steps)[: len(y)]
        fig.add_scatter(x=x, y=y, mode="lines+markers", name=str(label), marker={"size": 6},
                        line={"color": PALETTE[k % len(PALETTE)], "width": 2},
                        hovertemplate=f"{label}<br>{x_title} %{{x}}<br>%{{y:.4g}}<extra></extra>")
    return styled(fig, title, x_title, y_title, yaxis_type="log" if log_y else "linear")


def loss_curves(runs: Mapping[str, Any], title: str = "Training loss of each run") -> go.Figure:
    """The raw training loss of several runs, one line each: {label: one loss per step}."""
    return curves(runs, x_title="optimizer step", y_title="loss (cross-entropy, nats)", title=title)


def singular_values(
    spectra: Mapping[str, Any],
    log: bool = True,
    title: str = "Singular values of ΔW",
) -> go.Figure:
    """σ_1 ≥ σ_2 ≥ ... of several updates, one line each, on a log axis: how many directions each
    uses. ``spectra``: {label: 1-D singular values} (zeros are dropped on the log axis)."""
    series = {}
    for label, values in spectra.items():
        s = as_array(values).ravel()
        series[label] = np.where(s > 0, s, np.nan) if log else s
    return curves(series, x_title="singular value index i", y_title="σ_i", title=title, log_y=log)


def bars(
    values: Mapping[str, float],
    y_title: str = "value",
    title: str = "",
    log: bool = False,
    fmt: str = "{:.3g}",
) -> go.Figure:
    """One labelled bar per entry of {name: number}, each with its value printed above it."""
    import plotly.graph_objects as go

    names = [str(k) for k in values]
    y = [float(v) for v in values.values()]
    fig = go.Figure(go.Bar(x=names, y=y, marker_color=[PALETTE[k % len(PALETTE)] for k in range(len(y))],
                           text=[fmt.format(v) for v in y], textposition="outside",
                           hovertemplate=f"%{{x}}<br>{y_title} %{{y:.4g}}<extra></extra>"))
    return styled(fig, title, "", y_title, showlegend=False, yaxis_type="log" if log else "linear")


def magnitude_direction(
    changes: Mapping[str, tuple[Any, Any]],
    title: str = "Magnitude vs direction change, per method",
) -> go.Figure:
    """DoRA's figure 2 with one panel per method: ΔD (x) against ΔM (y), one dot per layer and
    checkpoint, and the least-squares line through them; each panel's title gives its slope.

    Args:
        changes: {method: (ΔD values, ΔM values)}, flat arrays of the same length.
    Liu et al. 2024 (https://arxiv.org/abs/2402.09353): full fine-tuning and DoRA show a negative
    slope, LoRA a positive one. Methods move by very different amounts, so each panel has its own axes.
    """
    from plotly.subplots import make_subplots

    fits = {}
    for method, (d, m) in changes.items():
        d, m = as_array(d).ravel(), as_array(m).ravel()
        slope = float(np.polyfit(d, m, 1)[0]) if len(d) > 1 and np.ptp(d) > 0 else float("nan")
        fits[method] = d, m, slope
    fig = make_subplots(rows=1, cols=max(len(fits), 1),
                        subplot_titles=[f"{k}: slope {v[2]:+.3g}" for k, v in fits.items()])
    for col, (method, (d, m, slope)) in enumerate(fits.items(), 1):
        color = PALETTE[(col - 1) % len(PALETTE)]
        fig.add_scatter(x=d, y=m, mode="markers", name=method, marker={"size": 6, "color": color, "opacity": 0.6},
                        hovertemplate=f"{method}<br>ΔD %{{x:.3g}}<br>ΔM %{{y:.3g}}<extra></extra>", row=1, col=col)
        if not np.isnan(slope):
            xs = np.array([d.min(), d.max()])
            fig.add_scatter(x=xs, y=np.polyval(np.polyfit(d, m, 1), xs), mode="lines", showlegend=False,
                            line={"color": color, "dash": "dash"}, hoverinfo="skip", row=1, col=col)
        fig.update_xaxes(title_text="ΔD (1 - cosine)", exponentformat="e", row=1, col=col)
        fig.update_yaxes(exponentformat="e", row=1, col=col)
    styled(fig, title, "", "", showlegend=False, width=max(400, 330 * len(fits)))
    fig.update_yaxes(title_text="ΔM (mean |Δ row norm|)", row=1, col=1)
    fig.update_xaxes(title_text="ΔD (1 - cosine)", row=1, col=1)
    return fig
