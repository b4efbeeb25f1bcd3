"""Checkpoints: everything needed to continue a run exactly where it stopped.

With ``out_dir``, checkpoints ``out_dir/checkpoint-000012/`` hold ``adapter/`` (PEFT format, via
peftlab.io), ``trainer_state.pt`` (trainable weights, optimizer, scheduler, RNG states, settings)
and ``history.json``; each is written to a temporary folder and renamed into place, so a crash
never leaves a half-written checkpoint. ``train(..., resume_from=out_dir)`` continues from the
newest one; with the same settings (``steps`` included: it shapes the schedule) the loss curve is
the one an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from peftlab.errors import AdapterFileError


def rng_state() -> dict:
    """Every random generator training draws from (dropout, data-independent sampling)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer, scheduler, history: list[dict],
                     settings: dict, rng: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint-<step>/`` atomically (temporary folder, then rename).

    ``rng``: the generators' state to resume from (default: now); after a step cut short, the
    state at that step's start."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{len(history):06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); a checkpoint is an ordinary folder
    try:
        state = {
            "step": len(history),
            "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng if rng is not None else rng_state(),
            "settings": settings,
        }
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "history.json").write_text(json.dumps(history, indent=1))
        _save_adapter_folder(model, tmp / "adapter")
        if final.exists():  # e.g. a rerun into the same out_dir: swap, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=out_dir))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_adapter_folder(model: nn.Module, path: Path) -> None:
    """The adapter in PEFT format, for people and tools; resuming reads trainer_state.pt."""
    try:
        from peftlab.io import save_adapter
    except ImportError:
        return
    try:
        save_adapter(model, path)
    except Exception as exc:  # noqa: BLE001 (the weights are safe in trainer_state.pt already)
        warnings.warn(
            f"The checkpoint's adapter/ folder was not written ({type(exc).__name__}: {exc}); the "
            "trainable weights are in trainer_state.pt, so resuming still works.",
            RuntimeWarning, stacklevel=3,
        )


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint, else the newest ``checkpoint-*`` inside it."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    found = sorted(path.glob("checkpoint-*/trainer_state.pt")) if path.is_dir() else []
    if not found:
        raise AdapterFileError(
            f"No checkpoint at {path}. Expected a folder holding trainer_state.pt, or an out_dir "
            "with checkpoint-* folders; try the out_dir of the run you want to continue."
        )
    return found[-1].parent


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler, settings: dict,
                    stacklevel: int = 3) -> tuple[int, list[dict]]:
    """Restore the newest checkpoint at ``path`` into the model's trainable weights, the optimizer,
    the scheduler and the random generators; returns (steps done, their history).

    ``settings``: this run's (``TrainSettings.as_dict``); the numbers that shape the loss curve
    are compared with the checkpoint's, and a difference warns ``stacklevel`` frames up."""
    folder = find_checkpoint(path)
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state["trainable"]) != set(trainable):
        missing = sorted(set(trainable) - set(state["trainable"]))[:3]
        extra = sorted(set(state["trainable"]) - set(trainable))[:3]
        raise AdapterFileError(
            f"The checkpoint {folder} does not fit this model: its trainable parameters differ "
            f"(model only: {missing}; checkpoint only: {extra}). Expected the same base model, "
            "method and hyperparameters as the run that wrote it; try adapting the model the same way."
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    changed = [k for k in ("steps", "lr", "batch_size", "grad_accum", "seed", "warmup_ratio", "max_length")
               if state["settings"].get(k) != settings.get(k)]
    if changed:
        warnings.warn(
            f"Resuming with different {', '.join(changed)} than the run that wrote {folder.name}: "
            "the loss curve will not match an uninterrupted run.", stacklevel=stacklevel,
        )
    history = json.loads((folder / "history.json").read_text())
    return state["step"], history
