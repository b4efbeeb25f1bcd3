"""peftlab.widgets: the notebook UI layer (ipywidgets + plotly FigureWidget).

    from peftlab.widgets import Lab
    Lab()                      # the whole dashboard: pick, preview, train live, compare, try, save

    from peftlab.widgets import RankExplorer, SpectrumViewer, QuantErrorExplorer
    RankExplorer(d_in=576, d_out=576)        # drag r: shapes of W + B A and the parameter count
    SpectrumViewer(model)                    # singular values of ΔW per layer
    QuantErrorExplorer()                     # NF4 / FP4 / int4 rounding errors, by block size

    from peftlab.widgets import AdapterChat
    AdapterChat(model, tokenizer)            # one prompt, every adapter answers in one mixed batch

Widgets hold state and callbacks only; every figure comes from a pure function in
``peftlab.plots`` and every computation from the core library. ipywidgets and plotly are
imported when a widget is built, so ``import peftlab.widgets`` costs nothing.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "Lab": "peftlab.widgets.lab",
    "RankExplorer": "peftlab.widgets.explorers",
    "SpectrumViewer": "peftlab.widgets.explorers",
    "QuantErrorExplorer": "peftlab.widgets.explorers",
    "LiveFigure": "peftlab.widgets.live",
    "AdapterChat": "peftlab.widgets.serve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peftlab.widgets' has no attribute {name!r}")
