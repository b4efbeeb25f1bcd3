"""Benchmark: the factor-based spectrum against a full SVD of the explicit ΔW (``peftlab bench spectra``)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from peftlab.spectra.svd import factored_svdvals


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, Any]:
    """Best wall time (s) over ``repeats`` runs (the least disturbed by other processes, as
    ``timeit`` advises), and the last result. CUDA work is asynchronous: wait for it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, result = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), result


def bench_spectra(
    sizes: Sequence[int] = (1024, 2048, 4096),
    ranks: Sequence[int] = (8, 16, 64),
    repeats: int = 5,
    full_repeats: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> list[dict[str, float]]:
    """Time the factor-based spectrum against ``torch.linalg.svdvals`` of the explicit ΔW.

    For each d x d size and rank r: random factors B (d, r), A (r, d), ΔW = B A. Both timings,
    their ratio and the agreement are measured in the same run. Each timing is the best of its
    repeats; the full SVD runs ``full_repeats`` times (once by default: ~minutes at 4096 on 2 cores).

    ``threads`` sets torch's CPU threads for the run (restored after). On a busy machine
    ``threads=1`` gives steadier figures: with more threads than free cores, every parallel
    region waits for a descheduled thread, which swamps sub-millisecond timings.

    Returns:
        Rows {d, r, factored_s, full_s, speedup, max_rel_diff, tail_rel}: best seconds of each
        route, full_s / factored_s, the largest |σ_factored - σ_full| / σ_full over the top r, and
        the largest remaining full singular value relative to σ_1 (should be ~1e-7: rank r).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_rows(sizes, ranks, repeats, full_repeats, seed, torch.device(device))
    finally:
        torch.set_num_threads(previous)


def _bench_rows(sizes, ranks, repeats, full_repeats, seed, device) -> list[dict[str, float]]:
    """The measurements of :func:`bench_spectra`, under the thread setting it chose."""
    gen = torch.Generator().manual_seed(seed)
    torch.linalg.svdvals(torch.randn(64, 64, generator=gen).to(device))  # first-call set-up, not timed
    rows = []
    for d in sizes:
        for r in ranks:
            b = (torch.randn(d, r, generator=gen) / math.sqrt(r)).to(device)
            a = (torch.randn(r, d, generator=gen) / math.sqrt(d)).to(device)
            delta = b @ a  # (d, d); forming it is not timed: the full route is timed at its best
            factored_svdvals(b, a)  # warm-up: LAPACK picks workspaces per shape on first call
            factored_s, fast = _timed(lambda: factored_svdvals(b, a), repeats, device)
            full_s, full = _timed(lambda: torch.linalg.svdvals(delta), full_repeats, device)
            fast, full = fast.cpu(), full.cpu()
            rel = ((fast - full[:r]).abs() / full[:r]).max()
            tail = full[r:].max() / full[0] if d > r else torch.tensor(0.0)
            rows.append({
                "d": d, "r": r, "factored_s": factored_s, "full_s": full_s,
                "speedup": full_s / factored_s, "max_rel_diff": float(rel), "tail_rel": float(tail),
            })
    return rows


def format_bench_spectra(rows: Sequence[Mapping[str, float]]) -> str:
    """The rows of :func:`bench_spectra` as an aligned text table (for ``peftlab bench spectra``)."""
    lines = [f"{'d':>6} {'r':>4} {'factored ms':>12} {'full svd ms':>12} {'speedup':>9} "
             f"{'max rel diff':>13} {'tail/σ1':>9}"]
    for row in rows:
        lines.append(
            f"{row['d']:>6} {row['r']:>4} {1e3 * row['factored_s']:>12.3f} {1e3 * row['full_s']:>12.1f} "
            f"{row['speedup']:>8.0f}x {row['max_rel_diff']:>13.2e} {row['tail_rel']:>9.1e}"
        )
    return "\n".join(lines)
