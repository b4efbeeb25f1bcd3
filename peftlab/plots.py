"""Figures: pure functions from plain data to a ``plotly.graph_objects.Figure``.

Every figure in peftlab — in the library, the notebooks and the widgets — comes from a function
here. Each takes plain data (numbers, lists, dicts, numpy arrays or torch tensors), returns a new
Figure and touches nothing else, so it can be tested without a kernel, shown with ``fig.show()``,
or poured into a live ``go.FigureWidget`` by a widget:

    fig = peftlab.plots.loss_curve(result.losses)
    widget = go.FigureWidget(fig)                     # in a dashboard, then on each redraw:
    with widget.batch_update():
        widget.data[0].y = new_losses

All figures share one look (``_style``): the same template, the colour-blind-safe Okabe-Ito
palette (Okabe & Ito, 2008, https://jfly.uni-koeln.de/color/), titles, axis labels with units,
and hover text. plotly is imported inside the functions, so ``import peftlab`` stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go

# Okabe-Ito: distinguishable with every common colour-vision deficiency
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
COLORSCALE = "Viridis"  # perceptually uniform; used by every heatmap
TEMPLATE = "plotly_white"
MIB = 2**20


def _array(x: Any) -> np.ndarray:
    """numpy float array from a list, numpy array or torch tensor (any device or dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _style(fig: go.Figure, title: str, x_title: str, y_title: str, **layout: Any) -> go.Figure:
    """The one look every peftlab figure shares."""
    fig.update_layout(
        template=TEMPLATE,
        colorway=list(PALETTE),
        title={"text": title, "x": 0.02, "xanchor": "left"},
        xaxis_title=x_title,
        yaxis_title=y_title,
        font={"size": 13},
        margin={"l": 70, "r": 30, "t": 60, "b": 60},
        hovermode="closest",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
        **layout,
    )
    return fig


# --------------------------------------------------------------------------------------------
# Showing a figure in a notebook
# --------------------------------------------------------------------------------------------
PNG_SCALE = 1.5  # the static image's pixels per layout pixel: sharp on a laptop screen, ~50-100 kB


def show(fig: go.Figure) -> None:
    """Display ``fig`` in a notebook so that every reader sees it.

    One output carries the interactive figure (plotly's MIME type: JupyterLab, VS Code, Voila) and
    a static PNG of it (GitHub, nbviewer, Colab's stored view, Jupyter Book, and any viewer
    without plotly's extension). In Colab, which renders neither plotly's MIME type nor a stored
    figure's JavaScript, the bundle also gets plotly's HTML. The PNG needs kaleido and a Chromium
    (``make install`` brings both); where they are missing the PNG is left out, with no error.
    """
    import json
    import sys

    import plotly.io as pio
    from IPython.display import display

    figure = json.loads(pio.to_json(fig, validate=False, remove_uids=False))  # as plotly's renderer
    bundle = {"application/vnd.plotly.v1+json": figure, "text/plain": _plain(fig)}
    png = static_png(fig)
    if png is not None:
        bundle["image/png"] = png
    if "google.colab" in sys.modules:
        bundle["text/html"] = fig.to_html(include_plotlyjs="cdn", full_html=False)
    display(bundle, raw=True)


_NO_PNG: list[str] = []  # why this process cannot render PNGs, once found out (not tried again)


def static_png(fig: go.Figure) -> str | None:
    """The figure as a base64 PNG (kaleido + Chromium), or None where they cannot run here."""
    import base64

    if _NO_PNG:
        return None
    try:
        image = fig.to_image(format="png", scale=PNG_SCALE, width=fig.layout.width or 800,
                             height=fig.layout.height or 450)
    except Exception as err:  # no kaleido, no Chromium, or one that cannot start: no static copy
        _NO_PNG.append(f"{type(err).__name__}: {err}")
        return None
    return base64.b64encode(image).decode("ascii")


def _plain(fig: go.Figure) -> str:
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else "figure"
    return f"<Figure: {title}>"


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def ema(values: Any, smoothing: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider):
    s_t = β s_(t-1) + (1 - β) x_t, shown as s_t / (1 - β^t) so early points are not pulled to 0."""
    if not 0.0 <= smoothing < 1.0:
        from peftlab.errors import ConfigError

        raise ConfigError(f"smoothing={smoothing!r} is out of range. Expected a number in [0, 1), e.g. 0.9.")
    x = _array(values)
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
    y = _array(losses)
    x = np.arange(1, len(y) + 1) if steps is None else _array(steps)
    fig = go.Figure()
    fig.add_scatter(x=x, y=y, mode="lines", name="loss", opacity=0.35,
                    line={"color": PALETTE[0], "width": 1},
                    hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>")
    fig.add_scatter(x=x, y=ema(y, smoothing), mode="lines", name=f"EMA (β={smoothing:g})",
                    line={"color": PALETTE[0], "width": 2.5},
                    hovertemplate="step %{x}<br>smoothed loss %{y:.4f}<extra></extra>")
    if eval_losses is not None:
        ey = _array(eval_losses)
        ex = np.arange(1, len(ey) + 1) if eval_steps is None else _array(eval_steps)
        fig.add_scatter(x=ex, y=ey, mode="lines+markers", name="eval loss",
                        line={"color": PALETTE[3], "width": 2}, marker={"size": 7},
                        hovertemplate="step %{x}<br>eval loss %{y:.4f}<extra></extra>")
    return _style(fig, title, "optimizer step", "loss (cross-entropy, nats)")



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
    fig.add_scatter(x=_array([p[0] for p in points]), y=_array([p[1] for p in points]),
                    mode="lines+markers", name=metric, line={"color": PALETTE[1], "width": 2.5},
                    marker={"size": 7}, hovertemplate=f"step %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>")
    if before is not None:
        fig.add_hline(y=before, line={"dash": "dot", "color": "gray"}, annotation_text="base model")
    return _style(fig, title or f"Held-out {metric.replace('_', ' ')}", "optimizer step", metric)


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

    y = _array(values)
    x = np.arange(1, len(y) + 1) if steps is None else _array(steps)
    fig = go.Figure()
    fig.add_scatter(x=x, y=y, mode="lines+markers", name=name, marker={"size": 4},
                    line={"color": PALETTE[color % len(PALETTE)], "width": 2},
                    hovertemplate=f"step %{{x}}<br>{name} %{{y:,.4g}}<extra></extra>")
    return _style(fig, title, "optimizer step", y_title)

# --------------------------------------------------------------------------------------------
# Memory and parameters
# --------------------------------------------------------------------------------------------
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
    return _style(fig, title, "", "memory (MiB)", barmode="stack")


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
    return _style(fig, title, x_title, "parameters (count)", barmode="stack",
                  yaxis_type="log" if log else "linear")


# --------------------------------------------------------------------------------------------
# Spectra of ΔW
# --------------------------------------------------------------------------------------------
def _padded(rows: Sequence[Any]) -> np.ndarray:
    """Stack 1-D arrays of different lengths into a NaN-padded 2-D array."""
    arrays = [_array(r).ravel() for r in rows]
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
    return _style(fig, title, "singular value index i", "layer",
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
    grid = _array(values)
    x = _array(steps)
    fig = go.Figure()
    for i in range(min(top, grid.shape[1])):
        fig.add_scatter(x=x, y=grid[:, i], mode="lines+markers", name=f"σ{i + 1}",
                        line={"color": PALETTE[i % len(PALETTE)]}, marker={"size": 5},
                        hovertemplate=f"step %{{x}}<br>σ{i + 1} = %{{y:.4g}}<extra></extra>")
    title = title or ("Spectrum of ΔW over training" + (f": {layer}" if layer else ""))
    return _style(fig, title, "optimizer step", "singular value σ_i", yaxis_type="log" if log else "linear")


def subspace_similarity_heatmap(
    grid: Any,
    label_a: str = "adapter A",
    label_b: str = "adapter B",
    title: str = "Subspace similarity φ(i, j)",
) -> go.Figure:
    """φ(i, j) from ``peftlab.subspace_similarity`` as a heatmap (LoRA paper, Figure 3): 1 where
    the top-i directions of A contain the top-j of B (or vice versa), 0 where orthogonal."""
    import plotly.graph_objects as go

    z = _array(grid)
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(1, z.shape[1] + 1), y=np.arange(1, z.shape[0] + 1),
        zmin=0.0, zmax=1.0, colorscale=COLORSCALE, colorbar={"title": "φ"},
        hovertemplate="i = %{y}, j = %{x}<br>φ = %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    return _style(fig, title, f"j: top-j singular vectors of {label_b}",
                  f"i: top-i singular vectors of {label_a}")


# --------------------------------------------------------------------------------------------
# Methods: AdaLoRA ranks, DoRA magnitude/direction
# --------------------------------------------------------------------------------------------
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
        first = _array(ranks[layers[0]])
        if first.ndim == 0:  # {layer: rank}: one bar per layer
            y = [float(_array(ranks[k])) for k in layers]
            fig = go.Figure(go.Bar(x=layers, y=y, marker_color=PALETTE[0],
                                   hovertemplate="%{x}<br>rank %{y:.0f}<extra></extra>"))
            return _style(fig, title, "layer", "rank (singular values kept)")
        grid = np.stack([_array(ranks[k]) for k in layers], axis=1)  # (steps, layers)
    else:
        grid = _array(ranks)
        if grid.ndim == 1:
            grid = grid[None, :]
        layers = list(layers) if layers is not None else [f"layer {i}" for i in range(grid.shape[1])]
    y = _array(steps) if steps is not None else np.arange(grid.shape[0])
    fig = go.Figure(go.Heatmap(
        z=grid, x=layers, y=y, colorscale=COLORSCALE, colorbar={"title": "rank"},
        hovertemplate="%{x}<br>step %{y}: rank %{z:.0f}<extra></extra>",
    ))
    return _style(fig, title, "layer", "optimizer step")


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

    m, d, s = _array(magnitude), _array(direction), _array(steps)
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
    return _style(fig, title, "ΔD: direction change (1 - cosine)", "ΔM: magnitude change (mean |Δm|)")


# --------------------------------------------------------------------------------------------
# Quantisation and benchmarks
# --------------------------------------------------------------------------------------------
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

    arrays = {name: _array(e).ravel() for name, e in errors.items()}
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
    return _style(fig, title, "error (dequantised - original weight)", "share of weights (%)")


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
    _style(fig, title, "", "", showlegend=False)
    fig.update_yaxes(title_text="seconds per step (s)", row=1, col=1)
    fig.update_yaxes(title_text="peak memory (MB)", row=1, col=2)
    return fig


# --------------------------------------------------------------------------------------------
# Studies (peftlab study)
# --------------------------------------------------------------------------------------------
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
            x=_array([r["trainable_params"]]), y=_array([mean]), mode="markers+text", name=r["method"],
            text=[r["method"]], textposition="top center",
            marker={"size": 12, "color": PALETTE[i % len(PALETTE)]},
            error_y={"type": "data", "symmetric": False, "array": [float(r[f"test_{metric}_max"]) - mean],
                     "arrayminus": [mean - float(r[f"test_{metric}_min"])]},
            hovertemplate=(f"{r['method']}<br>%{{x:,}} trainable<br>{metric} %{{y:.3f}} "
                           f"(seeds {float(r[f'test_{metric}_min']):.3f}..{float(r[f'test_{metric}_max']):.3f}), "
                           f"lr {float(r['lr']):.0e}<extra></extra>"))
    if base is not None:
        fig.add_hline(y=base, line={"dash": "dot", "color": "gray"}, annotation_text="untrained")
    _style(fig, title or f"Test {metric} against trainable parameters (mean, min..max over seeds)",
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
    return _style(fig, title, "", "", showlegend=False)


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
        fig.add_scatter(x=_array(lrs), y=_array(means), mode="lines+markers", name=method,
                        line={"color": color, "width": 2}, marker={"size": 8},
                        hovertemplate=f"{method}<br>lr %{{x:.0e}}<br>{metric} %{{y:.3f}}<extra></extra>")
        fig.add_scatter(x=_array([c["lr"] for c in mine]), y=_array([c[f"valid_{metric}"] for c in mine]),
                        mode="markers", name=f"{method} seeds", showlegend=False, opacity=0.35,
                        marker={"size": 5, "color": color}, hoverinfo="skip")
    _style(fig, title or f"Validation {metric} against learning rate", "learning rate (log scale)",
           f"validation {metric}")
    fig.update_xaxes(type="log")
    return fig



# --------------------------------------------------------------------------------------------
# Several runs or series in one figure (the lessons' comparisons)
# --------------------------------------------------------------------------------------------
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
        y = _array(values).ravel()
        x = np.arange(1, len(y) + 1) if steps is None else _array(steps)[: len(y)]
        fig.add_scatter(x=x, y=y, mode="lines+markers", name=str(label), marker={"size": 6},
                        line={"color": PALETTE[k % len(PALETTE)], "width": 2},
                        hovertemplate=f"{label}<br>{x_title} %{{x}}<br>%{{y:.4g}}<extra></extra>")
    return _style(fig, title, x_title, y_title, yaxis_type="log" if log_y else "linear")


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
        s = _array(values).ravel()
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
    return _style(fig, title, "", y_title, showlegend=False, yaxis_type="log" if log else "linear")


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
        d, m = _array(d).ravel(), _array(m).ravel()
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
    _style(fig, title, "", "", showlegend=False, width=max(400, 330 * len(fits)))
    fig.update_yaxes(title_text="ΔM (mean |Δ row norm|)", row=1, col=1)
    fig.update_xaxes(title_text="ΔD (1 - cosine)", row=1, col=1)
    return fig


__all__ = [
    "show",
    "static_png",
    "COLORSCALE",
    "PALETTE",
    "bars",
    "benchmark_bars",
    "curves",
    "dora_changes",
    "ema",
    "loss_curve",
    "loss_curves",
    "magnitude_direction",
    "memory_ledger",
    "metric_curve",
    "task_metric_curve",
    "parameter_budget",
    "quantization_errors",
    "rank_allocation",
    "singular_values",
    "spectra_heatmap",
    "spectrum_evolution",
    "study_costs",
    "study_lr_sweep",
    "study_tradeoff",
    "subspace_similarity_heatmap",
]
