"""The ``peftlab`` command: ``peftlab train | info | bench | export``.

    peftlab train --model smollm2-135m --data chatterbot-qa --method lora --rank 8 --steps 30 --out DIR
    peftlab info [--brief] [--json]
    peftlab bench train|spectra|learn [options...]
    peftlab study --out DIR                   # methods x learning rates x seeds on one task
    peftlab export RUN_DIR --to script.py     # a transformers + peft script for accelerate launch

``train`` runs offline on the bundled models and data, prints a summary table and writes to DIR:

    adapter/        the trained adapter, PEFT format (peftlab.load_adapter or peft can load it)
    checkpoints/    resumable checkpoints (``--checkpoint-every N``; always one at the end)
    history.json    one record per step: loss, lr, grad norm, step time, tokens/s, memory
    run.json        every argument, the resolved method config, versions, the summary, and the
                    command line that reproduces the run
    report.html     loss and memory charts (plotly.js embedded once: opens offline)

Exit status: 0 when training completed or was stopped; 1 when it stopped on a non-finite loss
(the outputs are still written); 2 for a usage error (a bad name or value: one message on
stderr, never a traceback); 130 after Ctrl-C (the outputs of the finished steps are written).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from peftlab.errors import ConfigError, PeftlabError
from peftlab.provenance import environment, jsonable, write_json

EXIT_OK, EXIT_NAN, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Learn and prototype parameter-efficient fine-tuning (PEFT).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,info,bench,study,export}")

    t = sub.add_parser("train", help="train an adapter and write it with a report",
                       description="Train an adapter on a bundled (offline) model and dataset.")
    t.add_argument("--task", help="a task (see `peftlab info`): trains on its data, measures its metric "
                   "before, during and after training; its own defaults fill every flag not given")
    t.add_argument("--framing", choices=("generate", "classify", "perplexity"),
                   help="with --task: how the model sees it (default: the task's first framing)")
    t.add_argument("--model", help="bundled name, local folder or hub id "
                   "(default: the task's model, else smollm2-135m; see `peftlab info`)")
    t.add_argument("--data", help="bundled dataset name or file (default: chatterbot-qa; ignored with --task)")
    t.add_argument("--method", help="PEFT method (default: the task's, else lora; see `peftlab info`)")
    t.add_argument("--backend", default="reference", choices=("reference", "peft", "fused"),
                   help="peftlab's from-scratch modules, Hugging Face peft, or peftlab's fused "
                   "LoRA/DoRA kernels (default: reference)")
    t.add_argument("--rank", type=int, help="rank r of the update (method default if omitted)")
    t.add_argument("--alpha", type=float, help="scale numerator alpha (method default if omitted)")
    t.add_argument("--dropout", type=float, help="adapter dropout (method default if omitted)")
    t.add_argument("--targets", help="comma-separated module names, 'all-linear', or a regex")
    t.add_argument("--set", dest="hyperparameters", action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter of the method, e.g. --set use_rslora=true (repeatable)")
    t.add_argument("--quantization", choices=("nf4",), help="load the base in 4-bit NF4 (QLoRA)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: the task's, else 30)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the task's, else 2e-4)")
    t.add_argument("--batch-size", type=int, help="rows per micro-batch (default: the task's, else 4)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    t.add_argument("--seq-len", type=int, help="max tokens per row (default: the task's, else 128)")
    t.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps warming up (default: 0.1)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: 1.0)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    t.add_argument("--seed", type=int, default=0, help="seed of data order, init and dropout (default: 0)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    t.add_argument("--eval", action="store_true", help="evaluate on the dataset's validation/test split")
    t.add_argument("--eval-every", type=int, help="with --eval or --task: also every N steps "
                   "(default: the task's, else at the end)")
    t.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (always at the end)")
    t.add_argument("--resume", help="continue from a checkpoint folder or a previous --out folder")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="list bundled models, datasets and methods")
    i.add_argument("--brief", action="store_true", help="one short line per item")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    b = sub.add_parser("bench", help="benchmarks: training step speed, spectra of ΔW, time to learn a task",
                       description="Run a benchmark. Words after WHAT are passed on to it.")
    b.add_argument("what", choices=("train", "spectra", "learn"), help="which benchmark: a training step's "
                   "speed and memory, spectra of ΔW, or the time to learn the default task")
    b.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark")

    s = sub.add_parser("study", help="compare methods on a task: methods x learning rates x seeds, resumable",
                       description="Run (or resume) a method study on one task; writes study.json, "
                       "study.csv and study.html to --out. See peftlab.study.")
    from peftlab.study import add_arguments

    add_arguments(s)

    e = sub.add_parser("export", help="write a run as a transformers + peft script (accelerate launch)",
                       description="Write a plain transformers + peft + accelerate script that "
                       "repeats a `peftlab train --out DIR` run.")
    e.add_argument("run_dir", help="the --out folder of a peftlab train run (holds run.json)")
    e.add_argument("--to", dest="to", help="script path (default: RUN_DIR/train_<method>.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "study":
            from peftlab.study import main as study_main

            return study_main(args)
        return cmd_bench(args)
    except PeftlabError as err:
        # A user error: one paragraph, no traceback.
        print(f"peftlab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before or after training (train() itself saves and returns)
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `peftlab info | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (silences the flush at exit)
        return EXIT_OK


# --------------------------------------------------------------------------------------------
# peftlab train
# --------------------------------------------------------------------------------------------
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
    import torch

    import peftlab
    from peftlab.api import adapt, make_config
    from peftlab.metrics import count_parameters
    from peftlab.methods import get_method
    from peftlab.report import write_report
    from peftlab.train import train

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
    eval_before = peftlab.evaluate(model, task, tokenizer=tokenizer) if task else None
    torch.manual_seed(args.seed)  # the adapter's initial weights
    model = adapt(model, spec.name, backend=args.backend, **hp)
    params = count_parameters(model)

    result = train(
        model, dataset, task=task, tokenizer=tokenizer, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        max_length=args.seq_len, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
        gradient_checkpointing=args.grad_checkpointing, bf16=args.bf16, seed=args.seed,
        out_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every, resume_from=args.resume,
        eval_data=eval_data, eval_every=args.eval_every, progress=not args.no_progress,
    )

    peftlab.save_adapter(model, out / "adapter")
    summary = run_summary(result, params)
    if task is not None:
        summary.update(task=f"{task.name} ({task.framing})", task_metrics=list(task.metrics),
                       eval_before=eval_before, eval_after=peftlab.evaluate(model, task, tokenizer=tokenizer))
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


# --------------------------------------------------------------------------------------------
# peftlab info
# --------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    import peftlab

    sections = {
        "models": [_as_dict(m) for m in peftlab.list_models()],
        "datasets": [_as_dict(d) for d in peftlab.list_datasets()],
        "methods": [_as_dict(m) for m in peftlab.list_methods()],
        "tasks": [{"name": t.name, "description": f"({t.framing}) {t.description}", "framing": t.framing,
                   "model": t.model, "metrics": ", ".join(t.metrics)} for t in peftlab.list_tasks()],
    }
    if args.json:
        print(json.dumps(jsonable(sections), indent=1))
        return EXIT_OK
    print(f"peftlab {peftlab.__version__}")
    for title, items in sections.items():
        print(f"\n{title} ({len(items)}):" if not args.brief else f"{title}:")
        width = max((len(str(it.get("name", ""))) for it in items), default=0)
        for item in items:
            name = str(item.get("name", "?"))
            if args.brief:
                print(f"  {name:<{width}}  {_shorten(str(item.get('description', '')), 70)}")
            else:
                print(f"  {name:<{width}}  {item.get('description', '')}")
                details = {k: v for k, v in item.items()
                           if k not in ("name", "description") and v is not None}
                for key, value in details.items():
                    print(f"  {'':<{width}}    {key}: {_format_value(value)}")
    return EXIT_OK


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if hasattr(item, "as_dict"):
        return item.as_dict()
    if dataclasses.is_dataclass(item):
        return dataclasses.asdict(item)
    return {"name": str(item)}


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


# --------------------------------------------------------------------------------------------
# peftlab export
# --------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """Write the run as a script (peftlab.export) and say how to launch it."""
    from peftlab.export import export_script

    path = export_script(args.run_dir, args.to)
    print(f"wrote {path}\n  run it:  python {path}\n  or:      accelerate launch {path}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# peftlab bench
# --------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """``bench spectra`` times factor-based spectra; ``bench train`` (and any other) goes to
    ``peftlab.bench.main(args)``, which gets ``args.what`` and ``args.options`` (the words after
    WHAT) and returns an exit status."""
    if args.what == "spectra":
        return bench_spectra(args.options)
    if args.what == "learn":
        from peftlab import bench_learn

        return bench_learn.main(args)
    if importlib.util.find_spec("peftlab.bench") is None:
        raise ConfigError(
            f"`peftlab bench {args.what}` needs the module peftlab.bench, which this installation "
            "lacks. Expected a complete peftlab install; try `peftlab bench spectra`, or reinstall."
        )
    from peftlab import bench

    status = bench.main(args)
    return EXIT_OK if status is None else int(status)


def bench_spectra(options: list[str]) -> int:
    from peftlab.spectra import bench_spectra as run, format_bench_spectra

    p = argparse.ArgumentParser(prog="peftlab bench spectra",
                                description="Time factor-based singular values against a full SVD.")
    p.add_argument("--sizes", default="1024,2048,4096", help="d of the d x d updates (default: 1024,2048,4096)")
    p.add_argument("--ranks", default="8,16,64", help="ranks r (default: 8,16,64)")
    p.add_argument("--repeats", type=int, default=5, help="timings of the factored route; best kept")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    opts = p.parse_args(options)
    try:
        sizes = [int(x) for x in opts.sizes.split(",")]
        ranks = [int(x) for x in opts.ranks.split(",")]
    except ValueError as err:
        raise ConfigError(f"--sizes/--ranks must be comma-separated integers ({err}). "
                          "Expected e.g. --sizes 512,1024 --ranks 8,16.") from None
    rows = run(sizes=sizes, ranks=ranks, repeats=opts.repeats)
    print(json.dumps(rows, indent=1) if opts.json else format_bench_spectra(rows))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
