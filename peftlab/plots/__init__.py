"""Figures: pure functions from plain data to a ``plotly.graph_objects.Figure``.

Every figure in peftlab — in the library, the notebooks and the widgets — comes from a function
here. Each takes plain data (numbers, lists, dicts, numpy arrays or torch tensors), returns a new
Figure and touches nothing else, so it can be tested without a kernel, shown with ``fig.show()``,
or poured into a live ``go.FigureWidget`` by a widget:

    fig = peftlab.plots.loss_curve(result.losses)
    widget = go.FigureWidget(fig)                     # in a dashboard, then on each redraw:
    with widget.batch_update():
        widget.data[0].y = new_losses

All figures share one look (``style.styled``): the same template, the colour-blind-safe Okabe-Ito
palette (Okabe & Ito, 2008, https://jfly.uni-koeln.de/color/), titles, axis labels with units,
and hover text. plotly is imported inside the functions, so ``import peftlab`` stays light.
"""

from __future__ import annotations

from peftlab.plots.comparisons import bars, curves, loss_curves, magnitude_direction, singular_values
from peftlab.plots.costs import (benchmark_bars, memory_ledger, parameter_budget, quantization_errors,
                                 serving_throughput)
from peftlab.plots.notebook import PNG_SCALE, show, static_png
from peftlab.plots.studies import study_costs, study_learning_forgetting, study_lr_sweep, study_tradeoff
from peftlab.plots.style import COLORSCALE, MIB, PALETTE, TEMPLATE
from peftlab.plots.training import ema, loss_curve, metric_curve, task_metric_curve
from peftlab.plots.updates import (dora_changes, rank_allocation, spectra_heatmap, spectrum_evolution,
                                   subspace_similarity_heatmap)

__all__ = [
    "show",
    "static_png",
    "COLORSCALE",
    "PALETTE",
    "bars",
    "benchmark_bars",
    "serving_throughput",
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
    "study_learning_forgetting",
    "study_lr_sweep",
    "study_tradeoff",
    "subspace_similarity_heatmap",
]
