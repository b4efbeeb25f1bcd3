"""After training: the runs table and chart, try it (base vs adapted), save, export as a script.

    after: runs table + chart · try it (base vs adapted) · save adapter · export script

:class:`RunsPanel` keeps one row per finished run (``lab.runs``) and shows them as a table and a
bar chart (``peftlab.plots.benchmark_bars``); it answers a prompt with the base model (adapter
off) and the adapted one, saves the adapter in peft's folder format and, where
``peftlab.export`` is installed, writes ``run.json`` beside each dataset run so the run can be
exported as a training script. Errors are shown in the Lab's message box, never as a traceback.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from peftlab.widgets import plan
from peftlab.widgets.choices import LABEL_STYLE
from peftlab.widgets.live import LiveFigure, error_text

_RUNS_HEAD = ("run", "model", "method", "rank", "trainable", "peak memory", "final loss", "time", "steps")


def runs_table_html(runs: list[dict]) -> str:
    """The runs table: one row per finished run (``RunsPanel.add_run``'s records)."""
    body = "".join(
        f"<tr><td>{r['run']}</td><td>{r['model']}</td><td>{r['method']}</td><td>{r['rank']}</td>"
        f"<td>{r['trainable']:,} ({r['percent']:.2f}%)</td><td>{r['peak_memory_mb']:,.0f} MB</td>"
        f"<td>{r['final_loss']:.4f}</td><td>{r['time_s']:.1f} s</td><td>{r['steps']} "
        f"({r['stop_reason']})</td></tr>" for r in runs)
    return ("<table class='peftlab-runs'><tr>" + "".join(f"<th>{h}</th>" for h in _RUNS_HEAD)
            + f"</tr>{body}</table>")


def stored_runs_html(runs: list[Any]) -> str:
    """The runs of the local trackio store (peftlab.tracking.stored_runs), every session's."""
    head = ("run", "method", "rank", "lr", "steps", "trainable", "final loss")
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            r.name, r.config.get("method"), r.config.get("adapter.r", "-"), r.config.get("train.lr"),
            r.last.get("step"), f"{r.config.get('trainable_parameters', 0):,}",
            f"{r.last['loss']:.4f}" if isinstance(r.last.get("loss"), float) else "-")) + "</tr>"
        for r in runs)
    return ("<table class='peftlab-stored-runs'><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + f"</tr>{body}</table>")


def train_argv(choice: plan.Choice, out_dir: Path) -> list[str]:
    """The ``peftlab train`` command line that repeats ``choice`` (what run.json records)."""
    argv = ["train", "--model", choice.model, "--data", choice.dataset, "--method", choice.method,
            "--backend", choice.backend, "--steps", str(choice.steps), "--lr", str(choice.lr),
            "--batch-size", str(choice.batch_size), "--seq-len", str(choice.max_length),
            "--out", str(out_dir), "--no-progress"]
    hp = choice.hyperparameters()
    for flag, key in (("--rank", "r"), ("--alpha", "alpha"), ("--dropout", "dropout")):
        if key in hp:
            argv += [flag, str(hp[key])]
    if isinstance(hp.get("targets"), tuple):
        argv += ["--targets", ",".join(hp["targets"])]
    elif isinstance(hp.get("targets"), str):
        argv += ["--targets", hp["targets"]]
    if choice.quantization:
        argv += ["--quantization", choice.quantization]
    return argv


class RunsPanel:
    """The runs of this session and what to do with the last one (a part of the Lab).

    Expects of the Lab: ``static``, ``runs``, ``result``, ``model``, ``tokenizer``, ``training``,
    ``task``, ``dataset_w``, ``export_available`` and :meth:`show` for messages.
    """

    def build_after(self) -> Any:
        """The runs table and chart, the try-it, save and export rows; returns the column."""
        import ipywidgets as W

        self.runs_table = W.HTML()
        self.stored_table = W.HTML()  # with report_to="trackio": every session's runs, from the store
        self.runs_fig = LiveFigure(self._runs_figure(), self.static)
        self.prompt_w = W.Text(value="What is a language model?", description="prompt", style=LABEL_STYLE,
                               layout=W.Layout(width="520px"))
        self.generate_button = W.Button(description="Generate: base vs adapted", icon="comments",
                                        disabled=True, layout=W.Layout(width="240px"))
        self.generate_button.on_click(self.on_generate)
        self.base_out = W.HTML()
        self.adapted_out = W.HTML()
        self.save_path_w = W.Text(value="adapters/lab-run", description="save to", style=LABEL_STYLE)
        self.save_button = W.Button(description="Save adapter (PEFT format)", icon="save", disabled=True,
                                    layout=W.Layout(width="240px"))
        self.save_button.on_click(self.on_save)
        self.export_path_w = W.Text(value="train_script.py", description="script", style=LABEL_STYLE)
        self.export_button = W.Button(description="Export as script", icon="file-code", disabled=True,
                                      layout=W.Layout(width="240px"))
        self.export_button.on_click(self.on_export)
        export_row = W.HBox([self.export_path_w, self.export_button])
        if not self.export_available:  # the hook waits for peftlab.export (another issue)
            export_row.layout.display = "none"
        self.show_stored_runs()  # a new kernel's Lab shows the runs of the sessions before it
        return W.VBox([
            W.HTML("<b>Runs this session</b>"), self.runs_table, self.runs_fig.widget, self.stored_table,
            W.HTML("<b>Try it</b>"), W.HBox([self.prompt_w, self.generate_button]),
            W.HBox([self.base_out, self.adapted_out]),
            W.HBox([self.save_path_w, self.save_button]), export_row,
        ])

    def _runs_figure(self):
        from peftlab import plots

        rows = [{"name": r["run"], "step_time_s": r["step_time_s"], "peak_mb": r["peak_memory_mb"]}
                for r in self.runs] or [{"name": "(no runs yet)", "step_time_s": 0.0, "peak_mb": 0.0}]
        return plots.benchmark_bars(rows, title="Runs this session")

    def add_run(self, choice: plan.Choice, count: Any, result: Any, out_dir: Path | None) -> None:
        """Record a finished run (its choice, count and ``TrainResult``) and redraw the table and chart."""
        steps = len(result.history)
        self.runs.append({
            "run": f"{len(self.runs) + 1}: {choice.method} r={choice.r}",
            "model": choice.model + (" NF4" if choice.quantization else ""),
            "method": choice.method, "backend": choice.backend, "rank": choice.r,
            "trainable": count.trainable, "percent": count.percent,
            "peak_memory_mb": result.peak_memory_mb, "final_loss": result.final_loss,
            "time_s": result.time_s, "steps": steps, "stop_reason": result.stop_reason,
            "step_time_s": sum(r["step_time_s"] for r in result.history) / max(steps, 1),
            "run_dir": str(out_dir) if out_dir is not None else None,
        })
        self.runs_table.value = runs_table_html(self.runs)
        self.runs_fig.update(self._runs_figure())
        self.show_stored_runs()

    def show_stored_runs(self) -> None:
        """Every stored run (all sessions, so they survive a kernel restart) when training reports
        to trackio; nothing otherwise."""
        from peftlab.tracking import parse_report_to, stored_runs

        if "trackio" not in parse_report_to(getattr(self, "report_to", None)):
            return
        runs = stored_runs()
        self.stored_table.value = (f"<b>Stored runs</b> (trackio, all sessions: {len(runs)})"
                                   + stored_runs_html(runs))

    def write_run(self, choice: plan.Choice, model: Any, out_dir: Path) -> None:
        """``run.json`` as ``peftlab train --out`` writes it, so peftlab.export can repeat the run."""
        import dataclasses
        import json

        from peftlab import cli
        from peftlab.provenance import jsonable
        from peftlab.methods import get_method

        argv = train_argv(choice, out_dir)
        hp = choice.hyperparameters()
        try:
            args = cli.build_parser().parse_args(argv)
            spec = get_method(choice.method)
            run = {"command": cli.reproduce_command(args), "args": vars(args),
                   "method_config": jsonable(dataclasses.asdict(cli.resolved_config(model, spec, hp))),
                   "train_settings": jsonable(self.result.settings)}
            (out_dir / "run.json").write_text(json.dumps(jsonable(run), indent=1))
        except Exception as exc:  # noqa: BLE001 (only the export button depends on it)
            self.export_note = f"run.json not written ({type(exc).__name__}: {exc})"

    # ------------------------------------------------------------------------------------------
    # Try it, save, export
    # ------------------------------------------------------------------------------------------
    def on_generate(self, _button: Any = None) -> None:
        """Greedy completions of the prompt by the base model (adapter off) and the adapted one."""
        if self.model is None or self.training:
            self.show("Train a model first (and wait for the run to end).", "warning")
            return
        if plan.is_classifier(self.model):
            self.show("'Try it' generates text: it needs a causal language model.", "warning")
            return
        try:
            base = self.generate(self.prompt_w.value, adapted=False)
            adapted = self.generate(self.prompt_w.value, adapted=True)
        except Exception as exc:  # noqa: BLE001 (shown in the widget: never a traceback)
            self.show(error_text(exc), "error")
            return
        box = "<div style='width:400px;padding:4px'><b>{}</b><pre style='white-space:pre-wrap'>{}</pre></div>"
        self.base_out.value = box.format("base model", html.escape(base))
        self.adapted_out.value = box.format("adapted", html.escape(adapted))

    def generate(self, prompt: str, adapted: bool = True, max_new_tokens: int = 40) -> str:
        """Greedy completion of ``prompt``; ``adapted=False`` turns the adapter off (the base)."""
        import torch

        import peftlab

        tok, model = self.tokenizer, self.model
        text = prompt
        chat = self.task.framing == "generate" if self.task is not None else self.dataset_w.value == "chatterbot-qa"
        if getattr(tok, "chat_template", None) and chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt").to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        peftlab.set_disabled(model, not adapted)
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
        finally:
            peftlab.set_disabled(model, False)
            model.train(was_training)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def on_save(self, _button: Any = None) -> None:
        """Save the trained adapter in the PEFT on-disk format."""
        import peftlab

        if self.model is None:
            self.show("Nothing to save yet: train first.", "warning")
            return
        try:
            path = peftlab.save_adapter(self.model, self.save_path_w.value)
        except Exception as exc:  # noqa: BLE001 (shown in the widget: never a traceback)
            self.show(error_text(exc), "error")
            return
        self.show(f"Saved the adapter (PEFT format) to {path}.", "ok")

    def on_export(self, _button: Any = None) -> None:
        """Hook for peftlab.export.export_script(run_dir, path) (another issue's module)."""
        if not self.export_available or not self.runs or not self.runs[-1].get("run_dir"):
            self.show("Exporting needs peftlab.export and a finished run.", "warning")
            return
        try:
            from peftlab.export import export_script

            path = export_script(self.runs[-1]["run_dir"], self.export_path_w.value)
        except Exception as exc:  # noqa: BLE001 (shown in the widget: never a traceback)
            self.show(error_text(exc), "error")
            return
        self.show(f"Wrote {path}: run it with `accelerate launch {path}`.", "ok")


__all__ = ["RunsPanel", "runs_table_html", "stored_runs_html", "train_argv"]
