"""The exercises of lesson 15 (notebooks/15_notebook_to_cluster.ipynb): the effective batch under
DDP and the command that launches a script.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch

from peftlab.exercises.exercise import Exercise


def _ddp_batch_inputs(g: torch.Generator) -> dict:
    return {k: int(torch.randint(1, 17, (1,), generator=g)) for k in ("batch_size", "grad_accum", "num_processes")}


_SCRIPT_NAMES = ("train_lora.py", "train_dora.py", "finetune.py", "run_qlora.py")


def _launch_inputs(g: torch.Generator) -> dict:
    return {"script": _SCRIPT_NAMES[int(torch.randint(0, len(_SCRIPT_NAMES), (1,), generator=g))],
            "num_processes": int(torch.randint(1, 4, (1,), generator=g)),
            "on_cpu": bool(torch.randint(0, 2, (1,), generator=g))}


def _launch_command(script: str, num_processes: int, on_cpu: bool) -> str:
    if num_processes == 1:
        return f"python {script}"
    prefix = "ACCELERATE_USE_CPU=1 " if on_cpu else ""  # `--cpu` alone would start one process
    return f"{prefix}accelerate launch --multi_gpu --num_processes {num_processes} {script}"


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "effective_batch_size",
        "effective_batch_size(batch_size, grad_accum, num_processes) -> rows per optimizer step "
        "under DDP (batch_size rows per micro-batch and per process).",
        lambda batch_size, grad_accum, num_processes: batch_size * grad_accum * num_processes,
        _ddp_batch_inputs,
        "Each process runs grad_accum micro-batches of batch_size rows, then DDP averages the "
        "gradients of all processes into one optimizer step.",
        atol=0,
    ),
    Exercise(
        "launch_command",
        "launch_command(script, num_processes, on_cpu) -> the command line: 'python SCRIPT' for one "
        "process, else 'accelerate launch --multi_gpu --num_processes N SCRIPT', prefixed with "
        "'ACCELERATE_USE_CPU=1 ' when on_cpu.",
        _launch_command,
        _launch_inputs,
        "One process needs no launcher. Several CPU processes need --multi_gpu plus the "
        "environment variable ACCELERATE_USE_CPU=1: `--cpu --num_processes N` starts one process.",
        atol=0,
    ),
)


__all__ = ["LESSON_EXERCISES"]
