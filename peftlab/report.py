"""``report.html``: one self-contained page about a training run, written by ``peftlab train``.

The page holds the summary figures, the loss curve, a memory ledger (what the arithmetic says the
weights, gradients and AdamW state take, next to what was measured), the parameter budget, the
per-step table and the command that reproduces the run. Every figure comes from
:mod:`peftlab.plots`; plotly.js is embedded once, inline, so the page opens offline and can be
mailed as one file.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1000px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9rem; }
td, th { padding: 0.2rem 0.8rem; text-align: left; border-bottom: 1px solid #eee; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.7rem; overflow-x: auto; white-space: pre-wrap; }
.note { color: #666; font-size: 0.85rem; }
details { margin-top: 0.5rem; }
"""


def write_report(
    path: str | os.PathLike,
    *,
    history: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    run: Mapping[str, Any] | None = None,
    memory: Mapping[str, Mapping[str, float]] | None = None,
    parameters: Mapping[str, Mapping[str, int]] | None = None,
    title: str = "peftlab training run",
) -> Path:
    """Write the report and return its path.

    Args:
        history: the per-step records of :func:`peftlab.train` (``TrainResult.history``).
        summary: headline figures: trainable_params, total_params, first_loss, last_loss, time_s,
            peak_memory_mb, stop_reason, ... (``peftlab.cli.run_summary``).
        run: run.json's content (command, args, method config, environment), shown as is.
        memory: ``{"estimated": {category: bytes}, "measured": {category: bytes}}`` for
            :func:`peftlab.plots.memory_ledger`.
        parameters: ``count_parameters(model).by_type`` for :func:`peftlab.plots.parameter_budget`.
    """
    from peftlab import plots

    figures = []
    if history:
        evals = [r for r in history if r.get("eval_loss") is not None]
        figures.append(("Loss", plots.loss_curve(
            list(history),
            eval_losses=[r["eval_loss"] for r in evals] if evals else None,
            eval_steps=[r["step"] for r in evals] if evals else None,
        )))
    for metric in summary.get("task_metrics") or ():
        before = (summary.get("eval_before") or {}).get(metric)
        figures.append((f"Task metric: {metric}", plots.task_metric_curve(list(history), metric, before=before)))
    if memory:
        figures.append(("Memory", plots.memory_ledger(
            memory.get("estimated", {}), memory.get("measured"), title="Memory: arithmetic vs measured")))
    if parameters:
        figures.append(("Parameters", plots.parameter_budget(parameters, log=True)))

    parts = [f"<h1>{html.escape(title)}</h1>", _summary_table(summary)]
    for k, (heading, fig) in enumerate(figures):
        # plotly.js (~4.5 MB) goes in once, with the first figure; the others reuse it.
        body = fig.to_html(full_html=False, include_plotlyjs=(k == 0), config={"displaylogo": False})
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
        if heading == "Memory":
            parts.append(
                '<p class="note">Estimated: the bytes of the weights as stored, of the gradients '
                "(trainable parameters only) and of AdamW's two moment buffers. Measured: what "
                "was resident before training, and the largest peak of a training step above "
                "that (activations, gradients, optimizer state, temporaries). On CPU the measure "
                "is the whole process's resident memory (RSS): it includes the Python libraries, "
                "and weights memory-mapped from disk count only once a forward pass has touched "
                "them, so they may appear in the step's share. On CUDA it is the allocator's "
                "bytes.</p>"
            )
    if history:
        parts.append("<h2>Steps</h2>" + _history_table(history))
    if run:
        if run.get("command"):
            parts.append(f"<h2>Reproduce</h2><pre>{html.escape(str(run['command']))}</pre>")
        parts.append("<details><summary>run.json</summary><pre>"
                     f"{html.escape(json.dumps(run, indent=1, default=str))}</pre></details>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # write, then rename: never half a page
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _summary_table(summary: Mapping[str, Any]) -> str:
    def fmt(value: Any, spec: str = "") -> str:
        if value is None:
            return "n/a"
        return format(value, spec) if spec else str(value)

    rows = [
        ("trainable parameters", f"{fmt(summary.get('trainable_params'), ',')} of "
                                 f"{fmt(summary.get('total_params'), ',')} "
                                 f"({fmt(summary.get('trainable_percent'), '.3f')}%)"),
        ("steps", f"{fmt(summary.get('steps'))} ({fmt(summary.get('stop_reason'))})"),
        ("loss, first → last", f"{fmt(summary.get('first_loss'), '.4f')} → {fmt(summary.get('last_loss'), '.4f')}"),
        ("time", f"{fmt(summary.get('time_s'), '.1f')} s ({fmt(summary.get('mean_step_s'), '.2f')} s/step)"),
        ("throughput", f"{fmt(summary.get('tokens_per_s'), ',.0f')} tokens/s"),
        ("peak memory", f"{fmt(summary.get('peak_memory_mb'), ',.0f')} MB"),
    ]
    if summary.get("eval"):
        rows.append(("evaluation", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in summary["eval"].items())))
    if summary.get("message"):
        rows.append(("how it ended", str(summary["message"])))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


_COLUMNS = (("step", "d"), ("loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f"), ("step_time_s", ".3f"),
            ("tokens_per_s", ",.0f"), ("memory_mb", ",.0f"), ("eval_loss", ".4f"), ("eval_accuracy", ".3f"))


def _history_table(history: Sequence[Mapping[str, Any]]) -> str:
    columns = [(c, f) for c, f in _COLUMNS if any(c in r for r in history)]
    head = "".join(f'<th class="num">{c}</th>' for c, _ in columns)
    body = []
    for r in history:
        cells = "".join(
            f'<td class="num">{format(r[c], f) if isinstance(r.get(c), (int, float)) else ""}</td>'
            for c, f in columns
        )
        body.append(f"<tr>{cells}</tr>")
    return ("<details><summary>one row per optimizer step</summary>"
            f"<table><tr>{head}</tr>{''.join(body)}</table></details>")


__all__ = ["write_report"]
