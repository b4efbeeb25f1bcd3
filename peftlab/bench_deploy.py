"""``peftlab bench deploy``: inference latency of adapters left unmerged, against a merged LoRA and the base.

    peftlab bench deploy                                            # SmolLM2-135M, batch 1, 64 + 16 tokens
    peftlab bench deploy --model tiny-llama --repeats 1 --out /tmp/d.json   # a smoke run, seconds

Variants (same model, same prompt, each method at its defaults on its default targets):

    base              the plain model: the floor
    lora-merged       LoRA r=8 folded into the weights and unloaded (peftlab.deploy.unload): plain modules
    lora              the same LoRA unmerged (peftlab's reference): two small matmuls beside each target
    peft-lora         the same LoRA unmerged in Hugging Face peft
    ia3               IA3 unmerged: one elementwise scale per target (mergeable too; merged it is the base)
    bottleneck        Houlsby bottleneck adapters (reference): a down-f-up MLP after each sublayer
    bottleneck-fused  the same, as peftlab's production form (production/merged.py: addmm, folded GEMM)
    prefix_tuning     16 virtual key/value vectors before every attention layer's own: longer attention

Two timings per variant: ``forward``, one pass over ``--batch`` x ``--prompt-len`` tokens (prefill,
no cache), and ``generate``, ``--new-tokens`` greedy tokens with the KV cache (decoding). Variants take
turns round after round (interleaved, after one warm-up each) and medians are reported, with each
one's time as a multiple of the base model's from the same run.

A benchmark, not a test: the figures depend on the machine and its load (printed with them).
Writes ``--out`` (json: command, config, provenance, rows).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peftlab.bench_options import at_least_one, known_items

VARIANTS = ("base", "lora-merged", "lora", "peft-lora", "ia3", "bottleneck", "bottleneck-fused", "prefix_tuning")
MODES = ("forward", "generate")
LORA = {"r": 8, "alpha": 16}  # the LoRA every lora variant uses (default targets)
PREFIX_TOKENS = 16


@dataclass(frozen=True)
class DeployConfig:
    model: str = "smollm2-135m"
    batch: int = 1  # requests per call
    prompt_len: int = 64  # prompt tokens per request
    new_tokens: int = 16  # generated tokens (greedy, KV cache)
    repeats: int = 5  # interleaved rounds
    only: tuple[str, ...] = VARIANTS
    out: str = "bench_deploy.json"
    seed: int = 0


@dataclass
class DeployRow:
    """One variant in one mode. ``status`` is "ok" or "failed: why"."""

    variant: str
    mode: str
    status: str = "ok"
    median_s: float | None = None
    vs_base: float | None = None  # median time / the base model's median time, same run
    times: list[float] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab bench deploy", description="Inference latency of unmerged "
                                "adapters (LoRA, IA3, bottleneck, prefix tuning) against a merged LoRA and the base.")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, folder or hub id (default: smollm2-135m)")
    p.add_argument("--batch", type=int, default=1, help="requests per call (default: 1)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: 64)")
    p.add_argument("--new-tokens", type=int, default=16, help="generated tokens (default: 16)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--out", default="bench_deploy.json", help="results (json; default: bench_deploy.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt and adapter weights")
    return p


def parse_options(options: Sequence[str]) -> DeployConfig:
    opts = build_parser().parse_args(list(options))
    only = known_items(opts.only, VARIANTS, "--only") if opts.only else VARIANTS
    if "base" not in only:
        only = ("base",) + only  # every time is a multiple of the base model's
    at_least_one(opts, ("batch", "prompt_len", "new_tokens", "repeats"))
    return DeployConfig(model=opts.model, batch=opts.batch, prompt_len=opts.prompt_len, new_tokens=opts.new_tokens,
                        repeats=opts.repeats, only=only, out=opts.out, seed=opts.seed)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``peftlab bench deploy`` (called by peftlab.cli with ``args.options``)."""
    config = parse_options(args.options)
    rows = run_deploy(config, log=lambda line: print(line, flush=True))
    print()
    print(format_table(rows, config))
    write_outputs(rows, config, Path(config.out))
    print(f"\nwrote {config.out}")
    return 0


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def build_variant(variant: str, base, seed: int = 0):
    """A copy of ``base`` carrying ``variant``'s adapter (random, non-zero weights: a trained one's cost)."""
    import torch

    import peftlab
    from peftlab import deploy

    model = copy.deepcopy(base)
    if variant == "base":
        return model.eval()
    if variant == "peft-lora":
        from peftlab.production.hf_peft import import_peft

        peft = import_peft()
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"]))
    else:
        method = {"lora-merged": "lora", "bottleneck-fused": "bottleneck"}.get(variant, variant)
        options = dict(LORA) if method == "lora" else {"num_virtual_tokens": PREFIX_TOKENS} if method == "prefix_tuning" else {}
        with torch.random.fork_rng():  # the same seed, the same initial factors: lora and lora-merged are one adapter
            torch.manual_seed(seed)
            peftlab.adapt(model, method, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # the adapter's tensors
                param.add_(0.01 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    if variant == "lora-merged":
        deploy.unload(model)
    elif variant == "bottleneck-fused":
        from peftlab.production.merged import fuse_bottleneck

        fuse_bottleneck(model)
    return model.eval()


def run_deploy(config: DeployConfig, log: Callable[[str], None] | None = None) -> list[DeployRow]:
    """Every variant in both modes, interleaved; the rows in variant order."""
    import torch

    import peftlab

    log = log or (lambda line: None)
    log(f"loading {config.model} and building {len(config.only)} variants")
    base, _ = peftlab.load_model(config.model)
    models = {v: build_variant(v, base, config.seed) for v in config.only}
    del base
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (config.batch, config.prompt_len), generator=torch.Generator().manual_seed(config.seed))
    mask = torch.ones_like(ids)
    calls = {
        "forward": lambda m: m(input_ids=ids, attention_mask=mask, use_cache=False),
        "generate": lambda m: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=config.new_tokens,
                                         min_new_tokens=config.new_tokens, do_sample=False, pad_token_id=0),
    }
    rows = {(v, mode): DeployRow(variant=v, mode=mode) for mode in MODES for v in models}
    with torch.inference_mode():
        for (variant, mode), row in rows.items():  # a warm-up each
            try:
                calls[mode](models[variant])
            except Exception as err:  # noqa: BLE001 - a failed variant is reported, the others run
                row.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        for _ in range(config.repeats):
            for (variant, mode), row in rows.items():
                if row.status == "ok":
                    start = time.perf_counter()
                    calls[mode](models[variant])
                    row.times.append(time.perf_counter() - start)
    for row in rows.values():
        if row.status == "ok":
            row.median_s = statistics.median(row.times)
    for (variant, mode), row in rows.items():
        floor = rows[("base", mode)].median_s if ("base", mode) in rows else None
        if row.median_s is not None and floor:
            row.vs_base = row.median_s / floor
        log(f"{variant:17s} {mode:9s} " + (f"{row.median_s * 1e3:8.1f} ms  {row.vs_base:.2f}x base"
                                           if row.vs_base is not None else row.status))
    return list(rows.values())


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def context_line(config: DeployConfig) -> str:
    import torch

    from peftlab.provenance import cpu_name

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_name()}, {torch.get_num_threads()} threads"
    load = " load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return (f"{config.model}, batch {config.batch}, prompt {config.prompt_len} tokens, {config.new_tokens} new "
            f"tokens (greedy, KV cache), {config.repeats} interleaved rounds; {device};{load}")


def format_table(rows: Sequence[DeployRow], config: DeployConfig) -> str:
    lines = [context_line(config), "", f"{'variant':17s} {'mode':9s} {'median ms':>10} {'x base':>7}"]
    for r in rows:
        lines.append(f"{r.variant:17s} {r.mode:9s} " + (f"{r.median_s * 1e3:10.1f} {r.vs_base:7.2f}"
                                                          if r.vs_base is not None else r.status))
    return "\n".join(lines)


def command_line(config: DeployConfig) -> str:
    """The command that runs this configuration again."""
    return (f"peftlab bench deploy --model {config.model} --batch {config.batch} --prompt-len {config.prompt_len} "
            f"--new-tokens {config.new_tokens} --repeats {config.repeats} --only {','.join(config.only)} "
            f"--seed {config.seed}")


def write_outputs(rows: Sequence[DeployRow], config: DeployConfig, out: Path) -> None:
    """``out`` (json: the command, config, context, provenance, rows)."""
    from peftlab.provenance import environment, write_json

    write_json(out, {"command": command_line(config), "config": asdict(config), "context": context_line(config),
                     "provenance": environment(), "rows": [asdict(r) for r in rows]})


__all__ = ["DeployConfig", "DeployRow", "MODES", "VARIANTS", "build_parser", "build_variant", "command_line",
           "format_table", "main", "parse_options", "run_deploy", "write_outputs"]
