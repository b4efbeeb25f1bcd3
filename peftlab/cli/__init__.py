"""The ``peftlab`` command: ``peftlab train | info | bench | export``.

    peftlab train --model smollm2-135m --data chatterbot-qa --method lora --rank 8 --steps 30 --out DIR
    peftlab info [--brief] [--json]
    peftlab bench train|spectra|learn|serve|deploy [options...]
    peftlab study --out DIR                   # methods x learning rates x seeds on one task
    peftlab export RUN_DIR --to script.py     # a transformers + peft script for accelerate launch
    peftlab runs [--compare RUN RUN ...]      # runs stored by `train --report-to trackio`

``train`` runs offline on the bundled models and data, prints a summary table and writes to DIR:

    adapter/        the trained adapter, PEFT format (peftlab.load_adapter or peft can load it)
    checkpoints/    resumable checkpoints (``--checkpoint-every N``; always one at the end)
                    (and runs/: TensorBoard event files with ``--report-to tensorboard``)
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
import os
import sys

from peftlab.cli.commands import bench_spectra, cmd_bench, cmd_export, cmd_info
from peftlab.cli.exits import EXIT_INTERRUPTED, EXIT_NAN, EXIT_OK, EXIT_USAGE
from peftlab.cli.train import (UNTASKED_DEFAULTS, apply_task_defaults, cmd_train, format_summary, load_model_for,
                               memory_ledger, method_hyperparameters, parse_targets, reproduce_command,
                               resolved_config, run_summary)
from peftlab.errors import PeftlabError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``peftlab`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Learn and prototype parameter-efficient fine-tuning (PEFT).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,info,bench,study,export,runs}")

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
    t.add_argument("--loraplus-lr-ratio", type=float,
                   help="LoRA+: B's learning rate = this x --lr (e.g. 16; default: off)")
    t.add_argument("--lora-fa", action="store_true", help="LoRA-FA: A frozen, B's gradient projected (LoRA methods)")
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
    t.add_argument("--report-to", help="log config, parameter count and metrics to trackio, tensorboard, "
                   "'all' (comma-separated; default: none); `peftlab runs` lists the trackio runs")

    i = sub.add_parser("info", help="list bundled models, datasets and methods")
    i.add_argument("--brief", action="store_true", help="one short line per item")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    b = sub.add_parser("bench", help="benchmarks: training step speed, spectra of ΔW, time to learn a task, "
                       "serving many adapters, inference latency of unmerged adapters",
                       description="Run a benchmark. Words after WHAT are passed on to it.")
    b.add_argument("what", choices=("train", "spectra", "learn", "serve", "deploy"),
                   help="which benchmark: a training step's speed and memory, spectra of ΔW, the time to learn "
                   "the default task, generating for a mixed batch of adapters, or the inference latency of "
                   "adapters left unmerged")
    b.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark")

    s = sub.add_parser("study", help="compare methods on a task: methods x learning rates x seeds, resumable",
                       description="Run (or resume) a method study on one task; writes study.json, "
                       "study.csv and study.html to --out. See peftlab.study.")
    from peftlab.study import add_arguments

    add_arguments(s)

    r = sub.add_parser("runs", help="list or compare the runs stored by --report-to trackio",
                       description="List the runs in the local trackio store, or compare some of them.")
    from peftlab.tracking import add_arguments as add_runs_arguments

    add_runs_arguments(r)

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
        if args.command == "runs":
            from peftlab.tracking import cmd_runs

            return cmd_runs(args)
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


__all__ = [
    "EXIT_INTERRUPTED", "EXIT_NAN", "EXIT_OK", "EXIT_USAGE", "UNTASKED_DEFAULTS", "apply_task_defaults", "bench_spectra",
    "build_parser", "cmd_bench", "cmd_export", "cmd_info", "cmd_train", "format_summary", "load_model_for", "main",
    "memory_ledger", "method_hyperparameters", "parse_targets", "reproduce_command", "resolved_config", "run_summary",
]
