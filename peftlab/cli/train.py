"""``peftlab train``: flags to a method config, the run, and what it writes (adapter, run.json, report).

    peftlab train --model smollm2-135m --data chatterbot-qa --method lora --rank 8 --steps 30 --out DIR

The outputs are listed in the package docstring (:mod:`peftlab.cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from peftlab.cli.exits import EXIT_INTERRUPTED, EXIT_NAN, EXIT_OK
from peftlab.errors import ConfigError
from peftlab.provenance import environment, jsonable, write_json


def method_hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The method's keyword arguments from the flags that were given (others keep defaults)."""
    hp: dict[str, Any] = {}
    for flag, key in (("rank", "r"), ("alpha", "alpha"), ("dropout", "dropout")):
        if getattr(args, flag) is not None:
            hp[key] = getattr(args, flag)
    if args.targets:
        hp["targets"] = parse_targets(args.targets)
    for item in args.hyperparameters:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE. Expected e.g. --set use_rslora=true.")
        try:
            hp[key.strip()] = json.loads(raw)  # numbers, true/false, lists
        except json.JSONDecodeError:
            hp[key.strip()] = raw  # a plain word: keep it as a string
    return hp


def parse_targets(text: str) -> str | tuple[str, ...]:
    """'all-linear' and regexes stay strings; 'q_proj,v_proj' becomes ('q_proj', 'v_proj')."""
    if text == "all-linear" or any(ch in text for ch in "*^$[]()|\\+?"):
        return text
    return tuple(name.strip() for name in text.split(",") if name.strip())


def cmd_train(args: argparse.Namespace) -> int:
    """``peftlab train``: check the flags, load, adapt, train, write the outputs, print the summary."""
    import torch

    import peftlab
    from peftlab.api import adapt, make_config
    from peftlab.metrics import count_parameters
    from peftlab.methods import get_method
    from peftlab.report import write_report
    from peftlab.train import start_data, train

    # Check the cheap things first, so a typo fails before a model is loaded.
    task = apply_task_defaults(args)
    spec = get_method(args.method)
    hp = method_hyperparameters(args)
    make_config(spec, None, **hp)
    out = Path(args.out)

    dataset = task.training_data() if task else peftlab.load_dataset(args.data)
    if task is not None:
        from datasets import DatasetDict

        dataset = DatasetDict({"train": dataset})
    model, tokenizer = load_model_for(args.model, args.quantization, dataset,
                                      num_labels=task.num_labels if task else None)
    eval_data = None
    if args.eval:
        eval_data = next((dataset[s] for s in ("validation", "test") if s in dataset), None)
        if eval_data is None:
            raise ConfigError(f"--eval: the dataset {args.data!r} has no validation or test split "
                              f"(it has {list(dataset)}). Drop --eval.")
    eval_before = peftlab.evaluate(model, task, tokenizer=tokenizer, progress=not args.no_progress) if task else None
    torch.manual_seed(args.seed)  # the adapter's initial weights
    hp.update(start_data(model, spec.name, dataset, tokenizer, max_length=args.seq_len, batch_size=args.batch_size,
                         seed=args.seed))
    model = adapt(model, spec.name, backend=args.backend, **hp)
    params = count_parameters(model)

    result = train(
        model, dataset, task=task, tokenizer=tokenizer, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        max_length=args.seq_len, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
        loraplus_lr_ratio=getattr(args, "loraplus_lr_ratio", None), lora_fa=getattr(args, "lora_fa", False),
        gradient_checkpointing=args.grad_checkpointing, bf16=args.bf16, seed=args.seed,
        out_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every, resume_from=args.resume,
        eval_data=eval_data, eval_every=args.eval_every, progress=not args.no_progress,
        report_to=getattr(args, "report_to", None),
    )

    peftlab.save_adapter(model, out / "adapter")
    summary = run_summary(result, params)
    if task is not None:
        summary.update(task=f"{task.name} ({task.framing})", task_metrics=list(task.metrics),
                       eval_before=eval_before, eval_after=peftlab.evaluate(model, task, tokenizer=tokenizer,
                                                              progress=not args.no_progress))
    run = {
        "command": reproduce_command(args),
        "args": {k: v for k, v in vars(args).items()},
        "method_config": jsonable(dataclasses.asdict(resolved_config(model, spec, hp))),
        "train_settings": result.settings,
        "summary": summary,
        "eval_before": summary.get("eval_before"),
        "eval_after": summary.get("eval_after"),
        "environment": environment(),
    }
    write_json(out / "history.json", result.history)
    write_json(out / "run.json", run)
    write_report(out / "report.html", history=result.history, summary=summary, run=run,
                 memory=memory_ledger(model, result), parameters=params.by_type,
                 title=f"peftlab train: {args.model} + {spec.name}, {args.task or args.data}")

    print(format_summary(summary, args, out))
    return {"nan": EXIT_NAN, "interrupted": EXIT_INTERRUPTED}.get(result.stop_reason, EXIT_OK)


# Without --task, the flags' defaults are these (a task brings its own: Task.defaults).
UNTASKED_DEFAULTS = {"model": "smollm2-135m", "data": "chatterbot-qa", "method": "lora", "steps": 30,
                     "lr": 2e-4, "batch_size": 4, "seq_len": 128}


def apply_task_defaults(args: argparse.Namespace):
    """Fill every flag not given from --task's defaults (or UNTASKED_DEFAULTS); return the task."""
    task = None
    if args.task:
        from peftlab.tasks import load_task

        if args.data:
            raise ConfigError("--task brings its own data; drop --data (or drop --task and name --data).")
        task = load_task(args.task, args.framing)
        d = task.defaults
        given = {"model": task.model, "method": d.method, "steps": d.steps, "lr": d.lr,
                 "batch_size": d.batch_size, "seq_len": d.max_length, "eval_every": d.eval_every}
        if args.method in (None, d.method):  # the rank, alpha and targets were chosen for that method
            given.update(rank=d.r, alpha=d.alpha, targets=",".join(d.targets) if isinstance(d.targets, tuple)
                         else d.targets)
    elif args.framing:
        raise ConfigError("--framing needs --task (e.g. --task sentiment --framing classify).")
    else:
        given = UNTASKED_DEFAULTS
    for key, value in given.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return task


def load_model_for(name: str, quantization: str | None, dataset, num_labels: int | None = None) -> tuple[Any, Any]:
    """Load the model; a classifier gets one output per class of a labelled dataset."""
    import peftlab

    if num_labels:
        return peftlab.load_model(name, quantization=quantization, num_labels=num_labels)
    label = dataset["train"].features.get("label") if "train" in dataset else None
    names = getattr(label, "names", None)
    if names:
        try:
            return peftlab.load_model(name, quantization=quantization, num_labels=len(names))
        except ConfigError:
            pass  # a causal LM takes no num_labels: it models the text of the rows instead
    return peftlab.load_model(name, quantization=quantization)


def run_summary(result, params) -> dict[str, Any]:
    """The figures a reader wants first, as plain numbers (for run.json, the report, the table)."""
    history = result.history
    return {
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        "steps": len(history),
        "stop_reason": result.stop_reason,
        "message": result.message,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "time_s": result.time_s,
        "mean_step_s": (sum(r["step_time_s"] for r in history) / len(history)) if history else None,
        "tokens_per_s": (sum(r["tokens"] for r in history) / max(sum(r["step_time_s"] for r in history), 1e-9))
        if history else None,
        "peak_memory_mb": result.peak_memory_mb,
        "eval": result.eval,
    }


def memory_ledger(model, result) -> dict[str, dict[str, float]]:
    """Bytes by category for plots.memory_ledger: the arithmetic next to the measurement."""
    params = list(model.parameters())  # tied weights appear once
    weights = sum(t.numel() * t.element_size() for t in params + list(model.buffers()))  # as stored
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    mib = 2**20
    return {
        "estimated": {"weights": weights, "gradients": grads, "AdamW state (2 moments)": 2 * grads},
        "measured": {
            "resident before training": result.start_memory_mb * mib,
            "peak added by a training step": max(result.peak_memory_mb - result.start_memory_mb, 0.0) * mib,
        },
    }


def format_summary(summary: dict[str, Any], args: argparse.Namespace, out: Path) -> str:
    """An aligned two-column table."""
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    memory_kind = "GPU allocated" if _on_cuda() else "process RSS"
    rows = [
        ("model", f"{args.model} + {args.method} ({args.backend})"
                  + (f", {args.quantization}" if args.quantization else "")),
        ("data", summary.get("task") or args.data),
        ("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,} "
                             f"({summary['trainable_percent']:.3f}%)"),
        ("steps", f"{summary['steps']} ({summary['stop_reason']})"),
        ("loss first -> last", f"{num(summary['first_loss'], '.4f')} -> {num(summary['last_loss'], '.4f')}"),
        ("time", f"{summary['time_s']:.1f} s ({num(summary['mean_step_s'], '.2f')} s/step, "
                 f"{num(summary['tokens_per_s'], ',.0f')} tokens/s)"),
        ("peak memory", f"{summary['peak_memory_mb']:,.0f} MB ({memory_kind})"),
    ]
    if summary.get("eval_before") is not None:
        for metric in summary["task_metrics"]:
            rows.append((f"{metric} before -> after", f"{summary['eval_before'][metric]:.3f} -> "
                         f"{summary['eval_after'][metric]:.3f} ({summary['eval_after']['n']} held-out rows)"))
    if summary.get("eval"):
        rows.append(("eval", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in summary["eval"].items())))
    rows.append(("outputs", f"{out}/adapter, report.html, history.json, run.json"))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    rule = "  " + "-" * (width + 2 + max(len(v) for _, v in rows))
    if summary["stop_reason"] not in ("completed",):
        lines.append(f"  note: {summary['message']}")
    return "\n".join([rule, *lines, rule])


def reproduce_command(args: argparse.Namespace) -> str:
    """The ``peftlab train`` command line that repeats this run."""
    words = ["peftlab", "train"]
    skip = {"command", "hyperparameters", "resume"}
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    for item in args.hyperparameters:
        words += ["--set", item]
    return shlex.join(words)


def resolved_config(model, spec, hp):
    """The method config as applied: targets resolved for this model."""
    from peftlab.api import make_config, records
    from peftlab.state import active_record

    if records(model):  # reference backend: the config adapt() stored
        return active_record(model)[1].config
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return make_config(spec, inner, **hp)


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
