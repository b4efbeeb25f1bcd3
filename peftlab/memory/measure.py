"""Measuring the ledger: one real training step, and the process's memory around it.

:func:`measure_memory` runs one real step: activations are the distinct storages that
``torch.autograd.graph.saved_tensors_hooks`` sees and the graph still holds when forward ends
(parameters excluded); weights, gradients and optimiser states are summed from the live tensors;
and the process (CPU: RSS; CUDA: ``torch.cuda.max_memory_allocated``) peak above what was
resident before the step is reported next to them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.memory.ledger import MemoryLedger, SavedTensors, is_classifier, unique_parameters


def measure_memory(
    model: nn.Module,
    batch: int = 4,
    seq_len: int = 128,
    *,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    lr: float = 1e-5,
    seed: int = 0,
) -> MemoryLedger:
    """Measure the ledger's categories during one real training step of ``model``.

    ``model`` is ready to train (adapted, or all weights trainable for full fine-tuning; any
    backend, 4-bit bases included). One step runs on random tokens (or ``input_ids``): forward
    with ``labels`` (the tokens themselves for a causal LM, one random class per sequence for a
    classifier), backward, ``torch.optim.AdamW`` step. ``attention_mask`` (0 = padding) goes
    with ``input_ids``. The model's trainable weights change
    (by one small step): measure a copy if that matters.

    Returns:
        A :class:`MemoryLedger` with ``source="measured"``; ``details`` holds the process's
        resident bytes before the step and its peak above that (CPU: RSS; CUDA: allocated).
    """

    param_list = [p for _, p in unique_parameters(model)]
    device = param_list[0].device
    input_ids, attention_mask, labels = _step_batch(model, batch, seq_len, input_ids, attention_mask,
                                                    seed, device)
    trainable = [p for p in param_list if p.requires_grad]
    if not trainable:
        raise ConfigError("measure_memory: the model has no trainable parameters. Expected an "
                          "adapted model (peftlab.adapt) or one with requires_grad weights.")

    weights = tensor_bytes(p for p in param_list if not p.requires_grad)
    weights += tensor_bytes(model.buffers())
    adapter = tensor_bytes(trainable)
    # parameters and buffers are counted as weights: saving one (or a view of one) costs nothing
    saved = SavedTensors(storage_key, {storage_key(p) for p in param_list}
                         | {storage_key(b) for b in model.buffers()})

    was_training = model.training
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    _sync(device)
    resident = _resident_bytes(device)
    reset_peak_memory(device)
    with saved.hooks():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    activations = saved.held_bytes()  # what the graph still holds when forward ends
    loss.backward()
    grads = tensor_bytes(p.grad for p in trainable if p.grad is not None)
    optimizer.step()
    optim = tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, Tensor))
    _sync(device)
    peak = peak_memory_mb(device) * 2**20 - resident
    optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    details = {"device": str(device), "resident_before_step": resident, "peak_above_resident": peak,
               "peak_kind": "CUDA allocated" if device.type == "cuda" else "process RSS",
               "loss": float(loss.detach()), "batch": tuple(input_ids.shape)}
    return MemoryLedger(weights, adapter, grads, optim, activations, 0, "measured", details)


def _step_batch(model: nn.Module, batch: int, seq_len: int, input_ids: Tensor | None,
                attention_mask: Tensor | None, seed: int,
                device: torch.device) -> tuple[Tensor, Tensor | None, Tensor]:
    """(input_ids, attention_mask, labels) of the measured step, on ``device``: random tokens
    unless given; labels the tokens themselves, or one random class per row for a classifier."""
    if input_ids is None:
        vocab = int(model.config.vocab_size)
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    labels = input_ids  # a causal LM predicts its own next tokens
    if is_classifier(model):  # one class per sequence
        generator = torch.Generator().manual_seed(seed)
        num_labels = int(getattr(model.config, "num_labels", 2))
        labels = torch.randint(0, num_labels, input_ids.shape[:1], generator=generator).to(device)
    return input_ids, attention_mask, labels


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of distinct storages, with a bitsandbytes 4-bit weight's quantization constants."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state, seen)
    return total


def _quant_state_bytes(state, seen: set[int]) -> int:
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, Tensor) and storage_key(t) not in seen:
            seen.add(storage_key(t))
            total += t.untyped_storage().nbytes()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested, seen)
    return total


def storage_key(t: Tensor) -> int:
    """The address of ``t``'s storage (its id where it has none): views share their base's key."""
    try:
        return t.untyped_storage().data_ptr() or id(t)
    except (RuntimeError, NotImplementedError):
        return id(t)


def process_rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; elsewhere psutil, else 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    return float(process_rss_bytes())


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring a new peak: CUDA's allocator statistics, or Linux's peak RSS (VmHWM).

    On Linux this resets the process's high-water mark, which is also what
    ``resource.getrusage(...).ru_maxrss`` and ``/usr/bin/time`` report: after ``train()`` they
    give the peak since the last step began, not since the process started.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA allocated bytes, else process RSS (MB).

    Where the peak RSS cannot be read (not Linux), this is the RSS at the time of the call.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        import resource  # lifetime peak; kB on Linux, bytes on macOS

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if os.uname().sysname == "Darwin" else 1024)
