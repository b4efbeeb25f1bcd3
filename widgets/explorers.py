"""Small widgets usable on their own: rank explorer, spectrum viewer, quantisation-error explorer.

    RankExplorer(d_in=576, d_out=576)     # drag r: W (d_out x d_in) + B (d_out x r) A (r x d_in)
    SpectrumViewer(model)                 # σ_i of ΔW per layer, from peftlab.spectrum
    QuantErrorExplorer(weight)            # NF4 vs FP4 vs int4 errors (peftlab.quant.nf4)

Each holds its controls and one figure from ``peftlab.plots``; ``.widget`` is what is displayed.

References:
    LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685 (Section 4: W0 + BA, r << min(d, k))
    QLoRA / NF4: Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 (Section 3)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftlab.widgets.live import LiveFigure, message_html, prefer_static


class Shown:
    """Displays as its ``.widget`` (the explorers, the adapter chat)."""

    widget: Any

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


class RankExplorer(Shown):
    """Drag the rank r of a LoRA update of one (d_in -> d_out) layer and see what it costs.

    The update B A has r (d_in + d_out) parameters against d_in d_out for the full ΔW; it can
    reach rank at most r, so r above min(d_in, d_out) buys nothing.
    """

    def __init__(self, d_in: int = 576, d_out: int = 576, r: int = 8, static: bool | None = None) -> None:
        import ipywidgets as W

        self.d_in, self.d_out = int(d_in), int(d_out)
        self.r_w = W.IntSlider(value=r, min=1, max=min(self.d_in, self.d_out), description="rank r",
                               continuous_update=True)
        self.shapes = W.HTML()
        self.fig = LiveFigure(self._figure(r), prefer_static() if static is None else static)
        self.r_w.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([self.r_w, self.shapes, self.fig.widget])
        self.update()

    def parameters(self, r: int | None = None) -> int:
        r = self.r_w.value if r is None else r
        return r * (self.d_in + self.d_out)

    def _figure(self, r: int):
        from peftlab import plots

        rows = [{"method": "full ΔW", "trainable": self.d_in * self.d_out},
                {"method": f"LoRA r={r}", "trainable": self.parameters(r)}]
        return plots.parameter_budget(rows, log=True, title="Parameters of one layer's update")

    def update(self) -> None:
        r, d_in, d_out = self.r_w.value, self.d_in, self.d_out
        full = d_in * d_out
        self.shapes.value = (
            f"<pre>W ({d_out} x {d_in}, frozen)  +  B ({d_out} x {r}) · A ({r} x {d_in})\n"
            f"trainable: r (d_in + d_out) = {r} x ({d_in} + {d_out}) = {self.parameters():,}"
            f"  vs  {full:,} for a full ΔW  ({100 * self.parameters() / full:.2f}%)</pre>")
        self.fig.update(self._figure(r))


class SpectrumViewer(Shown):
    """Singular values of ΔW per adapted layer: a heatmap, and one layer's values over training.

    Args:
        source: an adapted model (read with ``peftlab.spectrum``), a ``{layer: values}`` dict, or a
            ``peftlab.spectra.SpectrumHistory`` (its last capture; the layer picker then also shows
            that layer's σ_i over training).
    """

    def __init__(self, source: Any, max_index: int | None = None, static: bool | None = None) -> None:
        import ipywidgets as W

        from peftlab.errors import PeftlabError

        self.history = source if hasattr(source, "as_arrays") else None
        self.message = W.HTML()
        try:
            self.spectra = self._spectra(source)
        except PeftlabError as exc:
            self.spectra = {}
            self.message.value = message_html(str(exc), "error")
        static = prefer_static() if static is None else static
        width = max((len(v) for v in self.spectra.values()), default=1)
        self.top_w = W.IntSlider(value=min(max_index or width, width), min=1, max=max(width, 1),
                                 description="show σ 1..")
        self.log_w = W.Checkbox(value=True, description="log colour scale")
        self.layer_w = W.Dropdown(options=list(self.spectra), description="layer")
        self.heatmap = LiveFigure(self._heatmap(), static)
        parts = [W.HBox([self.top_w, self.log_w]), self.message, self.heatmap.widget]
        self.evolution = None
        if self.history is not None and len(self.history):
            self.evolution = LiveFigure(self._evolution(), static)
            parts += [self.layer_w, self.evolution.widget]
            self.layer_w.observe(lambda _c: self.evolution.update(self._evolution()), names="value")
        for control in (self.top_w, self.log_w):
            control.observe(lambda _c: self.heatmap.update(self._heatmap()), names="value")
        self.widget = W.VBox(parts)

    @staticmethod
    def _spectra(source: Any) -> dict[str, Any]:
        import peftlab

        if hasattr(source, "as_arrays"):
            return dict(source.history[source.steps[-1]]) if len(source) else {}
        if isinstance(source, Mapping):
            return dict(source)
        return peftlab.spectrum(source)

    def _heatmap(self):
        from peftlab import plots

        return plots.spectra_heatmap(self.spectra or {"(none)": [0.0]}, max_index=self.top_w.value,
                                     log=self.log_w.value)

    def _evolution(self):
        from peftlab import plots

        steps, values = self.history.as_arrays()
        return plots.spectrum_evolution(steps, values, layer=self.layer_w.value)


class QuantErrorExplorer(Shown):
    """Quantise a weight matrix to 4 bits three ways and compare the rounding errors.

    Args:
        weight: a 2-D tensor (e.g. ``model.model.layers[0].self_attn.q_proj.weight``); default a
            seeded 256 x 256 Gaussian matrix, the distribution NF4 is built for.
    """

    KINDS = ("nf4", "fp4", "int4")

    def __init__(self, weight: Any = None, static: bool | None = None) -> None:
        import ipywidgets as W
        import torch

        if weight is None:
            weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
        self.weight = weight.detach().float().cpu()
        self.kinds_w = W.SelectMultiple(options=self.KINDS, value=self.KINDS, description="formats", rows=3)
        self.block_w = W.Dropdown(options=[32, 64, 128, 256], value=64, description="block size")
        self.double_w = W.Checkbox(value=False, description="double quantisation")
        self.table = W.HTML()
        self.errors: dict[str, Any] = {}
        self.fig = LiveFigure(self._figure(), prefer_static() if static is None else static)
        for control in (self.kinds_w, self.block_w, self.double_w):
            control.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.kinds_w, W.VBox([self.block_w, self.double_w])]),
                              self.table, self.fig.widget])
        self.update()

    def _figure(self):
        from peftlab import plots

        from peftlab.quant.nf4 import quantization_error

        self.errors = {k.upper(): quantization_error(self.weight, k, int(self.block_w.value),
                                                     bool(self.double_w.value))
                       for k in self.kinds_w.value}
        return plots.quantization_errors({k: e.errors for k, e in self.errors.items()} or {"(none)": [0.0]},
                                         title=f"4-bit rounding error, block size {self.block_w.value}")

    def update(self) -> None:
        fig = self._figure()
        rows = "".join(f"<tr><td>{k}</td><td>{e.rmse:.3g}</td><td>{e.max_abs:.3g}</td>"
                       f"<td>{100 * e.relative:.2f}%</td></tr>" for k, e in self.errors.items())
        self.table.value = ("<table><tr><th>format</th><th>RMSE</th><th>max |error|</th>"
                            f"<th>relative ‖ŵ − w‖/‖w‖</th></tr>{rows}</table>")
        self.fig.update(fig)


__all__ = ["RankExplorer", "SpectrumViewer", "QuantErrorExplorer"]
