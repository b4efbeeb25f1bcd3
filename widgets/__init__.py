"""peftlab.widgets: the notebook UI layer (ipywidgets + plotly FigureWidget).

Widgets hold state and callbacks only; every figure comes from a pure function in
``peftlab.plots`` and every computation from the core library.
"""
