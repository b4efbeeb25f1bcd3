"""LoftQ: quantise the base and initialise LoRA together, so that Q + B A starts close to W.

Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
https://arxiv.org/abs/2310.08659 (Algorithm 1). Checked against peft 0.21.2's
``peft.utils.loftq_utils.loftq_init``, which only runs on CUDA/XPU; this one runs anywhere.

QLoRA freezes NF4(W) and starts with B A = 0, so fine-tuning begins from a model that is off by
the whole quantisation error W - NF4(W). LoftQ alternates quantisation and a rank-r SVD so that
the adapter starts by carrying the largest part of that error:

    B A = 0
    for t = 1 .. loftq_iter:
        Q   = NF4(W - B A)                 quantise what the adapter does not carry
        B A = SVD_r(W - Q)                 the adapter carries the best rank-r part of what Q misses:
                                           W - Q ≈ U_r S_r V_rᵀ,  B = U_r √S_r,  A = √S_r V_rᵀ
        error_t = ‖W - (Q + B A)‖_F

At t = 1, Q = NF4(W), so error_1 < ‖W - NF4(W)‖_F (the plain QLoRA error) whenever r > 0; further
iterations usually lower it more. Afterwards the base weight *is* Q (stored dense here, as peft
does; ``quantize_model_nf4(model, double_quant=False)`` then gives back exactly Q's NF4 codes)
and LoRA starts from (A, B), so the adapted model ≈ the original one.

LoRA multiplies B A by ``scaling`` (alpha / r); we split S_r / scaling, so scaling · B A is the
rank-r residual for any alpha. peft assigns the unscaled factors (peft issue #1982), so the two
agree exactly when alpha = r (scaling 1). peft quantises here without double quantisation
(``compress_statistics=False``), blocksize 64: so do we by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.quant.nf4 import QuantState, dequantize_nf4, quantize_nf4


@dataclass(frozen=True, eq=False)
class LoftQResult:
    """What LoftQ gives one weight matrix W (d_out, d_in); all fp32."""

    dequantized: Tensor  # Q (d_out, d_in): the new frozen base weight
    lora_A: Tensor  # (r, d_in)
    lora_B: Tensor  # (d_out, r); scaling · lora_B @ lora_A ≈ W - Q
    errors: list[float]  # ‖W - (Q_t + scaling · B_t A_t)‖_F after each iteration t = 1, 2, ...
    nf4_error: float  # ‖W - NF4(W)‖_F: where plain QLoRA (B A = 0) starts
    packed: Tensor  # Q's NF4 codes, as quantize_nf4 packs them
    state: QuantState  # Q's block scales: Linear4bitRef(packed, state) is a 4-bit base holding Q


def low_rank(matrix: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(L, R) with L @ R the best rank-r approximation of ``matrix`` (Eckart-Young), the singular
    values split evenly: L = U_r √S_r (m, r), R = √S_r V_rᵀ (r, n)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


@torch.no_grad()
def loftq(weight: Tensor, r: int, num_iter: int = 1, scaling: float = 1.0, blocksize: int = 64,
          double_quant: bool = False) -> LoftQResult:
    """LoftQ for one weight matrix W (d_out, d_in): NF4 base Q and LoRA factors (A, B)."""
    if weight.dim() != 2:
        raise ConfigError(f"LoftQ decomposes matrices; got a weight of shape {tuple(weight.shape)}. "
                          "Expected a 2-D (d_out, d_in) weight of a linear layer.")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ConfigError(f"loftq_iter={num_iter!r} is invalid. Expected a positive integer "
                          "(peft's default is 1; 5 often helps at low ranks).")
    if not 1 <= r <= min(weight.shape):
        raise ConfigError(f"LoftQ rank r={r} does not fit a {tuple(weight.shape)} weight. "
                          f"Expected 1 <= r <= {min(weight.shape)}.")
    W = weight.detach().float()
    residual, errors = W, []  # residual: what the quantiser sees, W - B A
    for _ in range(num_iter):
        packed, state = quantize_nf4(residual, blocksize, double_quant)
        Q = dequantize_nf4(packed, state, torch.float32)
        L, R = low_rank(W - Q, r)  # L @ R: the rank-r part of the quantisation error
        errors.append(float((W - Q - L @ R).norm()))
        residual = W - L @ R
    plain, plain_state = quantize_nf4(W, blocksize, double_quant)
    nf4_error = float((W - dequantize_nf4(plain, plain_state, torch.float32)).norm())
    root = math.sqrt(scaling)  # scaling · B A = L R
    return LoftQResult(Q, R / root, L / root, errors, nf4_error, packed, state)


@torch.no_grad()
def loftq_init_lora(base: nn.Module, adapter: nn.Module, bits: int = 4, num_iter: int = 1) -> LoftQResult:
    """Initialise one reference LoRA adapter with LoftQ and put Q in its base layer, in place.

    ``base`` is an nn.Linear or transformers' Conv1D in full precision; ``adapter`` a
    peftlab LoRA on it. The errors stay on the adapter as ``loftq_report`` (see :func:`loftq_errors`).
    """
    if bits != 4:
        raise ConfigError(f"loftq_bits={bits!r} is not supported: peftlab's LoftQ quantises to NF4. "
                          "Expected loftq_bits=4.")
    weight = getattr(base, "weight", None)
    if getattr(adapter, "is_embedding", False) or weight is None or weight.dim() != 2:
        raise ConfigError(f"LoftQ initialises LoRA on linear layers; got a {type(base).__name__}. "
                          "Expected nn.Linear or Conv1D targets; try targets='all-linear'.")
    if getattr(weight, "quant_state", None) is not None or getattr(base, "is_quantized", False):
        raise ConfigError(
            "LoftQ needs the full-precision weights W, but this base layer is already 4-bit: only "
            "NF4(W) is left, and LoftQ of that finds nothing to correct. Expected a full-precision "
            "base; try loading the model unquantised, peftlab.adapt(model, 'lora', init='loftq'), "
            "then peftlab.quant.nf4.quantize_model_nf4(model, double_quant=False) for a 4-bit base."
        )
    transposed = getattr(adapter, "transposed", False)  # Conv1D stores W as (d_in, d_out)
    W = weight.T if transposed else weight
    result = loftq(W, adapter.r, num_iter, scaling=adapter.scaling)
    adapter.lora_A.copy_(result.lora_A)
    adapter.lora_B.copy_(result.lora_B)
    weight.copy_(result.dequantized.T if transposed else result.dequantized)
    adapter.loftq_report = {"errors": result.errors, "nf4_error": result.nf4_error}
    return result


@torch.no_grad()
def loftq_init_peft(peft_model: nn.Module, adapter_name: str = "default", bits: int = 4,
                    num_iter: int = 1) -> dict[str, LoftQResult]:
    """The same LoftQ for a peft LoRA model (built with init_lora_weights=True), in place: the
    production path, on any device. Returns {layer name: LoftQResult}."""
    if bits != 4:
        raise ConfigError(f"loftq_bits={bits!r} is not supported: peftlab's LoftQ quantises to NF4. "
                          "Expected loftq_bits=4.")
    results = {}
    for name, module in peft_model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter_name not in lora_A:
            continue
        weight = module.get_base_layer().weight
        if getattr(weight, "quant_state", None) is not None:
            raise ConfigError("LoftQ needs the full-precision weights W, but this base layer is already "
                              "4-bit. Expected a full-precision base; quantise after LoftQ.")
        W = weight.T if module.fan_in_fan_out else weight
        result = loftq(W, module.r[adapter_name], num_iter, scaling=module.scaling[adapter_name])
        lora_A[adapter_name].weight.copy_(result.lora_A)
        module.lora_B[adapter_name].weight.copy_(result.lora_B)
        weight.copy_(result.dequantized.T if module.fan_in_fan_out else result.dequantized)
        results[name] = result
    return results


def loftq_errors(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, list[float] | float]]:
    """{layer: {"errors": [‖W - (Q + BA)‖_F per iteration], "nf4_error": ‖W - NF4(W)‖_F}} for
    every LoftQ-initialised LoRA layer of a reference model."""
    from peftlab.inject import adapted_layers

    report = {}
    for path, layer in adapted_layers(model).items():
        name = adapter_name or (layer.active[0] if layer.active else None)
        adapter = layer.adapters[name] if name in layer.adapters else None
        if getattr(adapter, "loftq_report", None) is not None:
            report[path] = adapter.loftq_report
    return report
