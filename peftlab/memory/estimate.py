"""Estimating the ledger before loading anything: a config, a meta-device model, arithmetic.

The model is built on the meta device (shapes only) and adapted with peftlab's reference, so the
trainable parameters are exactly those ``peftlab.adapt`` would make; weights, gradients and AdamW's
moments follow from them, activations from the formula of peftlab/memory/activations.py (or a
step traced on the meta device, peftlab/memory/traced.py, where the formula does not reach).

**4-bit weights** (bitsandbytes NF4, QLoRA; Dettmers et al. 2023, https://arxiv.org/abs/2305.14314):
n values cost n/2 bytes of codes, one absmax per block of 64 values (fp32, or with double
quantization uint8 plus one fp32 per 256 blocks and a 256-entry fp32 code book), and the
16-entry NF4 code book; the output head and the embeddings stay in the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.memory.activations import (Fusion, activation_bytes, formula_models, fusion_of,
                                        soft_prompt_positions)
from peftlab.memory.ledger import MemoryLedger, is_causal, unique_parameters
from peftlab.memory.traced import traced_activation_bytes

NF4_BLOCK = 64  # values per absmax block (bitsandbytes' default for 4-bit)
NESTED_BLOCK = 256  # absmax values per block of the second (double) quantization
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def estimate_memory(
    model_name_or_config: Any,
    method: str | None = "lora",
    r: int | None = None,
    batch: int = 4,
    seq_len: int = 128,
    dtype: torch.dtype | str = torch.float32,
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    *,
    targets: str | tuple[str, ...] | None = None,
    attn_implementation: str = "sdpa",
    backend: str = "reference",
    device: str | torch.device | None = None,
    padded: bool = False,
    **hyperparameters: Any,
) -> MemoryLedger:
    """Predict the memory of one training step before loading anything.

    Args:
        model_name_or_config: a bundled model name ("smollm2-135m", "tiny-llama", ...), a local
            folder or hub id (its config.json only), a transformers ``PretrainedConfig``, or a
            model (its ``.config``).
        method: a registered peftlab method, or None / "full" for full fine-tuning.
        r: rank of the adapter; None: the method's own default, as ``peftlab.adapt`` uses it
            (ignored for full fine-tuning and methods without a rank).
        batch, seq_len: the step's input shape.
        dtype: dtype of the weights and activations (fp32, bf16, fp16).
        quantization: None or "nf4" (bitsandbytes 4-bit, double quantization).
        gradient_checkpointing: recompute each block's activations in backward.
        targets: the adapter's target layers, e.g. "all-linear"; default: the method's own
            defaults, exactly what ``peftlab.adapt(model, method)`` would adapt.
        attn_implementation: "sdpa" (transformers' default) or "eager".
        backend: the path that will train, as in ``peftlab.adapt``: "reference" and "peft" keep
            the same tensors; "fused" (LoRA and DoRA) keeps fewer (see peftlab/memory/activations.py).
        device: where the step will run, "cpu" or "cuda"; only dropout masks differ (CPU keeps
            a scaled noise tensor of the input's dtype, CUDA one byte per value). Default: where
            ``peftlab.load_model`` puts such a model (CUDA for "nf4" when a GPU is present).
        padded: the batches carry padding (an attention mask with zeros, as ``peftlab.train``'s
            batches of unequal rows do): Llama-style SDPA then keeps that mask and k, v repeated
            to every head. Default False: full rows, no mask (as ``measure_memory`` runs).
        **hyperparameters: other fields of the method's config (alpha, dropout, ...).

    Returns:
        A :class:`MemoryLedger` with ``source="estimate"``; ``details`` holds the terms.
    """
    torch_dtype = _resolve_dtype(dtype)
    if quantization not in (None, "nf4"):
        raise ConfigError(f"quantization={quantization!r} is not supported. Expected None or 'nf4'.")
    if batch < 1 or seq_len < 1:
        raise ConfigError(f"batch and seq_len must be positive (got {batch}, {seq_len}).")
    full = method in (None, "full")
    _check_backend(backend, method, full)
    config = resolve_config(model_name_or_config)
    model = meta_model(config, torch_dtype, method, r, targets, **hyperparameters)
    fusion = fusion_of(model) if backend == "fused" else None
    weights, adapter, grads, optim = _parameter_bytes(model, quantization == "nf4")

    # an input soft prompt (prompt tuning, P-tuning) puts n virtual tokens before every input:
    # the whole model runs on seq_len + n positions, all of them downstream of a trained tensor;
    # a prefix (prefix tuning) gives every layer's attention n more keys and values instead
    prompt = soft_prompt_positions(model)
    tokens = seq_len + prompt.inputs
    if formula_models(config, method):
        acts, terms = activation_bytes(config, model, batch, tokens, torch_dtype,
                                       _adapter_dtype(model, torch_dtype), gradient_checkpointing,
                                       attn_implementation, full, fusion, cuda=_on_cuda(device, quantization),
                                       trained_input=prompt.inputs > 0, prefix=prompt.prefix, padded=padded)
    else:
        acts, terms = traced_activation_bytes(model, batch, seq_len, gradient_checkpointing,
                                              attn_implementation, padded)
    temporaries = _temporaries(config, batch * tokens, fusion, terms)
    details = {"activation_terms": terms, "config": type(config).__name__, "method": method or "full",
               "activations_from": "formula" if "traced" not in terms else "traced on the meta device",
               "backend": backend, "r": r, "batch": batch, "seq_len": seq_len, "dtype": str(torch_dtype),
               "quantization": quantization, "gradient_checkpointing": gradient_checkpointing, "padded": padded,
               "trainable_params": sum(p.numel() for _, p in unique_parameters(model) if p.requires_grad)}
    return MemoryLedger(weights, adapter, grads, optim, acts, temporaries, "estimate", details)


def _on_cuda(device: str | torch.device | None, quantization: str | None) -> bool:
    """Whether the step runs on CUDA: ``device``, or where ``peftlab.load_model`` puts the model."""
    if device is None:
        from peftlab.models import default_device

        device = default_device(quantization)
    return torch.device(device).type == "cuda"


def _parameter_bytes(model: nn.Module, nf4: bool) -> tuple[int, int, int, int]:
    """(weights, adapter weights, gradients, optimizer) of the meta-device model; with ``nf4``
    the linear layers but the head stored as bitsandbytes stores them (:func:`nf4_bytes`)."""
    quantized = _quantizable_linears(model) if nf4 else set()
    weights = adapter = grads = optim = 0
    for name, param in unique_parameters(model):
        size = param.numel() * param.element_size()
        if param.requires_grad:
            adapter += size
            grads += size
            optim += 2 * size + 4  # exp_avg, exp_avg_sq (param dtype) and the fp32 step counter
        elif name.rsplit(".", 1)[0] in quantized and name.endswith("weight"):
            weights += nf4_bytes(param.numel())
        else:
            weights += size
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return weights, adapter, grads, optim


def _temporaries(config, rows: int, fusion: Fusion | None, terms: dict[str, int]) -> int:
    """The biggest short-lived buffer of backward: d(log-probs) and d(logits), fp32, for ``rows``
    positions (the fused loss: one chunk of them), or a recomputed block if larger."""
    vocab = int(getattr(config, "vocab_size", 0)) if is_causal(config) else 0
    if fusion is not None and fusion.loss:  # one chunk of logits at a time (and logsumexp's copy)
        from peftlab.production.fused import default_chunk_rows

        rows = min(rows, default_chunk_rows(vocab))
    temporaries = 2 * rows * vocab * 4  # d(log-probs) and d(logits), fp32
    # with checkpointing, each block's activations live again during backward, one block at a
    # time and after the loss's buffers are gone: the larger of the two is the temporary
    return max(temporaries, terms.get("recomputed_block", 0))


def nf4_bytes(n: int, double_quant: bool = True, block: int = NF4_BLOCK) -> int:
    """Bytes bitsandbytes stores for ``n`` NF4 values: codes, absmax constants and code books."""
    blocks = math.ceil(n / block)
    codes = math.ceil(n / 2)  # two 4-bit codes per byte
    if not double_quant:
        return codes + 4 * blocks + 16 * 4  # fp32 absmax per block, the 16-value NF4 code book
    nested = math.ceil(blocks / NESTED_BLOCK)
    # uint8 absmax per block; fp32 absmax per 256 blocks; 256-entry fp32 code book of the
    # second quantization; the NF4 code book; the fp32 offset (mean of the absmax values)
    return codes + blocks + 4 * nested + 256 * 4 + 16 * 4 + 4


def resolve_config(source: Any):
    """A transformers config from a bundled name, folder, hub id, config or model (no weights)."""
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module):
        inner = source.get_base_model() if hasattr(source, "get_base_model") else source
        return inner.config
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"estimate_memory: cannot read a model config from {type(source).__name__}. "
                          "Expected a bundled name, a folder, a hub id, a PretrainedConfig or a model.")
    from peftlab.models import model_config

    return model_config(source, num_labels=2)


def meta_model(config, dtype: torch.dtype, method: str | None, r: int | None, targets,
               **hp) -> nn.Module:
    """The model built on the meta device (shapes only) and adapted with peftlab's reference."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if is_causal(config) else AutoModelForSequenceClassification
    if getattr(config, "is_encoder_decoder", False):  # T5, BART: the labels are the decoder's targets
        auto = AutoModelForSeq2SeqLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
        if method in (None, "full"):
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            from peftlab import xlora_io  # noqa: F401 (registers X-LoRA's method hooks)
            from peftlab.api import adapt
            from peftlab.methods import get_method, shapes_stand_in

            method, hp = shapes_stand_in(method, hp)  # same shapes, its own init: nothing read on meta
            spec = get_method(method)
            # pass r and targets only to methods that take them (IA3, BitFit and prompts have no rank)
            takes = {f.name for f in fields(spec.config)}
            extra = {"r": r} if "r" in takes and r is not None else {}
            if targets is not None and "targets" in takes:
                extra["targets"] = targets
            if "total_step" in takes and hp.get("total_step") is None:
                extra["total_step"] = 1  # AdaLoRA's schedule length does not change its memory
            model = adapt(model, method, **extra, **hp)
    return model


def _quantizable_linears(model: nn.Module) -> set[str]:
    """Names of the linear layers bitsandbytes would store in 4 bits: all but the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head \
                and name.rsplit(".", 1)[-1] not in ("classifier", "score", "lm_head"):
            out.add(name)
    return out


def _adapter_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in model.parameters():
        if p.requires_grad:
            return p.dtype
    return default


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not known. Expected one of {sorted(set(_DTYPES))}.")
    return _DTYPES[key]


def _check_backend(backend: str, method: str | None, full: bool) -> None:
    """peftlab.adapt's own checks: a known backend, and a method the fused path has kernels for."""
    from peftlab.api import BACKENDS, unknown_backend

    if backend not in BACKENDS:
        raise unknown_backend(backend)
    if backend == "fused":
        from peftlab.production.fused import check_fusable_method

        check_fusable_method("full fine-tuning" if full else method)

