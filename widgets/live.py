"""Live figures that work in JupyterLab, Voila and Colab, plus the widgets' message box.

A :class:`LiveFigure` shows a figure built by a pure function in ``peftlab.plots`` and is
refreshed by handing it the next figure from the same function:

    live = LiveFigure(plots.loss_curve([]))
    live.update(plots.loss_curve(losses))   # one batched message to the browser

In a kernel with a widget manager it wraps a ``plotly.graph_objects.FigureWidget`` and copies
the new traces into it inside ``batch_update()`` (one comm message per redraw, numpy arrays
sent as binary buffers). The layout goes to the constructor, because Voila drops layout set
with ``update_layout`` before display. Where a FigureWidget cannot be relied
on (:func:`prefer_static`: Colab and Voila, or ``static=True``), it falls back to a plain
``go.Figure`` shown in an ``Output`` widget and re-displayed on each update; JupyterLab and Voila
draw it with plotly's mime renderer (plotly.js loaded once per page), Colab from its HTML.

Why not FigureWidget in Voila: plotly's FigureWidget is an anywidget whose front-end code (a
5 MB ES module with plotly.js inside) travels and is evaluated once per figure, and anywidget
(0.11) gives each model 2 s to load it, then drops every message to a model that missed it.
Voila builds the page's widget models together when the page loads, and with the Lab's five
figures on 2 busy cores all of them missed it: they drew once and never updated, whether the
updates came from the training thread or the main one. In JupyterLab, which builds each model
as the kernel's message arrives, the same figures met the deadline (reloading the page would
rebuild them together, like Voila: re-run the cell then).
"""

from __future__ import annotations

import html
import os
import sys
from typing import Any


def colab() -> bool:
    """True inside Google Colab, where plotly's FigureWidget is not proven to render."""
    return "google.colab" in sys.modules


def voila() -> bool:
    """True in a kernel that Voila started (Voila puts ``VOILA_*`` variables in its environment)."""
    return "VOILA_BASE_URL" in os.environ or os.environ.get("SERVER_SOFTWARE", "").startswith("voila/")


def prefer_static() -> bool:
    """True where live FigureWidgets cannot be relied on: Colab and Voila (see the module docstring)."""
    return colab() or voila()


def message_html(text: str, kind: str = "info") -> str:
    """A coloured box for a message (``kind``: "info", "ok", "warning", "error"); text escaped."""
    colours = {"info": ("#e8f1fb", "#0072B2"), "ok": ("#e6f5ef", "#009E73"),
               "warning": ("#fdf3e1", "#E69F00"), "error": ("#fbeae5", "#D55E00")}
    bg, border = colours.get(kind, colours["info"])
    return (f'<div class="peftlab-msg peftlab-{kind}" style="background:{bg};border-left:4px solid '
            f'{border};padding:6px 10px;margin:4px 0;white-space:pre-wrap">{html.escape(text)}</div>')


def error_text(exc: BaseException) -> str:
    """What a widget shows for an error: a PeftlabError's own message (it says what was wrong,
    what was expected, what to try); anything else with its type, never a traceback."""
    from peftlab.errors import PeftlabError

    return str(exc) if isinstance(exc, PeftlabError) else f"{type(exc).__name__}: {exc}"


class LiveFigure:
    """A figure that can be redrawn from the background training thread.

    Args:
        figure: the first figure (a ``go.Figure`` from ``peftlab.plots``).
        static: True for a plain re-displayed ``go.Figure`` (Colab, Voila), False for a FigureWidget.
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
        # Voila) and, in Colab only, self-contained HTML (Colab renders HTML; to_html costs ~15x
        # to_json, paid on every redraw).
        import json

        import plotly.io as pio

        bundle = {
            "application/vnd.plotly.v1+json": json.loads(pio.to_json(figure, validate=False)),
            "text/plain": f"<Figure: {figure.layout.title.text or 'plotly figure'}>",
        }
        if colab():
            bundle["text/html"] = pio.to_html(figure, include_plotlyjs="cdn", full_html=False)
        # the old plot is removed before the new one is drawn: keep its height so the page does not jump
        self.widget.layout.min_height = f"{figure.layout.height or 450}px"
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


__all__ = ["LiveFigure", "colab", "message_html", "prefer_static", "voila"]
