"""Figures of a method study (``peftlab study``): the trade-off, the costs and the learning-rate sweep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.plots.style import PALETTE, as_array, styled

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go


def study_tradeoff(rows: Sequence[Mapping[str, Any]], metric: str, base: float | None = None,
                   title: str | None = None) -> go.Figure:
    """Test metric (mean over seeds, error bars from the lowest to the highest seed) against
    trainable parameters (log axis), one marker per method; a dotted line marks the untrained
    model.

    Args:
        rows: ``peftlab.study.summarize`` rows: method, trainable_params, test_<metric>(_min/_max).
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, r in enumerate(rows):
        mean = float(r[f"test_{metric}"])
        fig.add_scatter(
            x=as_array([r["trainable_params"]]), y=as_array([mean]), mode="markers+text", name=r["method"],
            text=[r["method"]], textposition="top center",
            marker={"size": 12, "color": PALETTE[i % len(PALETTE)]},
            error_y={"type": "data", "symmetric": False, "array": [float(r[f"test_{metric}_max"]) - mean],
                     "arrayminus": [mean - float(r[f"test_{metric}_min"])]},
            hovertemplate=(f"{r['method']}<br>%{{x:,}} trainable<br>{metric} %{{y:.3f}} "
                           f"(seeds {float(r[f'test_{metric}_min']):.3f}..{float(r[f'test_{metric}_max']):.3f}), "
                           f"lr {float(r['lr']):.0e}<extra></extra>"))
    if base is not None:
        fig.add_hline(y=base, line={"dash": "dot", "color": "gray"}, annotation_text="untrained")
    styled(fig, title or f"Test {metric} against trainable parameters (mean, min..max over seeds)",
           "trainable parameters (log scale)", f"test {metric}", showlegend=False)
    fig.update_xaxes(type="log")
    return fig


def study_costs(rows: Sequence[Mapping[str, Any]], title: str = "What each method costs") -> go.Figure:
    """Forgetting, peak memory and step time per method (``summarize`` rows), side by side."""
    from plotly.subplots import make_subplots

    names = [str(r["method"]) for r in rows]
    panels = (("forgetting", "forgetting", "{:.3g}"), ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"),
              ("step_time_s", "step time (s)", "{:.3f}"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[1] for p in panels])
    for col, (key, label, fmt) in enumerate(panels, 1):
        values = [float(r[key]) for r in rows]
        fig.add_bar(x=names, y=values, name=label, marker_color=PALETTE[col - 1], row=1, col=col,
                    text=[fmt.format(v) for v in values], textposition="outside",
                    hovertemplate=f"%{{x}}<br>{label} %{{y:.4g}}<extra></extra>")
    return styled(fig, title, "", "", showlegend=False)


def study_lr_sweep(cells: Sequence[Mapping[str, Any]], metric: str,
                   title: str | None = None) -> go.Figure:
    """Validation metric against learning rate (log axis), one line per method (mean over seeds),
    each seed a faint dot: where each method's best rate lies and how flat its optimum is."""
    import plotly.graph_objects as go

    fig = go.Figure()
    methods = list(dict.fromkeys(c["method"] for c in cells if c.get("status") == "ok"))
    for i, method in enumerate(methods):
        mine = [c for c in cells if c["method"] == method and c.get("status") == "ok"]
        lrs = sorted({float(c["lr"]) for c in mine})
        means = [float(np.mean([c[f"valid_{metric}"] for c in mine if float(c["lr"]) == lr])) for lr in lrs]
        color = PALETTE[i % len(PALETTE)]
        fig.add_scatter(x=as_array(lrs), y=as_array(means), mode="lines+markers", name=method,
                        line={"color": color, "width": 2}, marker={"size": 8},
                        hovertemplate=f"{method}<br>lr %{{x:.0e}}<br>{metric} %{{y:.3f}}<extra></extra>")
        fig.add_scatter(x=as_array([c["lr"] for c in mine]), y=as_array([c[f"valid_{metric}"] for c in mine]),
                        mode="markers", name=f"{method} seeds", showlegend=False, opacity=0.35,
                        marker={"size": 5, "color": color}, hoverinfo="skip")
    styled(fig, title or f"Validation {metric} against learning rate", "learning rate (log scale)",
           f"validation {metric}")
    fig.update_xaxes(type="log")
    return fig


def study_learning_forgetting(cells: Sequence[Mapping[str, Any]], metric: str, base: float | None = None,
                              labels: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Forgetting against the test metric, one line per method through its learning rates (mean over
    seeds, each point labelled with its rate): Biderman et al. 2024's learning-forgetting plane.
    Better is lower forgetting and, for perplexity, lower metric (bottom left); ``base`` marks the
    untrained model's metric, ``labels`` renames methods."""
    import plotly.graph_objects as go

    fig = go.Figure()
    methods = list(dict.fromkeys(c["method"] for c in cells if c.get("status") == "ok"))
    for i, method in enumerate(methods):
        mine = [c for c in cells if c["method"] == method and c.get("status") == "ok"]
        lrs = sorted({float(c["lr"]) for c in mine})
        at = [[c for c in mine if float(c["lr"]) == lr] for lr in lrs]
        x = [float(np.mean([c[f"test_{metric}"] for c in group])) for group in at]
        y = [float(np.mean([c["forgetting"] for c in group])) for group in at]
        name = (labels or {}).get(method, method)
        fig.add_scatter(x=as_array(x), y=as_array(y), mode="lines+markers+text", name=name,
                        text=[f"{lr:.2g}" for lr in lrs], textposition="top center",
                        line={"color": PALETTE[i % len(PALETTE)], "width": 2}, marker={"size": 9},
                        hovertemplate=f"{name}<br>lr %{{text}}<br>test {metric} %{{x:.3f}}<br>"
                                      "forgetting %{y:.4f}<extra></extra>")
    if base is not None:
        fig.add_vline(x=base, line={"dash": "dot", "color": "gray"}, annotation_text="untrained")
    fig.add_hline(y=0.0, line={"dash": "dot", "color": "gray"})
    return styled(fig, title or f"Forgetting against test {metric}, one line per method through its learning rates",
                  f"test {metric}", "forgetting")
