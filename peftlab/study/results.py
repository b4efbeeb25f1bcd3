"""A study's file and what is made from it: study.json, the CSV table, the summary and the charts."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from peftlab.errors import DataError
from peftlab.provenance import write_json, write_text


def load_study(path: str | Path) -> dict[str, Any]:
    """A study.json (or the folder holding one), checked to be one."""
    import json

    path = Path(path)
    path = path / "study.json" if path.is_dir() else path
    try:
        study = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"No study at {path}. Expected the study.json that `peftlab study --out DIR` writes.") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); it is not a study peftlab wrote.") from None
    if not isinstance(study, dict) or not {"config", "cells", "provenance"} <= set(study):
        raise DataError(f"{path} is not a peftlab study (expected keys config, cells, provenance).")
    return study


def save_study(study: dict[str, Any], out: str | Path) -> None:
    """study.json (written whole), study.csv and study.html in ``out``."""
    out = Path(out)
    write_json(out / "study.json", study)
    write_text(out / "study.csv", cells_csv(study))
    if any(c["status"] == "ok" for c in study["cells"]):
        write_text(out / "study.html", study_html(study))


def config_metric(study: dict[str, Any]) -> str:
    """The metric of the study's task (accuracy, perplexity, ...): what its tables report."""
    from peftlab.tasks import load_task

    config = study["config"]
    return load_task(config["task"], config["framing"]).metric


# the columns of study.csv; {m} is the task's metric
CSV_COLUMNS = ("method", "lr", "seed", "status", "valid_{m}", "test_{m}", "forgetting", "trainable_params",
               "total_params", "peak_memory_mb", "step_time_s", "time_s", "final_loss")


def cells_csv(study: dict[str, Any]) -> str:
    """One row per cell (the loss curves stay in study.json)."""
    metric = config_metric(study)
    columns = [c.format(m=metric) for c in CSV_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for cell in study["cells"]:
        writer.writerow(cell)
    return buffer.getvalue()


def summarize(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method at its best learning rate (highest mean validation metric over seeds;
    lowest for perplexity): the test metric's mean, std, min and max over those seeds, and the
    medians of forgetting, peak memory and step time. Methods with no finished cell are left out."""
    metric = config_metric(study)
    higher = metric != "perplexity"
    rows = []
    for method in study["config"]["methods"]:
        by_lr: dict[float, list[dict]] = {}
        for cell in in_grid(study):
            if cell["method"] == method and cell["status"] == "ok":
                by_lr.setdefault(cell["lr"], []).append(cell)
        if not by_lr:
            continue
        sign = 1 if higher else -1
        lr, cells = max(by_lr.items(), key=lambda kv: sign * statistics.mean(c[f"valid_{metric}"] for c in kv[1]))
        test = [c[f"test_{metric}"] for c in cells]
        rows.append({
            "method": method, "lr": lr, "seeds": len(cells),
            f"valid_{metric}": statistics.mean(c[f"valid_{metric}"] for c in cells),
            f"test_{metric}": statistics.mean(test),
            f"test_{metric}_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            f"test_{metric}_min": min(test), f"test_{metric}_max": max(test),
            "forgetting": statistics.median(c["forgetting"] for c in cells),
            "trainable_params": cells[0]["trainable_params"],
            "trainable_percent": 100.0 * cells[0]["trainable_params"] / cells[0]["total_params"],
            "peak_memory_mb": statistics.median(c["peak_memory_mb"] for c in cells),
            "step_time_s": statistics.median(c["step_time_s"] for c in cells),
            "lrs_tried": sorted(by_lr),
        })
    return rows


def in_grid(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells of the study's current grid (a resumed study may hold others)."""
    config = study["config"]
    grid = {(m, float(lr), int(s)) for m in config["methods"] for lr in config["lrs"][m] for s in config["seeds"]}
    return [c for c in study["cells"] if (c["method"], float(c["lr"]), int(c["seed"])) in grid]


def format_summary(study: dict[str, Any]) -> str:
    """The summary as a fixed-width table, with the base model's level and the provenance."""
    metric = config_metric(study)
    config, prov = study["config"], study["provenance"]
    rows = summarize(study)
    lines = [f"{'method':<10} {'best lr':>8} {'test ' + metric:>14} {'± std':>7} {'min..max':>13} "
             f"{'forgetting':>10} {'trainable':>11} {'%':>6} {'peak MB':>8} {'step s':>7}"]
    for r in rows:
        lines.append(f"{r['method']:<10} {r['lr']:>8.0e} {r[f'test_{metric}']:>14.3f} {r[f'test_{metric}_std']:>7.3f} "
                     f"{r[f'test_{metric}_min']:>6.3f}..{r[f'test_{metric}_max']:.3f} {r['forgetting']:>10.4f} "
                     f"{r['trainable_params']:>11,} {r['trainable_percent']:>6.2f} {r['peak_memory_mb']:>8,.0f} "
                     f"{r['step_time_s']:>7.3f}")
    base = (study.get("base") or {}).get("test", {}).get(metric)
    if base is not None:
        lines.append(f"untrained model: test {metric} {base:.3f}")
    lines.append(f"{config['task']} ({config['framing']}), {config['model'] or 'task model'}, "
                 f"{config['steps']} steps x {config['batch_size']} rows, seeds {config['seeds']}; "
                 f"{prov.get('cpu', '?')}, torch {prov.get('torch', '?')}, {prov.get('date', '?')}")
    return "\n".join(lines)


def study_html(study: dict[str, Any]) -> str:
    """The charts and the table as one offline page (plotly.js embedded once)."""
    from peftlab import plots

    metric = config_metric(study)
    rows = summarize(study)
    base = (study.get("base") or {}).get("test", {}).get(metric)
    figures = [plots.study_tradeoff(rows, metric, base=base), plots.study_costs(rows),
               plots.study_lr_sweep(in_grid(study), metric)]
    parts = [fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures)]
    table = format_summary(study).replace("&", "&amp;").replace("<", "&lt;")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>peftlab study</title></head><body>"
            + "".join(parts) + f"<pre>{table}</pre></body></html>")
