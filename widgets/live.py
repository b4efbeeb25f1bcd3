"""Live figures that work in JupyterLab, Voila and Colab, plus the widgets' message box.

A :class:`LiveFigure` shows a figure built by a pure function in ``peftlab.plots`` and is
refreshed by handing it the next figure from the same function:

    live = LiveFigure(plots.loss_curve([]))
    live.update(plots.loss_curve(losses))   # one batched message to the browser

In a kernel with a widget manager it wraps a ``plotly.graph_objects.FigureWidget`` and copies
the new traces into it inside ``batch_update()`` (one comm message per redraw, numpy arrays
sent as binary buffers). The layout goes to the constructor, because Voila drops layout set
with ``update_layout`` before display (see ENVIRONMENT.md). Where FigureWidget cannot render
(Colab, or ``static=True``), it falls back to a plain ``go.Figure`` shown in an ``Output``
widget and re-displayed on each update.
"""

from __future__ import annotations

import html
import sys
from typing import Any


def colab() -> bool:
    """True inside Google Colab, where plotly's FigureWidget is not proven to render."""
    return "google.colab" in sys.modules


def message_html(text: str, kind: str = "info") -> str:
    """A coloured box for a message (``kind``: "info", "ok", "warning", "error"); text escaped."""
    colours = {"info": ("#e8f1fb", "#0072B2"), "ok": ("#e6f5ef", "#009E73"),
               "warning": ("#fdf3e1", "#E69F00"), "error": ("#fbeae5", "#D55E00")}
    bg, border = colours.get(kind, colours["info"])
    return (f'<div class="peftlab-msg peftlab-{kind}" style="background:{bg};border-left:4px solid '
            f'{border};padding:6px 10px;margin:4px 0;white-space:pre-wrap">{html.escape(text)}</div>')


class LiveFigure:
    """A figure that can be redrawn from the background training thread.

    Args:
        figure: the first figure (a ``go.Figure`` from ``peftlab.plots``).
        static: True for a plain re-displayed ``go.Figure`` (Colab), False for a FigureWidget.
    """

    def __init__(self, figure: Any, static: bool = False) -> None:
        import ipywidgets as widgets
        import plotly.graph_objects as go

        self.static = static
        self.updates = 0
        if static:
            self.figure = figure
            self.widget = widgets.Output()
            self._show_static(figure)
        else:
            # layout= in the constructor: Voila keeps it (update_layout before display is lost)
            self.figure = go.FigureWidget(data=figure.data, layout=figure.layout)
            self.widget = self.figure

    def _show_static(self, figure: Any) -> None:
        # Set the Output's outputs directly, not `with output: display(...)`: the context
        # manager captures by the kernel's current message and misroutes output sent from the
        # background training thread. The bundle carries plotly's own mime type (JupyterLab,
        # Voila) and self-contained HTML (Colab, which renders HTML).
        import json

        import plotly.io as pio

        bundle = {
            "application/vnd.plotly.v1+json": json.loads(pio.to_json(figure, validate=False)),
            "text/html": pio.to_html(figure, include_plotlyjs="cdn", full_html=False),
            "text/plain": f"<Figure: {figure.layout.title.text or 'plotly figure'}>",
        }
        self.widget.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def update(self, figure: Any) -> None:
        """Show ``figure`` (same kinds of traces, new data) in place of the current one."""
        self.updates += 1
        if self.static:
            self.figure = figure
            self._show_static(figure)
            return
        live = self.figure
        with live.batch_update():
            for i, trace in enumerate(figure.data):
                props = trace.to_plotly_json()
                props.pop("type", None)
                if i < len(live.data) and live.data[i].type == trace.type:
                    live.data[i].update(props, overwrite=True)
                else:
                    live.add_trace(trace)
            height = figure.layout.height
            if height is not None and height != live.layout.height:
                live.layout.height = height
            if figure.layout.title.text != live.layout.title.text:
                live.layout.title.text = figure.layout.title.text

    def trace_lengths(self) -> list[int]:
        """Points in each trace (x or z), for tests and the browser check."""
        out = []
        for trace in self.figure.data:
            values = trace.y if getattr(trace, "y", None) is not None else getattr(trace, "z", None)
            out.append(0 if values is None else len(values))
        return out


__all__ = ["LiveFigure", "colab", "message_html"]
