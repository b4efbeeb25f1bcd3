"""The Lab's training run: Train and Stop, the background thread, the task measured before and after.

    [Train] [Stop]   status / error box
    task: the base model's metric and answers (measured first), then base vs adapted answers

:meth:`TrainingRun.on_train` starts ``peftlab.train`` in a daemon thread with a
``threading.Event`` as its stop flag, so the kernel keeps answering widget events (Stop
included); a lock held for the whole run makes a second Train a message, not a second run. With a
task picked, the base model is measured first on the task's fixed held-out slice (cached per
model, task and quantisation) and, after the run, the adapted model on the same prompts, side by
side. Every error of the run ends in the message box, never as a traceback.
"""

from __future__ import annotations

import html
import tempfile
import threading
from pathlib import Path
from typing import Any

from peftlab.widgets import plan
from peftlab.widgets.live import error_text


class TrainingRun:
    """Train / Stop, the run in its thread and the task's before-and-after (a part of the Lab).

    Expects of the Lab: :meth:`choice`, ``estimate`` and :meth:`update_preview` (the pick panel),
    :meth:`reset_live`, :meth:`start_clock`, :meth:`on_step`, :meth:`draw` and
    :meth:`draw_metric` (the dashboard), :meth:`write_run`, :meth:`add_run` and the after-training
    buttons (the runs panel), ``runs``, ``runs_dir``, ``export_available`` and :meth:`show`.
    """

    answers_shown = 4  # held-out prompts answered by the base and the adapted model

    def build_run_controls(self, defaults: plan.Choice) -> Any:
        """The Train and Stop buttons, the progress bar and the task's answers; returns their row."""
        import ipywidgets as W

        self._base_cache: dict[tuple, tuple[dict, list]] = {}  # (model, task, quantization) -> ...
        self._lock = threading.Lock()  # held while a training runs: Train twice starts one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.task_out = W.HTML()  # the base model's metric and answers, then base vs adapted
        self.train_button = W.Button(description="Train", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=defaults.steps, description="step 0")
        self.train_button.on_click(self.on_train)
        self.stop_button.on_click(self.on_stop)
        return W.HBox([self.train_button, self.stop_button, self.progress])

    @property
    def training(self) -> bool:
        return self._lock.locked()

    def on_train(self, _button: Any = None) -> bool:
        """Start a training run in the background; False (and a message) if one is running."""
        if not self._lock.acquire(blocking=False):
            self.show("A training run is already going: wait for it or press Stop.", "warning")
            return False
        try:
            choice = self.choice()
            if self.estimate is None:  # the preview found a bad choice: say it, do not train
                self.update_preview()
                if self.estimate is None:
                    self.show("Fix the choice shown in the preview box first.", "error")
                    self._lock.release()
                    return False
            self._stop.clear()
            self.reset_live()
            self.train_button.disabled, self.stop_button.disabled = True, False
            self.generate_button.disabled = self.save_button.disabled = self.export_button.disabled = True
            self.progress.max, self.progress.value, self.progress.description = choice.steps, 0, "loading"
            self.show(f"Loading {choice.model}{' (NF4)' if choice.quantization else ''} ...", "info")
            self._thread = threading.Thread(target=self._run, args=(choice,), daemon=True,
                                            name="peftlab-lab-train")
            self._thread.start()
        except BaseException:
            self._lock.release()
            raise
        return True

    def on_stop(self, _button: Any = None) -> None:
        """Ask the run to end after the current step; the adapter trained so far is kept."""
        if self.training:
            self._stop.set()
            self.show("Stopping after the current step (the adapter so far is kept) ...", "info")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current run ends (for scripts and tests); True if it ended."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.training

    def _run(self, choice: plan.Choice) -> None:
        """The thread: load, measure the base, adapt, train live, measure the adapted, report."""
        import peftlab
        from peftlab.train import start_data

        self.result = None
        task = self.task_for(choice.task)
        try:
            model, tokenizer = peftlab.load_model(choice.model, quantization=choice.quantization,
                                                  num_labels=self.meta_labels())
            data = None if task is not None else peftlab.load_dataset(choice.dataset)
            self.base_eval, self.eval_after, self.base_answers, self.adapted_answers = None, None, [], []
            if task is not None:
                self._measure_base(choice, task, model, tokenizer)
            start = start_data(model, choice.method, data if task is None else task.training_data(), tokenizer,
                               max_length=choice.max_length, batch_size=choice.batch_size)
            model = peftlab.adapt(model, choice.method, backend=choice.backend, **choice.hyperparameters(), **start)
            count = peftlab.count_parameters(model)
            self.model, self.tokenizer, self.count = model, tokenizer, count
            self.progress.description = "step 0"
            # the doctor's findings before the first step: the silent failures, with numbers and fixes
            found = peftlab.doctor(model, data, tokenizer=tokenizer, max_length=choice.max_length,
                                   lr=choice.lr).findings
            self.show(f"Training {choice.method} r={choice.r} on {choice.model}: "
                      f"{count.trainable:,} trainable parameters ({count.percent:.3f}%)."
                      + "".join(f"\n{f}" for f in found), "warning" if found else "info")
            out_dir = self._run_dir() if self.export_available and task is None else None
            self.start_clock()
            result = peftlab.train(model, data, task=task, tokenizer=tokenizer, steps=choice.steps, lr=choice.lr,
                                   batch_size=choice.batch_size, max_length=choice.max_length,
                                   eval_every=task.defaults.eval_every if task is not None else None,
                                   callbacks=[self.on_step], stop=self._stop, progress=False,
                                   report_to=self.report_to,
                                   out_dir=None if out_dir is None else out_dir / "checkpoints")
            self.result = result
            if out_dir is not None:
                self.write_run(choice, model, out_dir)
            self.draw(final=True)
            if task is not None:
                self._measure_adapted(task, model, tokenizer, result)
            self.add_run(choice, count, result, out_dir)
            self._report(result, task)
        except Exception as exc:  # noqa: BLE001 (shown in the widget: never a traceback)
            self.show(error_text(exc), "error")
        finally:
            trained = self.result is not None and self.result.model is self.model
            self.train_button.disabled, self.stop_button.disabled = False, True
            self.generate_button.disabled = self.save_button.disabled = not trained
            self.export_button.disabled = not (trained and self.export_available and task is None)
            self._lock.release()

    def _run_dir(self) -> Path:
        """A new folder for this run's checkpoints and run.json (``peftlab export`` repeats dataset runs)."""
        root = self.runs_dir or Path(tempfile.mkdtemp(prefix="peftlab-lab-"))
        out_dir = root / f"run-{len(self.runs) + 1}"
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir

    def _report(self, result: Any, task: Any) -> None:
        """The run's last message: how it ended, its loss, time and memory, the metric before -> after."""
        kind = "ok" if result.stop_reason in ("completed", "stopped") else "warning"
        change = ""
        if self.base_eval is not None and self.eval_after is not None:
            m = task.metric
            change = f" Held-out {m}: {self.base_eval[m]:.3f} -> {self.eval_after[m]:.3f}."
        self.show(f"{result.message} Final loss {result.final_loss:.4f}, "
                  f"{result.time_s:.1f} s, peak memory {result.peak_memory_mb:,.0f} MB.{change}", kind)

    # ------------------------------------------------------------------------------------------
    # The task: the base model first, the adapted model after
    # ------------------------------------------------------------------------------------------
    def _measure_base(self, choice: plan.Choice, task: Any, model: Any, tokenizer: Any) -> None:
        """The base model's metric on the live slice and its first answers (cached per model)."""
        from peftlab.evaluation import evaluate, generations

        key = (choice.model, choice.task, choice.quantization)
        if key not in self._base_cache:
            self.progress.description = "base model"
            self.show(f"Measuring the base model: {task.metric} on {task.live_eval_limit} held-out rows ...",
                      "info")
            answers = generations(model, task, tokenizer, n=self.answers_shown) if task.framing == "generate" else []
            self._base_cache[key] = (evaluate(model, task, tokenizer=tokenizer, limit=task.live_eval_limit),
                                     answers)
        self.base_eval, self.base_answers = self._base_cache[key]
        self._show_answers(task)
        self.draw_metric()

    def _measure_adapted(self, task: Any, model: Any, tokenizer: Any, result: Any) -> None:
        """After the run: the metric on the same slice (train's last measurement) and the answers
        of the adapted model to the same prompts."""
        from peftlab.evaluation import evaluate, generations

        self.eval_after = result.task_eval or evaluate(model, task, tokenizer=tokenizer, limit=task.live_eval_limit)
        if task.framing == "generate":
            self.adapted_answers = generations(model, task, tokenizer, n=self.answers_shown)
        self._show_answers(task)

    def _show_answers(self, task: Any) -> None:
        """The metric before (and after) and, for generate tasks, the answers side by side."""
        m = task.metric
        head = f"<b>Task {task.name} ({task.framing})</b>: held-out {m} of the base model " \
               f"<b>{self.base_eval[m]:.3f}</b>" if self.base_eval else f"<b>Task {task.name}</b>"
        if self.eval_after is not None:
            head += f" → adapted <b class='peftlab-after'>{self.eval_after[m]:.3f}</b>"
        head += f" ({(self.base_eval or {}).get('n', task.live_eval_limit)} rows)"
        rows = ""
        for i, base in enumerate(self.base_answers):
            adapted = self.adapted_answers[i].answer if i < len(self.adapted_answers) else "…"
            question = base.question if len(base.question) < 160 else base.question[:157] + "..."
            rows += (f"<tr><td>{html.escape(question)}</td><td>{html.escape(base.answer)}</td>"
                     f"<td>{html.escape(adapted)}</td><td>{html.escape(base.expected)}</td></tr>")
        table = ("<table class='peftlab-answers'><tr><th>held-out input</th><th>base model</th>"
                 f"<th>adapted</th><th>expected</th></tr>{rows}</table>") if rows else ""
        self.task_out.value = f"<div class='peftlab-task'>{head}{table}</div>"


__all__ = ["TrainingRun"]
