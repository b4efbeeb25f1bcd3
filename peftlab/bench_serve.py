"""``peftlab bench serve``: one base model, many LoRA adapters, a mixed batch - side by side.

    peftlab bench serve                                   # SmolLM2-135M, batch 16 and 64, 1/4/16/64 adapters
    peftlab bench serve --model tiny-llama --batches 8 --adapters 1,4 --repeats 1   # a smoke run

Row i of the batch asks for adapter i mod N (then shuffled with a fixed seed, so the rows that
share an adapter are not contiguous, as requests arrive). Variants, all greedy, same tokens in:

    merged       one adapter merged into the base, for every row: the plain model's speed, the
                 floor a mixed batch is measured against
    peft         Hugging Face peft's mixed batch (``generate(adapter_names=...)``): per layer, a
                 loop over the adapters present, indexing their rows
    reference    peftlab's reference (peftlab/inject/gather.py): stack, gather, two einsums, every call
    fused        peftlab's fused backend (peftlab/production/fused/gather.py): each row's factors
                 gathered once per batch, then two batched matmuls per layer at every step
    per-request  the naive way: for each adapter in the batch, merge it, generate its rows, unmerge

Each variant generates ``--new-tokens`` tokens after a ``--prompt-len`` prompt with the KV cache:
tokens/s = batch x new tokens / the generate call's time; latency = that time (every request waits
for its batch). Variants take turns round after round (interleaved, after one warm-up each) and
medians are reported, so a slow spell on a shared machine slows all alike. Memory: the tensors of
N adapters beside one base, against N merged copies of the model. Every variant's tokens are
compared with peft's (``same``: the share of rows identical).

A benchmark, not a test: the figures depend on the machine and its load (printed with them).
Writes ``--out`` (json) and a chart next to it (html).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peftlab.bench_options import at_least_one, known_items
from peftlab.errors import ConfigError

VARIANTS = ("merged", "peft", "reference", "fused", "per-request")


@dataclass(frozen=True)
class ServeConfig:
    model: str = "smollm2-135m"
    batches: tuple[int, ...] = (16, 64)  # requests per batch
    adapters: tuple[int, ...] = (1, 4, 16, 64)  # distinct adapters among them
    rank: int = 8  # LoRA rank of every adapter, alpha = 2r, all linear layers
    prompt_len: int = 16  # prompt tokens per request
    new_tokens: int = 8  # generated tokens per request (greedy, KV cache)
    repeats: int = 3  # interleaved rounds
    only: tuple[str, ...] = VARIANTS
    out: str = "bench_serve.json"
    seed: int = 0


@dataclass
class ServeRow:
    """One variant at one (batch, adapters). ``status`` is "ok" or "failed: why"."""

    batch: int
    adapters: int
    variant: str
    status: str = "ok"
    median_s: float | None = None
    tokens_per_s: float | None = None
    same_as_peft: float | None = None  # share of rows whose tokens equal peft's
    times: list[float] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab bench serve", description="Generate for a mixed batch of "
                                "requests, each with its own LoRA adapter: peft, peftlab reference and fused, "
                                "merging per request, and one merged model.")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, folder or hub id (default: smollm2-135m)")
    p.add_argument("--batches", default="16,64", help="comma-separated requests per batch (default: 16,64)")
    p.add_argument("--adapters", default="1,4,16,64", help="comma-separated distinct adapters (default: 1,4,16,64)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r, alpha = 2r, all linear layers (default: 8)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request (default: 16)")
    p.add_argument("--new-tokens", type=int, default=8, help="generated tokens per request (default: 8)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--out", default="bench_serve.json", help="results (json); a chart goes next to it (html)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, adapter weights and row order")
    return p


def _counts(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r} is invalid. Expected comma-separated positive integers, e.g. 16,64.")
    return values


def parse_options(options: Sequence[str]) -> ServeConfig:
    opts = build_parser().parse_args(list(options))
    only = known_items(opts.only, VARIANTS, "--only") if opts.only else VARIANTS
    at_least_one(opts, ("rank", "prompt_len", "new_tokens", "repeats"))
    return ServeConfig(model=opts.model, batches=_counts(opts.batches, "--batches"),
                       adapters=_counts(opts.adapters, "--adapters"), rank=opts.rank, prompt_len=opts.prompt_len,
                       new_tokens=opts.new_tokens, repeats=opts.repeats, only=only, out=opts.out,
                       seed=opts.seed)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``peftlab bench serve`` (called by peftlab.cli with ``args.options``)."""
    config = parse_options(args.options)
    rows, memory = run_serve(config, log=lambda line: print(line, flush=True))
    print()
    print(format_table(rows, memory, config))
    out = Path(config.out)
    write_outputs(rows, memory, config, out)
    print(f"\nwrote {out} and {out.with_suffix('.html')}")
    return 0


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
class Served:
    """The models every variant runs: peftlab's (reference and fused share its tensors), peft's
    copy of the same adapters, and a base with adapter 0 merged."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        import peftlab

        base, tokenizer = peftlab.load_model(config.model)
        self.eos = tokenizer.eos_token_id
        base.eval()
        self.names = [f"user{i}" for i in range(max(config.adapters))]
        ours = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(config.seed)
        for i, name in enumerate(self.names):
            if i == 0:
                peftlab.adapt(ours, "lora", r=config.rank, alpha=2.0 * config.rank, targets="all-linear",
                              adapter_name=name)
            else:
                peftlab.add_adapter(ours, name, "lora", r=config.rank, alpha=2.0 * config.rank, targets="all-linear")
        with torch.no_grad():
            for pname, param in ours.named_parameters():
                if ".lora_B" in pname:  # a fresh LoRA is the identity: give every adapter its own update
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        self.ours = ours.eval().requires_grad_(False)
        self.base = base
        self.merged = self._merged(base)
        self.peft = self._peft(base) if "peft" in config.only else None

    def _merged(self, base):
        import peftlab
        from peftlab.production.hf_peft import load_reference_state_dict, reference_state_dict
        from peftlab.state import records

        merged = copy.deepcopy(base)
        record = records(self.ours)[self.names[0]]
        peftlab.adapt(merged, "lora", **{f: getattr(record.config, f) for f in ("r", "alpha", "targets")})
        load_reference_state_dict(merged, reference_state_dict(self.ours, self.names[0]))
        return peftlab.merge(merged).eval()

    def _peft(self, base):
        from peftlab.methods import get_method
        from peftlab.production.hf_peft import copy_reference_to_peft, import_peft, to_peft_config

        from peftlab.state import records

        peft = import_peft()
        recs = records(self.ours)
        model = copy.deepcopy(base)
        configs = {n: to_peft_config(get_method("lora"), recs[n].config, model) for n in self.names}
        pm = peft.get_peft_model(model, configs[self.names[0]], adapter_name=self.names[0])
        for name in self.names[1:]:
            pm.add_adapter(name, configs[name])
        for name in self.names:
            copy_reference_to_peft(self.ours, pm, name)
        return pm.eval()

    def memory(self, counts: Sequence[int]) -> list[dict]:
        """Bytes of N adapters' tensors beside one base, against N merged copies of the model."""
        base_bytes = sum(p.numel() * p.element_size() for p in self.base.parameters())
        per_adapter = sum(p.numel() * p.element_size() for n, p in self.ours.named_parameters()
                          if f".adapters.{self.names[0]}." in n)
        return [{"adapters": n, "one_base_plus_adapters_mb": (base_bytes + n * per_adapter) / 2**20,
                 "merged_copies_mb": n * base_bytes / 2**20} for n in counts]


def request_names(names: Sequence[str], batch: int, adapters: int, seed: int) -> list[str]:
    """Row i asks for adapter i mod N, in a shuffled order (requests do not arrive grouped)."""
    rows = [names[i % adapters] for i in range(batch)]
    random.Random(seed).shuffle(rows)
    return rows


def _generators(served: Served, ids, names: list[str], config: ServeConfig) -> dict[str, tuple[Callable, Callable]]:
    """{variant: (prepare, run)}: ``prepare`` (not timed) puts the shared peftlab model on the
    variant's backend, ``run`` generates for the whole batch and returns the tokens."""
    import torch

    from peftlab import compose
    from peftlab.api import merge, unmerge
    from peftlab.production import fused

    mask = torch.ones_like(ids)
    settings = dict(max_new_tokens=config.new_tokens, do_sample=False, pad_token_id=served.eos)

    def nothing() -> None:
        return None

    def on_fused() -> None:
        fused.fuse(served.ours, loss=False)

    def on_reference() -> None:
        fused.unfuse(served.ours)

    def mixed():
        return served.ours.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)

    def per_request():
        out = torch.empty(ids.shape[0], ids.shape[1] + config.new_tokens, dtype=ids.dtype)
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name])
            compose.set_adapter(served.ours, name)
            merge(served.ours)
            try:
                out[rows] = served.ours.generate(input_ids=ids[rows], attention_mask=mask[rows], **settings)
            finally:
                unmerge(served.ours)
        return out

    runs = {
        "merged": (nothing, lambda: served.merged.generate(input_ids=ids, attention_mask=mask, **settings)),
        "peft": (nothing, lambda: served.peft.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                                       **settings)) if served.peft is not None else None,
        "reference": (on_reference, mixed),
        "fused": (on_fused, mixed),
        "per-request": (on_reference, per_request),
    }
    return {v: runs[v] for v in config.only if runs[v] is not None}


def run_serve(config: ServeConfig, log: Callable[[str], None] | None = None) -> tuple[list[ServeRow], list[dict]]:
    """Every (batch, adapters) cell, its variants interleaved; returns the rows and the memory table."""
    import torch

    log = log or (lambda line: None)
    log(f"loading {config.model} with {max(config.adapters)} LoRA adapters (r={config.rank}, all-linear)")
    served = Served(config)
    vocab = served.base.config.vocab_size
    rows: list[ServeRow] = []
    for batch in config.batches:
        ids = torch.randint(0, vocab, (batch, config.prompt_len), generator=torch.Generator().manual_seed(config.seed))
        for adapters in config.adapters:
            names = request_names(served.names, batch, adapters, config.seed)
            cell = _run_cell(served, ids, names, config)
            for row in cell:
                row.batch, row.adapters = batch, adapters
                log(f"batch {batch:3d}, {adapters:3d} adapters, {row.variant:11s} " + (
                    f"{row.median_s:.3f} s  {row.tokens_per_s:8.1f} tokens/s" if row.status == "ok" else row.status))
            rows.extend(cell)
    return rows, served.memory(config.adapters)


def _run_cell(served: Served, ids, names: list[str], config: ServeConfig) -> list[ServeRow]:
    import torch

    runs = _generators(served, ids, names, config)
    rows = {v: ServeRow(batch=0, adapters=0, variant=v) for v in runs}
    outputs = {}
    with torch.inference_mode():
        for variant, (prepare, run) in runs.items():  # a warm-up each, whose tokens are compared
            try:
                prepare()
                outputs[variant] = run()
            except Exception as err:  # noqa: BLE001 - a failed variant is reported, the others run
                rows[variant].status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        for _ in range(config.repeats):
            for variant, (prepare, run) in runs.items():
                if rows[variant].status != "ok":
                    continue
                prepare()
                start = time.perf_counter()
                run()
                rows[variant].times.append(time.perf_counter() - start)
    reference = outputs.get("peft")
    for variant, row in rows.items():
        if row.status != "ok":
            continue
        row.median_s = statistics.median(row.times)
        row.tokens_per_s = ids.shape[0] * config.new_tokens / row.median_s
        if reference is not None and variant in outputs:
            same = (outputs[variant] == reference).all(dim=1).float().mean().item()
            row.same_as_peft = None if variant == "merged" else same  # merged runs one adapter for all
    return list(rows.values())


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def speedups(rows: Sequence[ServeRow]) -> list[dict]:
    """Per (batch, adapters): fused vs peft throughput, and fused's time against the merged model's."""
    out = []
    for batch, adapters in dict.fromkeys((r.batch, r.adapters) for r in rows):
        cell = {r.variant: r for r in rows if (r.batch, r.adapters) == (batch, adapters) and r.status == "ok"}
        entry = {"batch": batch, "adapters": adapters}
        if "fused" in cell and "peft" in cell:
            entry["fused_vs_peft_throughput"] = cell["fused"].tokens_per_s / cell["peft"].tokens_per_s
        if "fused" in cell and "merged" in cell:
            entry["fused_time_vs_merged"] = cell["fused"].median_s / cell["merged"].median_s
        out.append(entry)
    return out


def context_line(config: ServeConfig) -> str:
    import torch

    from peftlab.provenance import cpu_name

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_name()}, {torch.get_num_threads()} threads"
    load = " load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return (f"{config.model}, LoRA r={config.rank} all-linear, prompt {config.prompt_len} + {config.new_tokens} "
            f"new tokens (greedy, KV cache), {config.repeats} interleaved rounds; {device};{load}")


def format_table(rows: Sequence[ServeRow], memory: Sequence[dict], config: ServeConfig) -> str:
    lines = [context_line(config), "",
             f"{'batch':>5} {'adapters':>8}  {'variant':11s} {'median s':>9} {'tokens/s':>9} {'same as peft':>12}"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.batch:5d} {r.adapters:8d}  {r.variant:11s} {r.status}")
            continue
        same = "" if r.same_as_peft is None else f"{100 * r.same_as_peft:.0f}%"
        lines.append(f"{r.batch:5d} {r.adapters:8d}  {r.variant:11s} {r.median_s:9.3f} {r.tokens_per_s:9.1f} {same:>12}")
    lines += ["", "fused vs peft (throughput) and fused vs one merged model (time):"]
    for s in speedups(rows):
        parts = []
        if "fused_vs_peft_throughput" in s:
            parts.append(f"{s['fused_vs_peft_throughput']:.2f}x peft")
        if "fused_time_vs_merged" in s:
            parts.append(f"{s['fused_time_vs_merged']:.2f}x merged's time")
        lines.append(f"  batch {s['batch']}, {s['adapters']} adapters: " + (", ".join(parts) or "n/a"))
    lines += ["", "memory: one base + N adapters vs N merged models"]
    lines += [f"  N={m['adapters']:3d}: {m['one_base_plus_adapters_mb']:9.1f} MB vs {m['merged_copies_mb']:9.1f} MB"
              for m in memory]
    return "\n".join(lines)


def command_line(config: ServeConfig) -> str:
    """The command that runs this configuration again."""
    return (f"peftlab bench serve --model {config.model} --batches {','.join(map(str, config.batches))} "
            f"--adapters {','.join(map(str, config.adapters))} --rank {config.rank} --prompt-len "
            f"{config.prompt_len} --new-tokens {config.new_tokens} --repeats {config.repeats} "
            f"--only {','.join(config.only)} --seed {config.seed}")


def write_outputs(rows: Sequence[ServeRow], memory: Sequence[dict], config: ServeConfig, out: Path) -> None:
    """``out`` (json: the command, config, provenance, rows, speedups, memory) and a throughput
    chart next to it (html)."""
    from peftlab.plots import serving_throughput
    from peftlab.provenance import environment, write_json

    data = {"command": command_line(config), "config": asdict(config), "context": context_line(config),
            "provenance": environment(), "rows": [asdict(r) for r in rows], "speedups": speedups(rows),
            "memory": list(memory)}
    write_json(out, data)
    serving_throughput(data["rows"]).write_html(str(out.with_suffix(".html")), include_plotlyjs=True)


__all__ = ["VARIANTS", "ServeConfig", "ServeRow", "Served", "build_parser", "format_table", "main",
           "command_line", "parse_options", "request_names", "run_serve", "speedups", "write_outputs"]
