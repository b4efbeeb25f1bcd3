"""The Lab's live dashboard: five figures redrawn from the training thread, at a bounded cost.

    live: loss (raw + EMA) · the task metric every k steps · memory · tokens/s · spectra of ΔW

Every figure is a pure function of the Lab's state drawn by ``peftlab.plots`` and shown in a
:class:`~peftlab.widgets.live.LiveFigure`. The training callback (:meth:`LiveDashboard.on_step`)
appends each step's record and redraws at most every ``redraw_every_s`` seconds, and only while
redrawing has taken at most ``draw_budget`` of the run's time so far; the spectra of ΔW are
recomputed at a redraw at most every ``spectrum_every`` steps (the measurements behind these
bounds are in ``peftlab.widgets.lab``'s docstring).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from peftlab.widgets.live import LiveFigure


def on_cuda(model: Any) -> bool:
    """True when the model's first parameter is on a CUDA device (memory is then VRAM, not RSS)."""
    try:
        return next(model.parameters()).device.type == "cuda"
    except StopIteration:
        return False


class LiveDashboard:
    """The live figures and their throttled redraws (a part of the Lab).

    Expects of the Lab: ``static``, ``redraw_every_s``, ``draw_budget``, ``spectrum_every``,
    ``history`` (the run's records), ``spectra``, ``progress``, ``model``, ``result``, ``task``
    and ``base_eval`` (the task's level before training).
    """

    def build_live(self) -> Any:
        """The live figures, each drawn from the (empty) state; returns their grid."""
        import ipywidgets as W

        self.reset_live()
        self.loss_fig = LiveFigure(self._loss_figure(), self.static)
        self.metric_fig = LiveFigure(self._metric_figure(), self.static)
        self.memory_fig = LiveFigure(self._memory_figure(), self.static)
        self.speed_fig = LiveFigure(self._speed_figure(), self.static)
        self.spectra_fig = LiveFigure(self._spectra_figure(), self.static)
        return W.VBox([
            W.HBox([self.loss_fig.widget, self.metric_fig.widget]),
            W.HBox([self.spectra_fig.widget, self.memory_fig.widget]),
            W.HBox([self.speed_fig.widget]),
        ])

    def reset_live(self) -> None:
        """Forget the last run's records and spectra and restart the redraw throttle."""
        self.history, self.spectra = [], {}
        # the throttle: when the last redraw ended, seconds spent redrawing in this run, the
        # run's start, the step of the last spectra
        self._last_draw, self._drawing_s, self._spectra_step = -math.inf, 0.0, 0
        self.start_clock()

    def start_clock(self) -> None:
        """The run starts now: the drawing budget is a fraction of the time from here."""
        self._started = time.perf_counter()

    def on_step(self, record: Mapping[str, Any], model: Any) -> None:
        """The training callback: keep the record, redraw now and then (throttled, see above).

        The first step always redraws; the run's end redraws once more (``draw(final=True)``).
        """
        self.history.append(dict(record))
        self._show_progress()  # two small messages: every step
        now = time.perf_counter()
        if (now - self._last_draw < self.redraw_every_s
                or self._drawing_s > self.draw_budget * (now - self._started)):
            return
        step = int(record["step"])
        if self.spectra is not None and (not self.spectra or step - self._spectra_step >= self.spectrum_every):
            self._spectra_step = step
            self._capture_spectra(model)
        self.draw()
        self._last_draw = time.perf_counter()
        self._drawing_s += self._last_draw - now

    def draw(self, final: bool = False) -> None:
        """Redraw every live figure; ``final``: the run ended, so the spectra are taken once more."""
        if final and self.result is not None and self.spectra is not None:
            self._capture_spectra(self.result.model)
        self._show_progress()
        self.loss_fig.update(self._loss_figure())
        self.metric_fig.update(self._metric_figure())
        self.memory_fig.update(self._memory_figure())
        self.speed_fig.update(self._speed_figure())
        if self.spectra:
            self.spectra_fig.update(self._spectra_figure())

    def draw_metric(self) -> None:
        """Redraw the task-metric figure alone (the base model's level has just been measured)."""
        self.metric_fig.update(self._metric_figure())

    def _capture_spectra(self, model: Any) -> None:
        import peftlab

        try:
            self.spectra = {k: v for k, v in peftlab.spectrum(model).items()}
        except Exception:  # noqa: BLE001 (prompt methods have no ΔW: no heatmap for this run)
            self.spectra = None

    def _show_progress(self) -> None:
        if self.history:
            self.progress.value = min(self.history[-1]["step"], self.progress.max)
            self.progress.description = f"step {self.history[-1]['step']}"

    # the figures: pure functions of the state, all from peftlab.plots
    def _loss_figure(self):
        from peftlab import plots

        return plots.loss_curve([r["loss"] for r in self.history], [r["step"] for r in self.history])

    def _metric_figure(self):
        from peftlab import plots

        task = self.task
        if task is None:
            return plots.task_metric_curve([], "metric", title="Task metric (pick a task to measure one)")
        before = self.base_eval.get(task.metric) if self.base_eval else None
        return plots.task_metric_curve(self.history, task.metric, before=before,
                                       title=f"Held-out {task.metric} ({task.name}, {task.live_eval_limit} rows)")

    def _memory_figure(self):
        from peftlab import plots

        unit = "VRAM" if self.model is not None and on_cuda(self.model) else "RSS"
        return plots.metric_curve([r["memory_mb"] for r in self.history], [r["step"] for r in self.history],
                                  name=f"peak {unit}", y_title=f"peak {unit} per step (MB)",
                                  title=f"Memory ({unit})", color=1)

    def _speed_figure(self):
        from peftlab import plots

        return plots.metric_curve([r["tokens_per_s"] for r in self.history], [r["step"] for r in self.history],
                                  name="tokens/s", y_title="tokens per second", title="Throughput", color=2)

    def _spectra_figure(self):
        from peftlab import plots

        spectra = self.spectra or {"(no adapter yet)": [1.0]}
        step = self.history[-1]["step"] if self.history else 0
        return plots.spectra_heatmap(spectra, title=f"Singular values of ΔW per layer (step {step})")


__all__ = ["LiveDashboard", "on_cuda"]
