"""The one look every peftlab figure shares: palette, colour scale, template, titles and axes.

The colour-blind-safe Okabe-Ito palette (Okabe & Ito, 2008, https://jfly.uni-koeln.de/color/),
plotly's white template, titles, axis labels with units and hover text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go

# Okabe-Ito: distinguishable with every common colour-vision deficiency
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
COLORSCALE = "Viridis"  # perceptually uniform; used by every heatmap
TEMPLATE = "plotly_white"
MIB = 2**20  # bytes per MiB: memory figures are drawn in MiB


def as_array(x: Any) -> np.ndarray:
    """numpy float array from a list, numpy array or torch tensor (any device or dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def styled(fig: go.Figure, title: str, x_title: str, y_title: str, **layout: Any) -> go.Figure:
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
