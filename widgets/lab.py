"""The Lab: one dashboard to pick, preview, train live, compare, try and save an adapter.

    from peftlab.widgets import Lab
    lab = Lab()          # defaults: the sentiment task, SmolLM2-135M, LoRA r=8 -> press Train

    ┌ pick ───────────────────────┐ ┌ before training (instant, no weights loaded) ┐
    │ task · model · dataset ·    │ │ trainable parameters, % of the model,        │
    │ method · backend · r · ...  │ │ per layer type; estimated memory             │
    └─────────────────────────────┘ └──────────────────────────────────────────────┘
    [Train] [Stop]   status / error box
    task: the base model's metric and answers (measured first), then base vs adapted answers
    live: loss (raw + EMA) · the task metric every k steps · memory · tokens/s · spectra of ΔW
    after: runs table + chart · try it (base vs adapted) · save adapter · export script

The task picker (``peftlab.list_tasks``) fills the model, method, rank, learning rate, batch,
sequence length and steps with the task's own defaults, chosen from measurements: the default
run (sentiment answered by SmolLM2-135M, LoRA r=8 on q/v, lr 3e-3, 30 steps of 8 rows) takes
the accuracy on the Lab's 48-row held-out slice from the base model's 0.06 to 0.73 in about two
minutes on a 2-core CPU (0.045 to 0.785 on 200 test rows; the sweep is in peftlab.tasks). Before the first step the Lab measures the base
model on the task's small fixed held-out slice (``Task.live_eval_limit`` rows) and shows a few
of its answers; ``peftlab.train(task=..., eval_every=k)`` re-measures the metric every k steps
(plotted live beside the loss); after the run the same held-out prompts are answered by the
adapted model, side by side with the base model's answers, with the metric before -> after.
Pick "none" to train on a dataset without a metric.

How it stays responsive: training runs ``peftlab.train`` in a background thread with a
``threading.Event`` as its stop flag, so the kernel keeps answering widget events (Stop
included). The per-step callback appends the step's numbers; it redraws the figures (each
redraw one ``batch_update`` message per figure) at most every ``redraw_every_s`` seconds and
only while redrawing has taken at most ``draw_budget`` (3%) of the run's time so far, and
recomputes the spectra at a redraw at most every ``spectrum_every`` steps. A redraw costs about
0.1-0.25 s on 2 CPU cores (building the four figures and serialising them), so on short steps
the budget, not the clock, sets the pace, and the dashboard's cost stays a few percent of the
training throughput on any machine. Measured in a kernel on 2 busy cores (one torch thread),
the Lab's callback vs a plain ``peftlab.train`` with the same settings: SmolLM2-135M, LoRA r=8,
4 x 64 tokens (~5 s steps there): 3.8% of the wall time in the callback, +2-4% CPU per step;
tiny-llama (0.25 s steps): 3-4 redraws in 30 steps, 4-5% of the time, +4% CPU per step
(12% and +11% with the 0.5 s clock alone).

Errors a user can cause (rank 0, a rank larger than the layer, targets that match nothing, a
hub id while offline) arrive as ``peftlab.errors.PeftlabError`` and are shown in the message
box, never as a traceback.

The Lab is put together from its parts, one module each: the pick panel and its preview
(``widgets/choices.py``, numbers from ``peftlab.preview``), the training run and the task's
before-and-after (``widgets/training.py``), the live dashboard (``widgets/dashboard.py``), and the
runs table with try it, save and export (``widgets/runs.py``). This module assembles them.
"""

from __future__ import annotations

import html
import importlib.util
import os
from pathlib import Path
from typing import Any

from peftlab.widgets import plan
from peftlab.widgets.choices import TARGET_PRESETS, ChoicePanel, initial_choice
from peftlab.widgets.dashboard import LiveDashboard
from peftlab.widgets.live import message_html, prefer_static
from peftlab.widgets.runs import RunsPanel
from peftlab.widgets.training import TrainingRun


def runs_store_choice(report_to: str | None, runs_store: str | os.PathLike | None) -> tuple[str | None, str]:
    """The Lab's ``report_to`` and a note for the user: "auto" is the local trackio store when
    trackio is installed (pointed at ``runs_store``), else in-memory runs and a note saying so."""
    from peftlab.tracking import parse_report_to, trackio_available, use_store

    if report_to == "auto":
        if not trackio_available():
            return None, ("Runs are kept in memory for this session only: trackio (the local run store) is "
                          "not installed. Try `pip install trackio` so runs survive a kernel restart.")
        report_to = "trackio"
    if "trackio" in parse_report_to(report_to):
        use_store(runs_store)
    return report_to, ""


class Lab(ChoicePanel, TrainingRun, LiveDashboard, RunsPanel):
    """The whole dashboard. Display it as the last expression of a cell (or ``display(lab)``).

    Args:
        task: the task picked first ("sentiment", "topic/classify", ...; None: train on
            ``dataset`` with no metric). Its defaults fill every choice not given here.
        model, dataset, method: initial choices (default: the task's model, else
            ``$PEFTLAB_LAB_MODEL`` or "smollm2-135m"; "chatterbot-qa"; the task's method).
        static: plain figures instead of live FigureWidgets. Default: auto (Colab, Voila: see
            ``peftlab.widgets.live``).
        redraw_every_s: at most one redraw per this many seconds while training.
        draw_budget: the largest fraction of the training time spent redrawing (0.03: 3%).
        spectrum_every: recompute the spectra of ΔW (at a redraw) at most every this many steps.
        runs_dir: where runs are checkpointed when the export-script hook is available
            (default: a temporary folder).
        report_to: peftlab.train's ``report_to``. "auto" (default): the local trackio store when
            trackio is installed, so the runs table lists every kernel session's runs; without
            trackio the Lab says so and keeps this session's runs in memory. None: in memory only.
        runs_store: the store's folder (default ``$PEFTLAB_RUNS_DIR``, else trackio's
            ``$TRACKIO_DIR`` or ``~/.cache/huggingface/trackio``).
        **choices: any other field of :class:`peftlab.widgets.plan.Choice` (r, steps, ...).
    """

    def __init__(self, model: str | None = None, dataset: str = "chatterbot-qa", method: str | None = None,
                 task: str | None = "sentiment", static: bool | None = None, redraw_every_s: float = 0.5, draw_budget: float = 0.03,
                 spectrum_every: int = 5, runs_dir: str | os.PathLike | None = None,
                 report_to: str | None = "auto", runs_store: str | os.PathLike | None = None,
                 **choices: Any) -> None:
        import ipywidgets as W

        self.static = prefer_static() if static is None else bool(static)
        self.redraw_every_s = redraw_every_s
        self.draw_budget = draw_budget
        self.spectrum_every = max(1, int(spectrum_every))
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None
        self.report_to, self.store_note = runs_store_choice(report_to, runs_store)
        self.export_available = importlib.util.find_spec("peftlab.export") is not None
        defaults = initial_choice(model, dataset, method, task, choices)
        self._init_state()
        pick = self.build_pick(defaults)  # the parts, each from its module
        before = self.build_preview()
        self.message = W.HTML()
        buttons = self.build_run_controls(defaults)
        live = self.build_live()
        after = self.build_after()
        self.widget = W.VBox([W.HBox([pick, before]), buttons, self.message, self.task_out, live, after])
        self._size_figures()
        self.show_choice()
        if self.store_note:
            self.show(self.store_note, "warning")

    def _init_state(self) -> None:
        """What the Lab knows, readable from code: the runs, the last model, the task's measurements."""
        self.runs: list[dict] = []  # one row per finished run
        self.model = None  # the last trained model and its tokenizer (try it, save)
        self.tokenizer = None
        self.result = None
        self.estimate: plan.Estimate | None = None
        self.error: str | None = None
        self.base_eval: dict | None = None  # the base model's task metrics (this run's task)
        self.eval_after: dict | None = None
        self.base_answers: list = []  # peftlab.evaluation.Generation of the base model
        self.adapted_answers: list = []

    def _size_figures(self) -> None:
        """Live figures side by side, two to a row (a re-displayed static figure keeps its own size)."""
        for fig in (self.loss_fig, self.metric_fig, self.memory_fig, self.speed_fig, self.spectra_fig,
                    self.runs_fig):
            if not self.static:
                fig.figure.layout.width = 560
                fig.figure.layout.height = fig.figure.layout.height or 340

    # ------------------------------------------------------------------------------------------
    # Display
    # ------------------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The live dashboard where widgets run (JupyterLab, VS Code, Voila, nbviewer with the
        stored widget state); elsewhere (GitHub, a terminal) a summary of the choice instead of
        ``VBox(children=...)``."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        text, rows = self.summary()
        bundle["text/plain"] = text
        bundle["text/html"] = ("<p><b>peftlab Lab</b> (a static view: open this notebook in JupyterLab, VS Code "
                               "or Voila for the live dashboard)</p><table>"
                               + "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                                         f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows)
                               + "</table>")
        return bundle

    def summary(self) -> tuple[str, list[tuple[str, str]]]:
        """The current choice and its preview as text and as (label, value) rows."""
        c, est = self.choice(), self.estimate
        targets = ", ".join(c.targets) if c.targets else "the method's default targets"
        rows = [("task", c.task or "none (a dataset)"), ("model", c.model),
                ("data", c.dataset if not c.task else "the task's training split"),
                ("method", f"{c.method} r={c.r} alpha={c.alpha:g} on {targets} ({c.backend} backend"
                           f"{', NF4 base' if c.quantization else ''})"),
                ("training", f"lr {c.lr:g}, {c.steps} steps of {c.batch_size} rows x {c.max_length} tokens")]
        if est is not None:
            rows.append(("trainable", f"{est.count.trainable:,} of {est.count.total:,} ({est.count.percent:.2f}%)"))
            rows.append(("memory (estimate)", f"{sum(est.memory.values()) / 2**20:,.0f} MiB per training step"))
        text = "peftlab Lab (static view: open in JupyterLab or Voila for the dashboard)\n" + "\n".join(
            f"  {k:<18}{v}" for k, v in rows)
        return text, rows

    def show(self, text: str, kind: str = "info") -> None:
        """Put a message in the Lab's message box (errors: ``kind="error"``)."""
        self.error = text if kind == "error" else None
        self.message.value = message_html(text, kind)


__all__ = ["Lab", "TARGET_PRESETS", "runs_store_choice"]
