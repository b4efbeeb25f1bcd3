"""Showing a figure in a notebook so that every reader sees it: the interactive figure and a PNG."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plotly is optional and imported lazily
    import plotly.graph_objects as go

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
    """The figure as a base64 PNG (kaleido + Chromium), or None where they cannot run here.

    The renderer's own chatter (kaleido's and choreographer's warnings and log lines, which a busy
    machine brings out: a slow browser start, an unhandled devtools message) is kept out of the
    notebook: the PNG is made or it is left out, and a cell's output is the same on any machine."""
    import base64
    import contextlib
    import io
    import logging
    import warnings

    if _NO_PNG:
        return None
    loggers = [logging.getLogger(name) for name in ("kaleido", "choreographer", "logistro")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            image = fig.to_image(format="png", scale=PNG_SCALE, width=fig.layout.width or 800,
                                 height=fig.layout.height or 450)
    except Exception as err:  # no kaleido, no Chromium, or one that cannot start: no static copy
        _NO_PNG.append(f"{type(err).__name__}: {err}")
        return None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return base64.b64encode(image).decode("ascii")


def _plain(fig: go.Figure) -> str:
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else "figure"
    return f"<Figure: {title}>"
