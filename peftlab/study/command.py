"""``peftlab study ...`` on the command line: its flags, the configuration they make, the run."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from peftlab.errors import ConfigError
from peftlab.study.config import FULL, StudyConfig
from peftlab.study.results import format_summary
from peftlab.study.running import run_study


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``peftlab study`` on ``p``, defaults from :class:`StudyConfig`."""
    d = StudyConfig()
    p.add_argument("--task", default=d.task, help=f"the task (default: {d.task})")
    p.add_argument("--framing", default=d.framing, choices=("generate", "classify", "perplexity"),
                   help=f"how the model sees the task (default: {d.framing})")
    p.add_argument("--model", help="model (default: the task's)")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated methods, '{FULL}' for full fine-tuning, each optionally with its own "
                   "settings, e.g. lora:r=64:rslora or lora:targets=all-linear:loraplus=16 (peftlab.study.specs; "
                   f"default: {','.join(d.methods)})")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR,LR",
                   help="learning rates swept for one method (repeatable; default: a sweep per method)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per cell (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per step (default: {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=d.max_length, help=f"max tokens per row (default: {d.max_length})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"rank of methods that have one (default: {d.rank})")
    p.add_argument("--backend", default=d.backend, choices=("reference", "peft", "fused"),
                   help="which implementation of each method (default: reference)")
    p.add_argument("--test-rows", type=int, help="test rows scored (default: the task's eval_limit, 200)")
    p.add_argument("--updates", default="", metavar="LAYER,LAYER",
                   help="linear layers (names or suffixes, e.g. q_proj,v_proj) whose weight change each cell "
                   "records: the spectrum of ΔW, its effective rank and intruder dimensions (default: none)")
    p.add_argument("--reduce-intruders", default="", metavar="LAMBDA,LAMBDA",
                   help="after each LoRA cell: scale its intruder dimensions by each lambda (peft's "
                   "reduce_intruder_dimension) and measure the test metric and forgetting again (default: none)")
    p.add_argument("--out", required=True, help="folder for study.json, study.csv and study.html")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` that parsed ``peftlab study`` flags describe."""
    def numbers(text: str, kind, what: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}.") from None

    lrs = []
    for item in args.lr:
        method, sep, rates = item.rpartition("=")  # a spec's own settings hold "=" too: lora:r=64=1e-3,4e-3
        if not sep or not method:
            raise ConfigError(f"--lr {item!r}: expected METHOD=LR[,LR...], e.g. --lr lora=1e-3,4e-3.")
        lrs.append((method.strip(), numbers(rates, float, f"--lr {method}")))
    return StudyConfig(task=args.task, framing=args.framing, model=args.model,
                       methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                       lrs=tuple(lrs), seeds=numbers(args.seeds, int, "--seeds"), steps=args.steps,
                       batch_size=args.batch_size, max_length=args.seq_len, rank=args.rank,
                       backend=args.backend, test_rows=args.test_rows,
                       updates=tuple(u.strip() for u in args.updates.split(",") if u.strip()),
                       reduce_intruders=numbers(args.reduce_intruders, float, "--reduce-intruders"))


def main(args: argparse.Namespace) -> int:
    """``peftlab study ...``: run (or resume) the study, print the summary."""
    config = config_from_args(args)
    command = shlex.join(["peftlab", "study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] else None
    study = run_study(config, args.out, command=command, log=lambda line: print(line, flush=True))
    print()
    print(format_summary(study))
    print(f"\nwrote {Path(args.out) / 'study.json'}, study.csv and study.html")
    failed = [c for c in study["cells"] if c["status"] != "ok"]
    for cell in failed:
        print(f"not finished: {cell['method']} lr={cell['lr']:g} seed={cell['seed']}: {cell['status']}")
    return 1 if failed else 0
