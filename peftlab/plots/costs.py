"""Figures of what a method costs: the memory ledger, the parameter budget, quantisation errors, benchmarks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.plots.style import MIB, PALETTE, as_array, styled

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go


def memory_ledger(
    estimated: Mapping[str, float],
    measured: Mapping[str, float] | None = None,
    title: str = "Memory ledger",
) -> go.Figure:
    """Stacked bars of memory by category (weights, gradients, optimizer state, activations, ...),
    the estimate next to the measurement. Inputs are {category: bytes}; shown in MiB."""
    import plotly.graph_objects as go

    columns = {"estimated": dict(estimated)}
    if measured is not None:
        columns["measured"] = dict(measured)
    categories = list(dict.fromkeys([*estimated, *(measured or {})]))
    names = list(columns)
    fig = go.Figure()
    for k, category in enumerate(categories):
        raw = [float(columns[n].get(category, 0.0)) for n in names]
        fig.add_bar(
            x=names, y=[b / MIB for b in raw], name=category, customdata=raw,
            marker_color=PALETTE[k % len(PALETTE)],
            hovertemplate=f"{category}<br>%{{y:,.1f}} MiB (%{{customdata:,.0f}} bytes)<extra>%{{x}}</extra>",
        )
    for n in names:  # the total above each bar
        total = sum(float(v) for v in columns[n].values()) / MIB
        fig.add_annotation(x=n, y=total, text=f"{total:,.1f} MiB", showarrow=False, yshift=12)
    return styled(fig, title, "", "memory (MiB)", barmode="stack")


def parameter_budget(
    data: Mapping[str, Mapping[str, int]] | Sequence[Mapping[str, Any]] | Any,
    log: bool = False,
    title: str = "Trainable-parameter budget",
) -> go.Figure:
    """Where the parameters are, and which of them train.

    Args:
        data: either ``peftlab.count_parameters(model).by_type`` ({layer type: {"trainable",
            "total"}}, a ParameterCount also works): one bar per type, trainable stacked on frozen;
            or a list of rows {"method" (or "name"), "trainable", optional "layer_type"}: one bar
            per method, stacked by layer type (compare methods' budgets).
        log: logarithmic y axis (frozen base weights dwarf adapters by 100-1000x).
    """
    import plotly.graph_objects as go

    data = getattr(data, "by_type", data)
    fig = go.Figure()
    if isinstance(data, Mapping):
        types = list(data)
        trainable = [int(data[t].get("trainable", 0)) for t in types]
        frozen = [int(data[t].get("total", 0)) - tr for t, tr in zip(types, trainable)]
        total = sum(trainable) + sum(frozen)
        for k, (name, values) in enumerate((("trainable", trainable), ("frozen", frozen))):
            share = [100 * v / total if total else 0.0 for v in values]
            fig.add_bar(x=types, y=values, name=name, customdata=share, marker_color=PALETTE[[3, 5][k]],
                        hovertemplate=f"%{{x}}<br>{name}: %{{y:,}} "
                                      "(%{customdata:.3f}% of all)<extra></extra>")
        x_title = "module type"
    else:
        rows = list(data)
        methods = list(dict.fromkeys(r.get("method", r.get("name")) for r in rows))
        groups = list(dict.fromkeys(r.get("layer_type", "trainable") for r in rows))
        for k, group in enumerate(groups):
            y = [sum(int(r["trainable"]) for r in rows
                     if r.get("method", r.get("name")) == m and r.get("layer_type", "trainable") == group)
                 for m in methods]
            fig.add_bar(x=methods, y=y, name=str(group), marker_color=PALETTE[k % len(PALETTE)],
                        hovertemplate=f"%{{x}}<br>{group}: %{{y:,}} trainable<extra></extra>")
        x_title = "method"
    return styled(fig, title, x_title, "parameters (count)", barmode="stack",
                  yaxis_type="log" if log else "linear")


def quantization_errors(
    errors: Mapping[str, Any],
    bins: int = 80,
    title: str = "Quantisation error",
) -> go.Figure:
    """Histograms of the error (dequantised - original) of several formats on shared bins.

    Args:
        errors: {format name: error values}, e.g. {"NF4": ..., "FP4": ..., "int4": ...}; any
            shape, flattened. Binned here with numpy, so millions of errors stay a small figure.
        bins: number of shared bins.
    The legend carries each format's RMSE, the number to compare.
    """
    import plotly.graph_objects as go

    arrays = {name: as_array(e).ravel() for name, e in errors.items()}
    everything = np.concatenate([a for a in arrays.values() if a.size]) if arrays else np.zeros(1)
    lo, hi = float(everything.min()), float(everything.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-12, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for k, (name, a) in enumerate(arrays.items()):
        counts, _ = np.histogram(a, bins=edges)
        share = 100 * counts / max(a.size, 1)
        rmse = float(np.sqrt(np.mean(a**2))) if a.size else float("nan")
        fig.add_scatter(
            x=centers, y=share, mode="lines", line_shape="hvh", name=f"{name} (RMSE {rmse:.3g})",
            line={"color": PALETTE[k % len(PALETTE)], "width": 2}, customdata=counts,
            hovertemplate=f"{name}<br>error %{{x:.3g}}<br>"
                          "%{y:.2f}% of weights (%{customdata:,})<extra></extra>",
        )
    return styled(fig, title, "error (dequantised - original weight)", "share of weights (%)")


def benchmark_bars(rows: Sequence[Mapping[str, Any]], title: str = "Benchmark") -> go.Figure:
    """Step time and peak memory per configuration, side by side.

    Args:
        rows: [{"name": ..., "step_time_s": ..., "peak_mb": ...}, ...]; a missing peak_mb is
            left blank.
    """
    from plotly.subplots import make_subplots

    names = [str(r["name"]) for r in rows]
    times = [float(r["step_time_s"]) for r in rows]
    peaks = [float(r["peak_mb"]) if r.get("peak_mb") is not None else np.nan for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("step time", "peak memory"))
    fig.add_bar(x=names, y=times, name="step time", marker_color=PALETTE[0], row=1, col=1,
                text=[f"{t:.3g} s" for t in times], textposition="outside",
                hovertemplate="%{x}<br>%{y:.3f} s per step<extra></extra>")
    fig.add_bar(x=names, y=peaks, name="peak memory", marker_color=PALETTE[1], row=1, col=2,
                text=["" if np.isnan(p) else f"{p:,.0f} MB" for p in peaks], textposition="outside",
                hovertemplate="%{x}<br>peak %{y:,.0f} MB<extra></extra>")
    styled(fig, title, "", "", showlegend=False)
    fig.update_yaxes(title_text="seconds per step (s)", row=1, col=1)
    fig.update_yaxes(title_text="peak memory (MB)", row=1, col=2)
    return fig


def serving_throughput(rows: Sequence[Mapping[str, Any]], title: str = "Serving many adapters: a mixed batch") -> go.Figure:
    """Tokens per second against the number of distinct adapters in the batch, one line per
    variant and one panel per batch size (``peftlab bench serve``'s rows).

    Args:
        rows: [{"batch": ..., "adapters": ..., "variant": ..., "tokens_per_s": ..., "status": "ok"}, ...];
            rows whose status is not "ok" are left out.
    """
    from plotly.subplots import make_subplots

    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("tokens_per_s") is not None]
    batches = sorted({int(r["batch"]) for r in ok}) or [0]
    fig = make_subplots(rows=1, cols=len(batches), subplot_titles=[f"batch {b}" for b in batches], shared_yaxes=True)
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    for col, batch in enumerate(batches, start=1):
        for i, variant in enumerate(variants):
            points = sorted((int(r["adapters"]), float(r["tokens_per_s"])) for r in ok
                            if r["variant"] == variant and int(r["batch"]) == batch)
            fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                            name=variant, legendgroup=variant, showlegend=col == 1,
                            line=dict(color=PALETTE[i % len(PALETTE)]), row=1, col=col,
                            hovertemplate=f"{variant}<br>%{{x}} adapters<br>%{{y:.1f}} tokens/s<extra></extra>")
        fig.update_xaxes(type="log", title_text="distinct adapters in the batch", row=1, col=col)
    styled(fig, title, "", "")
    fig.update_yaxes(title_text="generated tokens per second", row=1, col=1)
    return fig
