"""Figures of training: the loss curve (raw and smoothed), task metrics and any logged metric over steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.plots.style import PALETTE, as_array, styled

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go


def ema(values: Any, smoothing: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider):
    s_t = β s_(t-1) + (1 - β) x_t, shown as s_t / (1 - β^t) so early points are not pulled to 0."""
    if not 0.0 <= smoothing < 1.0:
        from peftlab.errors import ConfigError

        raise ConfigError(f"smoothing={smoothing!r} is out of range. Expected a number in [0, 1), e.g. 0.9.")
    x = as_array(values)
    out = np.empty_like(x)
    s = 0.0
    for t, v in enumerate(x, start=1):
        s = smoothing * s + (1 - smoothing) * v
        out[t - 1] = s / (1 - smoothing**t)
    return out


def loss_curve(
    losses: Sequence[float] | Sequence[Mapping[str, Any]] | Any,
    steps: Sequence[int] | None = None,
    smoothing: float = 0.9,
    eval_losses: Sequence[float] | None = None,
    eval_steps: Sequence[int] | None = None,
    title: str = "Training loss",
) -> go.Figure:
    """Raw training loss (faint) and its bias-corrected EMA (bold), optionally eval loss.

    Args:
        losses: one loss per step, or the training records (dicts with "loss" and "step").
        steps: x values; default 1, 2, ... (or the records' "step").
        smoothing: EMA factor β in [0, 1); 0 shows the raw curve twice.
        eval_losses, eval_steps: evaluation points drawn as markers.
    """
    import plotly.graph_objects as go

    if len(losses) and isinstance(losses[0], Mapping):
        records = [r for r in losses if r.get("loss") is not None]
        steps = [r.get("step", i + 1) for i, r in enumerate(records)] if steps is None else steps
        losses = [r["loss"] for r in records]
    y = as_array(losses)
    x = np.arange(1, len(y) + 1) if steps is None else as_array(steps)
    fig = go.Figure()
    fig.add_scatter(x=x, y=y, mode="lines", name="loss", opacity=0.35,
                    line={"color": PALETTE[0], "width": 1},
                    hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>")
    fig.add_scatter(x=x, y=ema(y, smoothing), mode="lines", name=f"EMA (β={smoothing:g})",
                    line={"color": PALETTE[0], "width": 2.5},
                    hovertemplate="step %{x}<br>smoothed loss %{y:.4f}<extra></extra>")
    if eval_losses is not None:
        ey = as_array(eval_losses)
        ex = np.arange(1, len(ey) + 1) if eval_steps is None else as_array(eval_steps)
        fig.add_scatter(x=ex, y=ey, mode="lines+markers", name="eval loss",
                        line={"color": PALETTE[3], "width": 2}, marker={"size": 7},
                        hovertemplate="step %{x}<br>eval loss %{y:.4f}<extra></extra>")
    return styled(fig, title, "optimizer step", "loss (cross-entropy, nats)")


def task_metric_curve(
    history: Sequence[Mapping[str, Any]],
    metric: str,
    before: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """A task metric over training steps (the records' ``task_<metric>``), from its value
    before training (step 0, ``before``) when given; a dotted line marks that base level."""
    import plotly.graph_objects as go

    points = [(r["step"], r[f"task_{metric}"]) for r in history if r.get(f"task_{metric}") is not None]
    if before is not None:
        points = [(0, before), *points]
    fig = go.Figure()
    fig.add_scatter(x=as_array([p[0] for p in points]), y=as_array([p[1] for p in points]),
                    mode="lines+markers", name=metric, line={"color": PALETTE[1], "width": 2.5},
                    marker={"size": 7}, hovertemplate=f"step %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>")
    if before is not None:
        fig.add_hline(y=before, line={"dash": "dot", "color": "gray"}, annotation_text="base model")
    return styled(fig, title or f"Held-out {metric.replace('_', ' ')}", "optimizer step", metric)


def metric_curve(
    values: Sequence[float] | Any,
    steps: Sequence[int] | None = None,
    name: str = "value",
    y_title: str = "value",
    title: str = "Training metric",
    color: int = 1,
) -> go.Figure:
    """One per-step training metric as a line with markers (memory, tokens/s, learning rate...).

    Args:
        values: one number per step; ``steps``: x values (default 1, 2, ...).
        name, y_title, title: legend entry, y-axis label (with its unit) and title.
        color: index into ``PALETTE``.
    """
    import plotly.graph_objects as go

    y = as_array(values)
    x = np.arange(1, len(y) + 1) if steps is None else as_array(steps)
    fig = go.Figure()
    fig.add_scatter(x=x, y=y, mode="lines+markers", name=name, marker={"size": 4},
                    line={"color": PALETTE[color % len(PALETTE)], "width": 2},
                    hovertemplate=f"step %{{x}}<br>{name} %{{y:,.4g}}<extra></extra>")
    return styled(fig, title, "optimizer step", y_title)
