"""The Lab's pick panel: the controls, the :class:`~peftlab.preview.Choice` they make, the preview.

    ┌ pick ───────────────────────┐ ┌ before training (instant, no weights loaded) ┐
    │ task · model · dataset ·    │ │ trainable parameters, % of the model,        │
    │ method · backend · r · ...  │ │ per layer type; estimated memory             │
    └─────────────────────────────┘ └──────────────────────────────────────────────┘

:class:`ChoicePanel` is the part of :class:`peftlab.widgets.Lab` that owns these controls: it
builds them, reads them back as one frozen ``Choice`` (:meth:`ChoicePanel.choice`), fills them
with a task's defaults when a task is picked, lists the model's linear layers in the module picker
and redraws the preview on every change. The numbers come from ``peftlab.preview`` (through
``peftlab.widgets.plan``); this module holds the controls' state and callbacks only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from peftlab.widgets import plan
from peftlab.widgets.live import error_text, message_html

TARGET_PRESETS = {
    "attention": "attention",
    "all-linear": "all-linear",
    "method default": None,
    "custom (pick below)": "custom",
}
_ATTENTION_WORDS = ("attn", "attention")
LABEL_STYLE = {"description_width": "110px"}  # the label column of every control of the Lab
_INFO_BOX = "<div style='margin-left:114px;max-width:420px'>"  # a note under a control, aligned with it


def task_of(name: str | None):
    """The task a Lab argument names: "sentiment" (its first framing) or "topic/classify"."""
    if not name or name == "none":
        return None
    from peftlab.tasks import load_task

    task_name, _, framing = name.partition("/")
    return load_task(task_name, framing or None)


def task_key(task) -> str | None:
    """The task picker's value for ``task``: "name/framing" (None for no task)."""
    return None if task is None else f"{task.name}/{task.framing}"


def initial_choice(model: str | None, dataset: str, method: str | None, task: str | None,
                   choices: Mapping[str, Any]) -> plan.Choice:
    """The Lab's first choice: the arguments given, then the task's own defaults, then the house's.

    A task (``task_of(task)``) fills r, alpha, lr, steps, batch, length, targets, the model and
    the method wherever the caller gave none; without a task the model is ``$PEFTLAB_LAB_MODEL``
    or "smollm2-135m" and the method LoRA.
    """
    task_obj = task_of(task)
    if task_obj is not None:
        d = task_obj.defaults
        given = {"r": d.r, "alpha": d.alpha, "lr": d.lr, "steps": d.steps, "batch_size": d.batch_size,
                 "max_length": d.max_length, "targets": d.targets}
        choices = {**given, **choices}
        model = model or task_obj.model
        method = method or d.method
    model = model or os.environ.get("PEFTLAB_LAB_MODEL") or "smollm2-135m"
    return plan.Choice(model=model, dataset=dataset, method=method or "lora", task=task_key(task_obj),
                       **choices)


class ChoicePanel:
    """The pick controls and the instant preview of what they cost (a part of the Lab).

    Expects of the Lab: ``progress`` (its maximum follows the steps) and the ``estimate``
    attribute, which :meth:`update_preview` sets (None while the choice is invalid).
    """

    # ------------------------------------------------------------------------------------------
    # Building the controls
    # ------------------------------------------------------------------------------------------
    def build_pick(self, defaults: plan.Choice) -> Any:
        """Every control, set to ``defaults`` and observed; returns the "Pick" column."""
        import ipywidgets as W

        self._updating = False  # True while the code itself changes controls
        self._build_source_controls(defaults)
        self._build_method_controls(defaults)
        self._build_training_controls(defaults)
        controls = self.controls()
        for control in controls:
            control.observe(self._on_change, names="value")
        self.task_w.observe(self._on_task, names="value")
        return W.VBox([W.HTML("<b>Pick</b>"), self.task_w, self.task_info, *controls[:4], self.method_info,
                       *controls[4:]])

    def build_preview(self) -> Any:
        """The "Before training" column: the preview box (filled by :meth:`update_preview`)."""
        import ipywidgets as W

        self.preview = W.HTML()
        return W.VBox([W.HTML("<b>Before training</b> (instant: meta-device model, no weights)"),
                       self.preview], layout=W.Layout(width="480px"))

    def controls(self) -> list[Any]:
        """The controls a change of which redraws the preview, in the pick column's order."""
        return [self.model_w, self.hub_w, self.dataset_w, self.method_w, self.backend_w, self.r_w,
                self.alpha_w, self.dropout_w, self.targets_w, self.modules_w, self.quant_w, self.lr_w,
                self.steps_w, self.batch_w, self.length_w]

    def _build_source_controls(self, defaults: plan.Choice) -> None:
        """What is trained on: the task, the model (bundled, or a hub id / folder), the dataset."""
        import ipywidgets as W

        import peftlab

        wide = W.Layout(width="420px")
        model_rows = {m.name: m for m in peftlab.list_models()}
        self._tasks = {task_key(t): t for t in peftlab.list_tasks() if t.name != "forgetting"}
        self.task_w = W.Dropdown(
            options=[("none: train on the dataset below, no metric", "none")]
            + [(f"{t.name} ({t.framing}) — {t.metric}, {t.model}", key) for key, t in self._tasks.items()],
            value=defaults.task or "none", description="task", style=LABEL_STYLE, layout=wide)
        self.task_info = W.HTML()
        self.model_w = W.Dropdown(
            options=[(f"{m.name} — {m.params / 1e6:.1f}M params, {m.task}"
                      + (f", {m.size_mb:.0f} MB" if m.size_mb else ""), m.name)
                     for m in model_rows.values()],
            value=defaults.model if defaults.model in model_rows else "smollm2-135m",
            description="model", style=LABEL_STYLE, layout=wide)
        self.hub_w = W.Text(value="" if defaults.model in model_rows else defaults.model,
                            placeholder="or a hub id / local folder (overrides the list)",
                            description="hub id / folder", style=LABEL_STYLE, layout=wide,
                            continuous_update=False)
        self.dataset_w = W.Dropdown(
            options=[(f"{d.name} — {d.task}, {d.rows:,} rows", d.name) for d in peftlab.list_datasets()],
            value=defaults.dataset, description="dataset", style=LABEL_STYLE, layout=wide)

    def _build_method_controls(self, defaults: plan.Choice) -> None:
        """How it is adapted: method, backend, rank, alpha, dropout, targets, quantisation."""
        import ipywidgets as W

        import peftlab

        methods = sorted(peftlab.list_methods(), key=lambda m: (m["family"], m["name"]))
        self._methods = {m["name"]: m for m in methods}
        # ipywidgets has no option groups: the family leads each label and orders the list
        self.method_w = W.Dropdown(
            options=[(f"{m['family']} · {m['name']}", m["name"]) for m in methods],
            value=defaults.method, description="method", style=LABEL_STYLE, layout=W.Layout(width="420px"))
        self.method_info = W.HTML()
        self.backend_w = W.Dropdown(options=["reference", "peft", "fused"], value=defaults.backend,
                                    description="backend", style=LABEL_STYLE)
        self.r_w = W.BoundedIntText(value=defaults.r, min=0, max=4096, description="rank r", style=LABEL_STYLE)
        self.alpha_w = W.BoundedFloatText(value=defaults.alpha, min=0.0, max=1e4, description="alpha",
                                          style=LABEL_STYLE)
        self.dropout_w = W.BoundedFloatText(value=defaults.dropout, min=0.0, max=0.99, step=0.05,
                                            description="dropout", style=LABEL_STYLE)
        preset = next((k for k, v in TARGET_PRESETS.items() if v == defaults.targets), "attention")
        self.targets_w = W.Dropdown(options=list(TARGET_PRESETS), value=preset,
                                    description="targets", style=LABEL_STYLE)
        self.modules_w = W.SelectMultiple(options=[], rows=6, description="modules", style=LABEL_STYLE,
                                          layout=W.Layout(width="420px"))
        self.quant_w = W.ToggleButtons(options=[("none", "none"), ("NF4", "nf4")],
                                       value=defaults.quantization or "none",
                                       description="quantisation", style=LABEL_STYLE)

    def _build_training_controls(self, defaults: plan.Choice) -> None:
        """How long and how fast: learning rate, steps, batch size, sequence length."""
        import ipywidgets as W

        self.lr_w = W.BoundedFloatText(value=defaults.lr, min=1e-7, max=1.0, step=1e-4,
                                       description="learning rate", style=LABEL_STYLE)
        self.steps_w = W.BoundedIntText(value=defaults.steps, min=1, max=100_000, description="steps",
                                        style=LABEL_STYLE)
        self.batch_w = W.BoundedIntText(value=defaults.batch_size, min=1, max=1024,
                                        description="batch size", style=LABEL_STYLE)
        self.length_w = W.BoundedIntText(value=defaults.max_length, min=8, max=8192,
                                         description="seq length", style=LABEL_STYLE)

    # ------------------------------------------------------------------------------------------
    # The choice the controls make
    # ------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.hub_w.value.strip() or self.model_w.value

    def choice(self) -> plan.Choice:
        """The current choices as one frozen value."""
        preset = TARGET_PRESETS[self.targets_w.value]
        if preset == "custom":
            targets = tuple(self.modules_w.value) or ("(nothing picked)",)
        elif preset == "attention":
            targets = self._attention_targets()
        else:
            targets = preset
        return plan.Choice(
            model=self.model_name, dataset=self.dataset_w.value, method=self.method_w.value,
            task=None if self.task_w.value == "none" else self.task_w.value,
            backend=self.backend_w.value, r=int(self.r_w.value), alpha=float(self.alpha_w.value),
            dropout=float(self.dropout_w.value), targets=targets,
            quantization=None if self.quant_w.value == "none" else self.quant_w.value,
            lr=float(self.lr_w.value), steps=int(self.steps_w.value), batch_size=int(self.batch_w.value),
            max_length=int(self.length_w.value),
        )

    @property
    def task(self):
        """The picked :class:`peftlab.tasks.Task`, or None."""
        return self._tasks.get(self.task_w.value)

    def task_for(self, key: str | None):
        """The task of a choice (``Choice.task``, "name/framing"), or None for no task."""
        return self._tasks.get(key) if key else None

    def meta_labels(self) -> int | None:
        """``num_labels`` the model is built with: a bundled classifier's labels, else None."""
        from peftlab.models import SEQUENCE_CLASSIFICATION, bundled_task

        if bundled_task(self.model_name) == SEQUENCE_CLASSIFICATION:
            return self._num_labels() or 2
        return None

    def _num_labels(self) -> int | None:
        import peftlab

        if self.task is not None and self.task.num_labels:
            return self.task.num_labels
        info = next((d for d in peftlab.list_datasets() if d.name == self.dataset_w.value), None)
        return len(info.labels) if info is not None and info.labels else None

    def _meta(self):
        return plan.meta_model(self.model_name, self.meta_labels())

    def _attention_targets(self) -> tuple[str, ...] | str:
        """Suffixes of the linear layers inside attention blocks (q/k/v/o for Llama)."""
        try:
            meta = self._meta()
        except Exception:  # noqa: BLE001 (the preview reports the model error itself)
            return "attention"
        names = [n for n, _ in meta.named_modules() if any(w in n.lower() for w in _ATTENTION_WORDS)]
        found = plan.linear_modules(meta)
        suffixes = tuple(s for s in found if any(n.endswith("." + s) for n in names))
        return suffixes or "all-linear"

    # ------------------------------------------------------------------------------------------
    # Callbacks: a control changed
    # ------------------------------------------------------------------------------------------
    def _on_task(self, change: Mapping[str, Any]) -> None:
        """A task was picked: its defaults fill the model, method, rank, lr, batch, length, steps."""
        task = self.task
        if task is not None:
            d = task.defaults
            self._updating = True
            try:
                if self.hub_w.value.strip() == "" and task.model in [v for _, v in self.model_w.options]:
                    self.model_w.value = task.model
                self.method_w.value = d.method
                self.r_w.value, self.alpha_w.value, self.lr_w.value = d.r, d.alpha, d.lr
                self.steps_w.value, self.batch_w.value, self.length_w.value = d.steps, d.batch_size, d.max_length
                self.targets_w.value = next(k for k, v in TARGET_PRESETS.items() if v == d.targets) \
                    if d.targets in TARGET_PRESETS.values() else "method default"
                self.progress.max = d.steps
            finally:
                self._updating = False
        self.show_choice()

    def _on_change(self, change: Mapping[str, Any]) -> None:
        if self._updating:
            return
        owner = change.get("owner")
        if owner in (self.model_w, self.hub_w, self.method_w, self.r_w, self.alpha_w, self.dataset_w):
            self._refresh_modules()
        if owner is self.modules_w and self.modules_w.value and self.targets_w.value != "custom (pick below)":
            self._updating = True
            self.targets_w.value = "custom (pick below)"
            self._updating = False
        if owner is self.steps_w:
            self.progress.max = int(self.steps_w.value)
        self.update_preview()

    # ------------------------------------------------------------------------------------------
    # What the panel shows
    # ------------------------------------------------------------------------------------------
    def show_choice(self) -> None:
        """Redraw everything that follows the choice: the task's note, the module picker, the preview."""
        self._show_task_info()
        self._refresh_modules()
        self.update_preview()

    def _show_task_info(self) -> None:
        task = self.task
        self.dataset_w.disabled = task is not None
        if task is None:
            self.task_info.value = (f"{_INFO_BOX}<small>no task: the run "
                                    "shows the loss only</small></div>")
            return
        self.task_info.value = (
            f"{_INFO_BOX}<i>{task.description}</i><br><small>"
            f"metric: {task.metric} on {task.live_eval_limit} fixed held-out rows, measured before "
            f"training and every {task.defaults.eval_every} steps</small></div>")

    def _refresh_modules(self) -> None:
        """The module picker: each linear-layer name with its shape and the parameters it adds."""
        spec = self._methods.get(self.method_w.value, {})
        self.method_info.value = (
            f"{_INFO_BOX}<i>{spec.get('description', '')}</i><br>"
            f"<small>trainable: {spec.get('trainable_parameters', '')}</small></div>")
        try:
            meta = self._meta()
            modules = plan.linear_modules(meta)
            choice = self.choice()
        except Exception:  # noqa: BLE001 (update_preview shows the message)
            return
        keep = tuple(v for v in self.modules_w.value if v in modules)
        self._updating = True
        self.modules_w.options = plan.module_options(modules, choice)
        self.modules_w.value = keep
        self._updating = False

    def update_preview(self) -> None:
        """Count trainable parameters and estimate memory for the current choices (no weights)."""
        try:
            choice = self.choice()
            est = plan.estimate(choice, self.meta_labels())
        except Exception as exc:  # noqa: BLE001 (a widget shows messages, never tracebacks)
            self.estimate = None
            self.preview.value = message_html(error_text(exc), "error")
            return
        self.estimate = est
        self.preview.value = plan.preview_html(choice, est)


__all__ = ["ChoicePanel", "LABEL_STYLE", "TARGET_PRESETS", "initial_choice", "task_key", "task_of"]
