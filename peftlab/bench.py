"""``peftlab bench train``: one training step through six implementations, side by side.

    peftlab bench train                                   # SmolLM2-135M, 4 x 128 tokens, r=16, fp32 + bf16
    peftlab bench train --model tiny-llama --repeats 1    # a smoke run, seconds
    peftlab bench train --only peft-lora,fused-lora --dtypes bf16 --repeats 5 --out runs/bench.html

Variants (same model, same random tokens, same rank, all linear layers, fused AdamW, no dropout):

    frozen       the frozen base model's own step: forward with labels, backward down to its input
                 embeddings, nothing trains -- the least any adapter can cost (fused LoRA's target)
    full         full fine-tuning: every weight trains (the baseline adapters are meant to beat)
    peft-lora    Hugging Face peft LoRA
    compiled-peft-lora  the same under torch.compile (what a user tries first; compiled in the warm-up)
    ref-lora     peftlab's reference LoRA (peftlab/methods/lora.py)
    fused-lora   peftlab's fused LoRA kernels + fused cross-entropy (peftlab/production/fused/)
    bnb-qlora    peft LoRA on a bitsandbytes NF4 (double-quant) base: the QLoRA recipe
    fused-qlora  peftlab's fused LoRA on the same NF4 base

How it is measured, and why:

- Interleaved. All variants of one dtype are loaded, then take turns, round after round
  (A B C D E F A B C ...), after one warm-up step each (first-step allocations, lazy init). On a
  machine shared with other work a slow spell then slows every variant alike, and the *median*
  step time is reported. Ratios (fused / peft) come from the same run, never from two runs: the
  ratio of the medians, and the "paired" ratio (median over rounds of each round's own ratio).
- Peak memory of a step = the peak above what was resident just before it (activations,
  gradients, optimiser states, temporaries); "total" = resident + that peak. CUDA: allocated
  bytes (``torch.cuda.max_memory_allocated``), read during the timed steps. CPU: the process's
  peak RSS (Linux VmHWM, reset before the step), read in a separate child process that loads one
  variant at a time: glibc keeps freed memory, which would hide a step's peak, so the child
  lowers glibc's mmap threshold (``mallopt``) and large tensors go back to the OS at once. That
  setting makes every allocation a fresh page-faulted mapping (CPU steps ~1.5x slower, and
  unevenly so), so the timed steps run in the parent with the allocator as users have it.
- "bf16" loads the weights in bfloat16 (no autocast: the fused kernels run their own dtype);
  QLoRA's compute dtype is the run's dtype. peft's QLoRA here skips
  ``prepare_model_for_kbit_training`` (which would up-cast norms and turn on gradient
  checkpointing) so that every variant does the same work.

- Against the machine: each step's matmul FLOPs are counted from the shapes and divided by its
  median time (GFLOP/s), and a 2048³ matmul in the same dtype, measured in the same run before any
  model loads, gives the peak they are a fraction of (peftlab/bench_peak.py). The table names the
  CPU, AVX-512 or not, and the kernels PyTorch uses (forced ones too).

This is a benchmark, not a test: figures depend on the machine and its load (the table prints the
load average on Linux). Writes ``--out`` (default ``bench.html``: plotly charts, one per dtype)
and ``bench.json`` next to it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.bench_options import at_least_one, known_items
from peftlab.errors import ConfigError

VARIANTS = ("frozen", "full", "peft-lora", "compiled-peft-lora", "ref-lora", "fused-lora", "bnb-qlora", "fused-qlora")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# pairs shown as ratios: fused vs peft (the targets), fused vs the frozen base, reference vs peft
RATIO_PAIRS = (("fused-lora", "peft-lora"), ("fused-qlora", "bnb-qlora"), ("fused-lora", "frozen"),
               ("fused-lora", "compiled-peft-lora"), ("compiled-peft-lora", "peft-lora"), ("ref-lora", "peft-lora"))


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    batch: int = 4
    seq_len: int = 128
    rank: int = 16
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    repeats: int = 5  # rounds of interleaved turns
    steps: int = 1  # measured steps per variant per round
    only: tuple[str, ...] = VARIANTS
    out: str = "bench.html"
    seed: int = 0


@dataclass
class BenchRow:
    """One variant at one dtype. ``status`` is "ok", or "unavailable: why" / "failed: why"."""

    dtype: str
    variant: str
    status: str = "ok"
    median_s: float | None = None
    min_s: float | None = None
    peak_mb: float | None = None  # above resident before the step (max over measured steps)
    resident_mb: float | None = None  # resident before the step
    total_mb: float | None = None  # resident + peak
    loss: float | None = None
    trainable: int | None = None
    times: list[float] = field(default_factory=list)
    gflop: float | None = None  # matmul work of one step, counted from the shapes (bench_peak.py)
    gflops: float | None = None  # gflop / median_s
    peak_gflops: float | None = None  # the dtype's peak GEMM rate, measured in the same run
    peak_fraction: float | None = None  # gflops / peak_gflops


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab bench train",
                                description="Time one training step: the frozen base, full fine-tuning, peft LoRA, "
                                "peftlab reference and fused LoRA, bitsandbytes QLoRA, fused QLoRA.")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, folder or hub id (default: smollm2-135m)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default: 128)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r, alpha = 2r (default: 16)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: fp32,bf16)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--steps", type=int, default=1, help="measured steps per variant per round (default: 1)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--out", default="bench.html", help="chart file; bench.json goes next to it (default: bench.html)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens and adapter init")
    return p


def parse_options(options: Sequence[str]) -> BenchConfig:
    opts = build_parser().parse_args(list(options))
    dtypes = known_items(opts.dtypes, DTYPES, "--dtypes")
    only = known_items(opts.only, VARIANTS, "--only") if opts.only is not None else VARIANTS
    at_least_one(opts, ("batch", "seq_len", "rank", "repeats", "steps"))
    return BenchConfig(model=opts.model, batch=opts.batch, seq_len=opts.seq_len, rank=opts.rank,
                       dtypes=dtypes, repeats=opts.repeats, steps=opts.steps, only=only,
                       out=opts.out, seed=opts.seed)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``peftlab bench train`` (called by peftlab.cli with ``args.options``)."""
    if args.what != "train":
        raise ConfigError(f"peftlab.bench runs `bench train`, not {args.what!r}.")
    config = parse_options(args.options)
    rows = run_bench(config, log=lambda line: print(line, flush=True))
    print()
    print(format_table(rows, config))
    out = Path(config.out)
    write_outputs(rows, config, out)
    print(f"\nwrote {out} and {out.with_name('bench.json')}")
    return 0


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def run_bench(config: BenchConfig, log: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Run every dtype's variants interleaved; returns one row per (dtype, variant)."""
    import torch

    from peftlab.progress import progress_bar

    from peftlab.bench_peak import PEAK_SIZE, peak_gflops

    rows: list[BenchRow] = []
    device = _bench_device()
    bar = progress_bar(len(config.dtypes) * config.repeats, desc="bench", unit="round")  # quiet in CI
    for dtype_name in config.dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        gemm_peak = peak_gflops(dtype, device)  # before any model: the machine alone
        if log:
            log(f"[{dtype_name}] peak GEMM ({PEAK_SIZE}³ matmul): {gemm_peak:,.1f} GFLOP/s")
        steps: dict[str, Callable[[], float]] = {}
        by_variant: dict[str, BenchRow] = {}
        for variant in config.only:
            row = BenchRow(dtype_name, variant, peak_gflops=gemm_peak)
            by_variant[variant] = row
            reason = unavailable_reason(variant)
            if reason:
                row.status = f"unavailable: {reason}"
                continue
            try:
                steps[variant], row.trainable = _build_step(variant, config, dtype)
                row.gflop = steps[variant].flops / 1e9
            except Exception as err:  # one broken variant must not sink the benchmark
                row.status = f"failed: {type(err).__name__}: {_first_line(err)}"
            if log:
                log(f"[{dtype_name}] {variant}: {row.status}")
        for variant, step in list(steps.items()):  # warm-up
            try:
                by_variant[variant].loss = step()
            except Exception as err:
                by_variant[variant].status = f"failed: {type(err).__name__}: {_first_line(err)}"
                del steps[variant]
        peaks: dict[str, list[float]] = {v: [] for v in steps}
        for round_ in range(config.repeats):
            for variant, step in steps.items():
                row = by_variant[variant]
                for _ in range(config.steps):
                    seconds, peak, row.resident_mb = _measured_step(step, device)
                    row.times.append(seconds)
                    peaks[variant].append(peak)
                if log:
                    log(f"[{dtype_name}] round {round_ + 1}/{config.repeats} {variant}: {row.times[-1]:.3f} s")
            bar.update()
        measured = list(steps)
        steps.clear()
        gc.collect()  # free this dtype's models before loading the next (or the memory child's)
        if device.type != "cuda" and measured:
            memory = memory_in_child(config, dtype_name, measured)
            for variant in measured:
                peaks[variant] = [memory[variant][0]]
                by_variant[variant].resident_mb = memory[variant][1]
        for variant in measured:
            row = by_variant[variant]
            row.median_s = statistics.median(row.times)
            row.min_s = min(row.times)
            row.peak_mb = max(max(peaks[variant]), 0.0)
            row.total_mb = row.resident_mb + row.peak_mb
            row.gflops = row.gflop / row.median_s
            row.peak_fraction = row.gflops / gemm_peak
            if log:
                log(f"[{dtype_name}] {variant}: peak +{row.peak_mb:,.0f} MB above {row.resident_mb:,.0f} MB")
        rows.extend(by_variant[v] for v in config.only)
    bar.close()
    return rows


def memory_in_child(config: BenchConfig, dtype_name: str, variants: Sequence[str]) -> dict[str, tuple[float, float]]:
    """{variant: (peak MB above resident, resident MB)} of one step, measured in a fresh process.

    The child lowers glibc's mmap threshold (see the module docstring) and loads one variant at a
    time: warm-up step (optimiser states exist from then on), then one measured step.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_memory_child, (config, dtype_name, tuple(variants)))


def _memory_child(config: BenchConfig, dtype_name: str, variants: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    import torch

    _release_freed_memory_to_os()
    device = _bench_device()
    out = {}
    for variant in variants:
        step, _ = _build_step(variant, config, getattr(torch, DTYPES[dtype_name]))
        step()
        out[variant] = _measured_step(step, device)[1:]
        del step
        gc.collect()
    return out


def _measured_step(step: Callable[[], float], device) -> tuple[float, float, float]:
    """(seconds, peak MB above resident, resident MB) of one ``step()``."""
    gc.collect()
    _sync(device)
    resident = current_memory_mb(device)
    reset_peak(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start, peak_mb(device) - resident, resident


def unavailable_reason(variant: str) -> str | None:
    """Why ``variant`` cannot run in this installation, or None."""
    import importlib.util

    from peftlab.api import BACKENDS

    if variant.startswith("fused") and "fused" not in BACKENDS:
        return "peftlab.adapt has no backend='fused' in this version"
    if variant in ("peft-lora", "compiled-peft-lora", "bnb-qlora") and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    if variant.startswith("compiled") and _bench_device().type == "cpu" and not _has_cxx():
        return "torch.compile needs a C++ compiler on a CPU (g++ or clang++); none was found"
    if variant.endswith("qlora") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


def _has_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))


def _build_step(variant: str, config: BenchConfig, dtype) -> tuple[Callable[[], float], int]:
    """Load and adapt a fresh model for ``variant``; returns (one training step, trainable count)."""
    import torch

    from peftlab import xlora_io  # noqa: F401 (registers X-LoRA's method hooks)
    from peftlab.api import adapt
    from peftlab.metrics import count_parameters
    from peftlab.models import load_model

    device = _bench_device()
    quantization = "nf4" if variant.endswith("qlora") else None
    model, _ = load_model(config.model, quantization=quantization, dtype=dtype,
                          device=device if quantization is None else None)
    model.train()
    torch.manual_seed(config.seed)
    from peftlab.bench_peak import step_flops

    flops = step_flops(model, variant, config.batch, config.seq_len, config.rank)
    if variant in ("full", "frozen"):
        for p in model.parameters():
            p.requires_grad_(variant == "full")
    else:
        backend = {"peft-lora": "peft", "compiled-peft-lora": "peft", "bnb-qlora": "peft",
                   "ref-lora": "reference"}.get(variant, "fused")
        model = adapt(model, "lora", backend=backend, r=config.rank, alpha=2.0 * config.rank,
                      targets="all-linear")
    model_device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (config.batch, config.seq_len),
                              generator=generator).to(model_device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if params:  # PyTorch's fused AdamW kernel where it has one: the optimiser is not what is compared
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=model_device.type in ("cpu", "cuda") or None)
    embed = model.get_input_embeddings()
    forward = torch.compile(model) if variant.startswith("compiled") else model  # compiles on the first step

    def step() -> float:
        if optimizer is None:  # frozen: the gradient goes down to the input embeddings only
            embeds = embed(input_ids).detach().requires_grad_()
            loss = model(inputs_embeds=embeds, labels=input_ids).loss
        else:
            loss = forward(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step.model = model  # keep the model alive as long as the step
    step.flops = flops
    return step, count_parameters(model).trainable


# --------------------------------------------------------------------------------------------
# Memory and devices
# --------------------------------------------------------------------------------------------
def _bench_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_memory_mb(device) -> float:
    """What is resident now: CUDA allocated bytes, else the process RSS (MB)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    from peftlab.memory import process_rss_bytes

    return process_rss_bytes() / 2**20


def reset_peak(device) -> None:
    from peftlab.memory import reset_peak_memory

    reset_peak_memory(device)


def peak_mb(device) -> float:
    from peftlab.memory import peak_memory_mb

    return peak_memory_mb(device)


def _release_freed_memory_to_os() -> None:
    """glibc: serve allocations >= 64 KiB by mmap, so that freed tensors leave the RSS at once.

    Without this a step's freed activations stay in the heap and the next variant's peak RSS
    rises less than its real need (the same as ``MALLOC_MMAP_THRESHOLD_=65536`` in the shell).
    """
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # mallopt's parameter number, from glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 65536)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def ratios(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    """fused / peft time and peak-memory ratios per dtype, from the same run (< 1: fused wins).

    "time" divides the median step times; "paired" is the median over rounds of each round's own
    ratio (the two steps ran seconds apart), which a slow spell of the machine disturbs less.
    """
    out = []
    index = {(r.dtype, r.variant): r for r in rows}
    for dtype in dict.fromkeys(r.dtype for r in rows):
        for num, den in RATIO_PAIRS:
            a, b = index.get((dtype, num)), index.get((dtype, den))
            if not (a and b and a.status == b.status == "ok"):
                continue
            paired = [x / y for x, y in zip(a.times, b.times)]  # same round, one after the other
            out.append({"dtype": dtype, "pair": f"{num} / {den}",
                        "time": a.median_s / b.median_s,
                        "paired": statistics.median(paired) if paired else math.nan,
                        "peak": a.peak_mb / b.peak_mb if b.peak_mb else math.nan,
                        "total": a.total_mb / b.total_mb if b.total_mb else math.nan})
    return out


def format_table(rows: Sequence[BenchRow], config: BenchConfig) -> str:
    """An aligned text table, one line per (dtype, variant), then the ratios and the context."""
    header = ("dtype", "variant", "step s (median)", "min s", "GFLOP/s", "of peak", "peak MB", "total MB",
              "trainable", "loss")
    lines = []
    for r in rows:
        if r.status != "ok":
            lines.append((r.dtype, r.variant, r.status) + ("",) * (len(header) - 3))
            continue
        rate = ("", "") if r.gflops is None else (f"{r.gflops:,.1f}", f"{r.peak_fraction:.0%}")
        lines.append((r.dtype, r.variant, f"{r.median_s:.3f}", f"{r.min_s:.3f}", *rate, f"{r.peak_mb:,.0f}",
                      f"{r.total_mb:,.0f}", f"{r.trainable:,}", f"{r.loss:.4f}"))
    ok_lines = [line for r, line in zip(rows, lines) if r.status == "ok"]
    widths = [max([len(h)] + [len(line[i]) for line in ok_lines]
                  + ([len(line[i]) for line in lines] if i < 2 else [])) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    text = [_context_line(config, rows), fmt(header), "  ".join("-" * w for w in widths)]
    for line in lines:
        text.append(fmt(line) if not line[2].startswith(("unavail", "failed"))
                    else f"{line[0].ljust(widths[0])}  {line[1].ljust(widths[1])}  {line[2]}")
    rat = ratios(rows)
    if rat:
        text.append("")
        text.append("ratios from this run (< 1: the first is faster / smaller):")
        for r in rat:
            text.append(f"  {r['dtype']:<5} {r['pair']:<38} time {r['time']:.2f}x (paired "
                        f"{r['paired']:.2f}x)   peak {r['peak']:.2f}x   total {r['total']:.2f}x")
    text.append("")
    text.append("peak MB: above what was resident before the step; total MB: resident + peak "
                + ("(CUDA allocated)." if _bench_device().type == "cuda" else
                   "(process RSS, one variant per process, freed memory returned at once).")
                + " Step times: the allocator as users have it.")
    return "\n".join(text)


def _peaks(rows: Sequence[BenchRow]) -> dict[str, float]:
    return {r.dtype: r.peak_gflops for r in rows if r.peak_gflops is not None}


def _context_line(config: BenchConfig, rows: Sequence[BenchRow] = ()) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    from peftlab.bench_peak import PEAK_SIZE, machine_line

    peaks = ", ".join(f"{d} {g:,.1f}" for d, g in _peaks(rows).items())
    return (f"{config.model}, batch {config.batch} x {config.seq_len} tokens, LoRA r={config.rank} "
            f"alpha={2 * config.rank} all-linear, fused AdamW; {config.repeats} interleaved rounds x "
            f"{config.steps} step(s); {device}{load}\n{machine_line()}"
            + (f"; peak GEMM ({PEAK_SIZE}³ matmul, GFLOP/s): {peaks}" if peaks else ""))


def write_outputs(rows: Sequence[BenchRow], config: BenchConfig, out: Path) -> None:
    """``out`` (html: one benchmark_bars chart per dtype) and ``bench.json`` next to it."""
    from peftlab.plots import benchmark_bars

    out.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for dtype in dict.fromkeys(r.dtype for r in rows):
        ok = [{"name": r.variant, "step_time_s": r.median_s, "peak_mb": r.peak_mb}
              for r in rows if r.dtype == dtype and r.status == "ok"]
        if not ok:
            continue
        fig = benchmark_bars(ok, title=f"peftlab bench train: {config.model}, {dtype}, "
                                       f"{config.batch} x {config.seq_len}, r={config.rank}")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=not parts))
    table = format_table(rows, config)
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>peftlab bench train</title></head>"
            "<body>" + "".join(parts) + "<pre>" + _escape(table) + "</pre></body></html>")
    out.write_text(html)
    from peftlab.bench_peak import machine_line

    data = {"config": asdict(config), "rows": [asdict(r) for r in rows], "ratios": ratios(rows),
            "machine": machine_line(), "peak_gflops": _peaks(rows),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    out.with_name("bench.json").write_text(json.dumps(data, indent=1))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:160]


__all__ = ["VARIANTS", "BenchConfig", "BenchRow", "build_parser", "format_table", "main",
           "parse_options", "ratios", "run_bench", "unavailable_reason", "write_outputs"]
