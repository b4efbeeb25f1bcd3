"""Where the model runs and how: its device, bfloat16 autocast, activation checkpointing.

Gradient checkpointing: Chen et al. 2016, Training Deep Nets with Sublinear Memory Cost,
https://arxiv.org/abs/1604.06174
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftlab.errors import ConfigError


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def bf16_usable(bf16: bool, device: torch.device, stacklevel: int = 3) -> bool:
    """``bf16``, unless the GPU has no bfloat16: then False, with a warning that points
    ``stacklevel`` frames up (3: the line that called this function's caller). On a CPU without
    native bfloat16 arithmetic bf16 stays as asked, with a warning that it will be slow."""
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("This GPU has no bfloat16 support; training in fp32 instead (bf16=False).",
                      stacklevel=stacklevel)
        return False
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("This CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX on x86, BF16 on ARM, "
                      "with PyTorch's kernels allowed to use it), so bf16 matmuls are emulated and usually "
                      "run slower than fp32; training in bf16 as asked. Pass bf16=False for speed.",
                      stacklevel=stacklevel)
    return bf16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively and PyTorch may use it: x86 with AVX512-BF16 or
    AMX-BF16 and AVX-512 kernels (not forced lower), or ARM with the BF16 extension."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
    return "bf16" in flags  # ARM's Features line


def enable_checkpointing(model: nn.Module) -> bool:
    """Turn on activation checkpointing (use_reentrant=False); True if it was off before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner, "is_activation_checkpointing", False):
        return False
    enable = getattr(inner, "activation_checkpointing_enable", None) or getattr(
        inner, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(inner).__name__} does not support gradient checkpointing. Expected a "
            "transformers model that does; try gradient_checkpointing=False."
        )
    # Non-reentrant checkpointing lets gradients reach the adapters even though the frozen
    # embedding's output does not require grad; transformers also enables input grads here.
    enable({"use_reentrant": False})
    return True


def disable_checkpointing(model: nn.Module) -> None:
    """Turn activation checkpointing off again (after :func:`enable_checkpointing` turned it on)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    disable = getattr(inner, "activation_checkpointing_disable", None) or inner.gradient_checkpointing_disable
    disable()
