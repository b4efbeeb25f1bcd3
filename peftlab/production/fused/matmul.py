"""The big matmuls of the fused Functions: x Wᵀ through oneDNN on x86 CPUs.

PyTorch sends a float32 CPU matmul to MKL's sgemm; the same build also carries oneDNN (PyTorch's
"mkldnn"), whose fp32 GEMM measured 10-60% faster on the shapes of a small Llama (512 tokens x
576..49,152; `peftlab bench train` shows the effect on a whole step). The fused Functions run
their matmuls through it: the frozen weights' (base forward, base input-gradient, LM head) and,
in the layouts chosen in :mod:`~peftlab.production.fused.lora`, LoRA's thin ones. The in-place
adds into outputs (addmm_) stay on MKL. Set ``USE_ONEDNN = False`` to compare (on this module or
on ``peftlab.production.fused``: the package passes the two switches through to here).

Which one is faster depends on the CPU, so the default (``USE_ONEDNN = None``) is a rule the
benchmark justifies: oneDNN where its AVX-512 kernels run, MKL elsewhere. One fused-LoRA step of
SmolLM2-135M (4 x 128 tokens, r=16 all-linear, fp32, 2-core AMD EPYC, interleaved medians):

        kernels            oneDNN    MKL     (peft LoRA)
        AVX-512 (native)   2.65 s    3.22 s  3.38 s
        AVX2 (forced)      3.15 s    2.97 s  2.94 s

A rule, not a timing taken at run time: a kernel picked by a race would make a run's rounding
depend on the machine's load that second.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

USE_ONEDNN: bool | None = None  # None: onednn_is_faster(); True / False: always / never
ONEDNN_MIN_MACS = 2**22  # below ~4M multiply-adds oneDNN's per-call cost (~20 us) outweighs its gain


@functools.cache
def _onednn_linear() -> Callable | None:
    """oneDNN's ``linear(x, W, b)`` (x Wᵀ + b), or None where this PyTorch build has none."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None  # on ARM, PyTorch's own matmul (Accelerate, OpenBLAS) is the faster one
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def onednn_is_faster() -> bool:
    """The rule above: oneDNN's AVX-512 kernels run here (PyTorch's kernels are AVX-512, and
    ONEDNN_MAX_CPU_ISA, where set, allows AVX-512)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    cap_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "AVX512").upper()
    return cap.startswith("AVX512") and (cap_isa.startswith("AVX512") or cap_isa in ("ALL", "AVX10_1_512"))


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` = x weightᵀ + bias inside the fused Functions (no autograd):
    oneDNN for float32 on x86 CPUs above ``ONEDNN_MIN_MACS`` where :func:`onednn_is_faster` (or
    ``USE_ONEDNN``) says so, PyTorch's own matmul otherwise.
    ``weight`` may be a transposed view (``W.T`` gives dy W without a copy)."""
    use = onednn_is_faster() if USE_ONEDNN is None else USE_ONEDNN
    op = _onednn_linear() if use else None
    if (op is None or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or x.numel() * weight.shape[0] < ONEDNN_MIN_MACS
            or (bias is not None and bias.dtype != torch.float32)):
        return F.linear(x, weight, bias)
    return op(x, weight, bias, "none", [], "")


__all__ = ["USE_ONEDNN", "ONEDNN_MIN_MACS", "dense_linear", "onednn_is_faster"]
