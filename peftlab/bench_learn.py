"""``peftlab bench learn``: how long until the default run has learned its task?

    peftlab bench learn                                  # sentiment on SmolLM2, 3 backends x fp32/bf16
    peftlab bench learn --backends fused --dtypes fp32 --target 0.6
    peftlab bench learn --task sentiment --framing classify --target 0.7   # MiniLM: seconds

Each (backend, dtype) trains the task's default run (its model, method, rank, learning rate,
batch and sequence length; the same seed, so the same data order and initial adapter) and
measures the task metric on the task's small fixed held-out slice every ``--eval-every`` steps.
It stops at the first measurement that reaches ``--target`` (or after ``--max-steps``) and
reports:

    steps      optimizer steps until the target was reached
    train s    seconds of training until then (the steps' own time; the measurements excluded)
    wall s     the same with the measurements included: what a user waits
    metric     the last value measured

The default target, 0.7 on sentiment's 48-row live slice, marks "has learned the task": the base
model scores 0.06 (it answers in sentences), and the default run settles at 0.69-0.73 there (0.785
on 200 test reviews) once it answers with the label word, whatever the rate or the number of steps
(tasks.py has the sweep).

"bf16" is bfloat16 autocast (``peftlab.train(bf16=True)``); backends without it say so. The
combinations run one after another in one process, so the ratios (against peft) come from one run
on one machine; on a shared machine run it twice. A benchmark, not a test.

The anchor: Raschka's *Build a Large Language Model (From Scratch)*, appendix E, fine-tunes
GPT-2 124M with LoRA to 96.67% test accuracy on SMS spam classification in 2.16 minutes on an
Apple M4 Pro (https://github.com/rasbt/LLMs-from-scratch, appendix-E). A different task and model;
the comparison is of the order of magnitude: minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peftlab.bench_options import at_least_one, known_items
from peftlab.provenance import environment, write_json

BACKENDS = ("reference", "peft", "fused")
DTYPES = ("fp32", "bf16")
ANCHOR = ("LLMs-from-scratch appendix E: GPT-2 124M + LoRA, SMS spam classification, 96.67% test "
          "accuracy in 2.16 min on an Apple M4 Pro")


@dataclass(frozen=True)
class LearnConfig:
    task: str = "sentiment"
    framing: str | None = None
    target: float = 0.7
    backends: tuple[str, ...] = BACKENDS
    dtypes: tuple[str, ...] = DTYPES
    max_steps: int | None = None  # None: the task's own number of steps (its schedule too)
    eval_every: int = 5
    seed: int = 0
    out: str = "bench-learn.json"


@dataclass
class LearnRow:
    backend: str
    dtype: str
    status: str = "ok"  # "ok", "not reached", or "failed: why"
    steps: int | None = None
    train_s: float | None = None
    wall_s: float | None = None
    metric: float | None = None
    base: float | None = None
    curve: list | None = None  # [(step, metric), ...]


def build_parser() -> argparse.ArgumentParser:
    d = LearnConfig()
    p = argparse.ArgumentParser(prog="peftlab bench learn",
                                description="Time to reach a held-out task metric, per backend and dtype.")
    p.add_argument("--task", default=d.task, help=f"the task (default: {d.task})")
    p.add_argument("--framing", choices=("generate", "classify", "perplexity"), help="default: the task's first")
    p.add_argument("--target", type=float, default=d.target,
                   help=f"metric to reach (default: {d.target}; for perplexity: at most this)")
    p.add_argument("--backends", default=",".join(d.backends), help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--dtypes", default=",".join(d.dtypes), help=f"comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="give up after this many steps, which also set the learning-rate schedule (default: the "
                        "task's own steps, as the default run)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"measure every N steps (default: {d.eval_every})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data order and adapter init")
    p.add_argument("--out", default=d.out, help=f"results file (default: {d.out})")
    return p


def parse_options(options) -> LearnConfig:
    opts = build_parser().parse_args(list(options))

    at_least_one(opts, ("max_steps", "eval_every"))
    from peftlab.tasks import load_task

    load_task(opts.task, opts.framing)  # a bad task fails before any model loads
    return LearnConfig(task=opts.task, framing=opts.framing, target=opts.target,
                       backends=known_items(opts.backends, BACKENDS, "--backends"),
                       dtypes=known_items(opts.dtypes, DTYPES, "--dtypes"), max_steps=opts.max_steps,
                       eval_every=opts.eval_every, seed=opts.seed, out=opts.out)


def run_learn(config: LearnConfig, log=print) -> list[LearnRow]:
    """Every (backend, dtype) in turn; see the module docstring."""
    from peftlab.tasks import load_task

    task = load_task(config.task, config.framing)
    rows = []
    base_cache: dict[str, float] = {}
    for backend in config.backends:
        for dtype in config.dtypes:
            row = LearnRow(backend, dtype)
            try:
                _learn(row, task, config, base_cache)
            except Exception as err:  # one broken combination must not sink the benchmark
                row.status = f"failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
            rows.append(row)
            if log:
                shown = (f"{row.steps} steps, {row.train_s:.1f} s training, {row.wall_s:.1f} s wall, "
                         f"{task.metric} {row.metric:.3f}") if row.steps else ""
                log(f"{backend:<9} {dtype}: {row.status} {shown}".rstrip())
    return rows


def _learn(row: LearnRow, task, config: LearnConfig, base_cache: dict[str, float]) -> None:
    import torch

    import peftlab

    d = task.defaults
    torch.manual_seed(config.seed)
    model, tokenizer = peftlab.load_model(task.model, num_labels=task.num_labels)
    if task.model not in base_cache:
        base_cache[task.model] = peftlab.evaluate(model, task, tokenizer=tokenizer, limit=task.live_eval_limit)[task.metric]
    row.base = base_cache[task.model]
    torch.manual_seed(config.seed)
    model = peftlab.adapt(model, d.method, backend=row.backend, **d.adapt_kwargs())
    higher = task.higher_is_better
    curve: list[tuple[int, float]] = [(0, row.base)]
    train_s = 0.0

    def reached(value: float) -> bool:
        return value >= config.target if higher else value <= config.target

    def callback(record: dict, _model) -> str | None:
        nonlocal train_s
        train_s += record["step_time_s"]
        value = record.get(f"task_{task.metric}")
        if value is None:
            return None
        curve.append((record["step"], value))
        if reached(value):
            row.steps, row.train_s = record["step"], train_s
            return "stop"
        return None

    start = time.perf_counter()
    result = peftlab.train(model, task=task, tokenizer=tokenizer, steps=config.max_steps or d.steps, lr=d.lr,
                           batch_size=d.batch_size, max_length=d.max_length, eval_every=config.eval_every,
                           bf16=row.dtype == "bf16", seed=config.seed, callbacks=[callback], progress=False)
    row.wall_s = time.perf_counter() - start
    row.curve = curve
    row.metric = curve[-1][1]
    if result.stop_reason == "nan":
        row.status = "failed: the loss became NaN"
    elif row.steps is None:
        row.status = "not reached"
        row.steps, row.train_s = len(result.history), train_s


def format_table(rows: list[LearnRow], config: LearnConfig) -> str:
    from peftlab.tasks import load_task

    task = load_task(config.task, config.framing)
    d = task.defaults
    head = (f"time to held-out {task.metric} {'>=' if task.higher_is_better else '<='} {config.target} on "
            f"{task.name} ({task.framing}, {task.live_eval_limit} rows, measured every {config.eval_every} "
            f"steps): {task.model}, {d.method} r={d.r} alpha={d.alpha:g}, lr {d.lr:g}, batch {d.batch_size}")
    lines = [head, f"{'backend':<10} {'dtype':<5} {'steps':>5} {'train s':>8} {'wall s':>7} {task.metric:>9}  "
             f"{'train s / peft':>14}  status"]
    peft = {r.dtype: r.train_s for r in rows if r.backend == "peft" and r.status == "ok"}
    for r in rows:
        if r.steps is None:
            lines.append(f"{r.backend:<10} {r.dtype:<5} {r.status}")
            continue
        ratio = f"{r.train_s / peft[r.dtype]:.2f}x" if r.status == "ok" and peft.get(r.dtype) else ""
        lines.append(f"{r.backend:<10} {r.dtype:<5} {r.steps:>5} {r.train_s:>8.1f} {r.wall_s:>7.1f} "
                     f"{r.metric:>9.3f}  {ratio:>14}  {r.status}")
    base = next((r.base for r in rows if r.base is not None), None)
    if base is not None:
        lines.append(f"base model (untrained adapter): {task.metric} {base:.3f}")
    env = environment()
    lines.append(f"{env['cpu']}, kernels {env['kernels']}, {env['torch_threads']} threads, torch {env['torch']}")
    lines.append(f"anchor: {ANCHOR}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``peftlab bench learn`` (called by peftlab.cli with ``args.options``)."""
    config = parse_options(args.options)
    rows = run_learn(config, log=lambda line: print(line, flush=True))
    table = format_table(rows, config)
    print()
    print(table)
    write_json(Path(config.out), {"config": asdict(config), "rows": [asdict(r) for r in rows],
                                  "table": table, "environment": environment(), "anchor": ANCHOR})
    print(f"\nwrote {config.out}")
    return 0 if all(r.status == "ok" for r in rows) else 1


__all__ = ["ANCHOR", "LearnConfig", "LearnRow", "format_table", "main", "parse_options", "run_learn"]
