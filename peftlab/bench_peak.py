"""How close a training step comes to the machine's arithmetic limit (``peftlab bench train``).

A step time alone says little: 0.9 s is fast on two cores and slow on sixty-four. So the benchmark
counts each variant's matrix-multiply FLOPs from the shapes, measures in the same run the rate a
large square matmul reaches in that dtype (the machine's practical peak), and reports each step as
GFLOP/s and as a fraction of that peak. It also names the CPU and the instruction set PyTorch's
kernels use (AVX-512 or AVX2, native or forced).

FLOPs of one step, T = batch · seq_len tokens, a multiply-add counted as 2:

        linear   F_lin  = 2 T Σ d_in · d_out        every nn.Linear / Conv1D of the base, LM head included
        attention F_att = 4 · batch · seq_len² · (heads · head_dim) per layer   (QKᵀ and PV, the full square)
        LoRA     F_lora = 2 T Σ r (d_in + d_out)    over the adapted layers

        forward  F_lin + F_att;  backward to the inputs  F_lin + 2 F_att;  weight gradients  F_lin

        frozen      2 F_lin + 3 F_att               (the gradient goes down to the input embeddings)
        full        3 F_lin + 3 F_att
        LoRA/QLoRA  2 F_lin + 3 F_att + 3 F_lora    (the adapter's forward, its two factor gradients
                                                     and its share of the input gradient)

Elementwise work (norms, activations, softmax, the optimiser) is left out: it costs time, not
FLOPs worth counting, and is exactly what a fused path can save.
"""

from __future__ import annotations

import os
import time

from torch import nn

PEAK_SIZE = 2048  # n of the n x n x n matmul that measures the peak (2 n³ FLOPs)
PEAK_REPEATS = 3  # best of


def linear_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of every linear layer of an unadapted model (transformers' Conv1D too)."""
    from peftlab.inject import is_linear, layer_dims

    return [(name, *layer_dims(m)) for name, m in model.named_modules() if is_linear(m)]


def step_flops(model: nn.Module, variant: str, batch: int, seq_len: int, rank: int,
               adapted: set[str] | None = None) -> float:
    """The matmul FLOPs of one training step of ``variant`` (module docstring) on the unadapted
    ``model``; ``adapted``: the layer names the LoRA variants adapt (default: every linear but the head)."""
    config = model.config
    tokens = batch * seq_len
    shapes = linear_shapes(model)
    f_lin = 2.0 * tokens * sum(d_in * d_out for _, d_in, d_out in shapes)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    f_att = 4.0 * batch * seq_len ** 2 * heads * head_dim * config.num_hidden_layers
    if variant == "full":
        return 3 * f_lin + 3 * f_att
    frozen = 2 * f_lin + 3 * f_att
    if variant == "frozen":
        return frozen
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n for n, m in model.named_modules() if m is head}
    targets = adapted if adapted is not None else {n for n, _, _ in shapes} - head_names
    f_lora = 2.0 * tokens * sum(rank * (d_in + d_out) for n, d_in, d_out in shapes if n in targets)
    return frozen + 3 * f_lora


def peak_gflops(dtype, device, size: int = PEAK_SIZE, repeats: int = PEAK_REPEATS) -> float:
    """The best GFLOP/s of a ``size``³ matmul in ``dtype`` on ``device``, after one warm-up."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is the warm-up
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best / 1e9


def machine_line() -> str:
    """The CPU (with AVX-512 or not), the kernels PyTorch picked, any forced instruction set, threads."""
    import torch

    from peftlab.provenance import cpu_name

    forced = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
              if k in os.environ]
    return (f"{cpu_name()}; PyTorch kernels {torch.backends.cpu.get_cpu_capability()}"
            + (f" (forced: {' '.join(forced)})" if forced else "") + f"; {torch.get_num_threads()} threads")
