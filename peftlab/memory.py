"""The memory ledger: where the bytes of a training step go, predicted and measured.

    est = peftlab.estimate_memory("smollm2-135m", "lora", r=16, batch=2, seq_len=64, targets="all-linear")
    model = peftlab.adapt(peftlab.load_model("smollm2-135m")[0], "lora", r=16, targets="all-linear")
    got = peftlab.measure_memory(model, batch=2, seq_len=64)
    print(est.table(got))

Categories (bytes), the same for both:

    weights          frozen base weights as stored: dense, or 4-bit codes + their constants
    adapter_weights  trainable parameters (the adapter; every weight for full fine-tuning)
    gradients        one gradient per trainable parameter, same dtype
    optimizer        AdamW: two moments per trainable parameter, in the parameter's dtype
                     (fp32 for peftlab's adapters), plus a one-element step counter each
    activations      tensors saved by the forward pass for backward (logits included)
    temporaries      the biggest short-lived buffer of backward: the logits' gradient, or
                     with gradient checkpointing a recomputed block if that is larger
                     (estimate only: nothing saves it, so the hooks below cannot see it)

**4-bit weights** (bitsandbytes NF4, QLoRA; Dettmers et al. 2023, https://arxiv.org/abs/2305.14314):
n values cost n/2 bytes of codes, one absmax per block of 64 values (fp32, or with double
quantization uint8 plus one fp32 per 256 blocks and a 256-entry fp32 code book), and the
16-entry NF4 code book; the output head and the embeddings stay in the model dtype.

**Activations of a Llama decoder block**, N = batch · seq_len tokens, h hidden size, k the key /
value width (n_kv_heads · head_dim), i the MLP width, r the rank, e bytes per activation value
(4 fp32, 2 bf16), a bytes per adapter value (peftlab's adapters are fp32), n_h heads, T tokens
per sequence, S = B·n_h·T² attention scores:

    RMSNorm (x2)            N·h·4 + N·4         (it up-casts to fp32 and keeps x and 1/rms;
                            a trained norm weight also x/rms, N·h·e)
    attention, SDPA         2·N·h·e + 2·N·k·e + N·n_h·4    (q, out, k, v, logsumexp)
    attention, eager        3·N·h·e + S·4 [+ S·e if e ≠ 4]  (q, k and v repeated to h wide, the
                            fp32 softmax output and its down-cast); "math" SDPA is the same
    MLP (SwiGLU)            3·N·i·e              (gate, up, silu(gate))
    each LoRA layer         N·r·a (x Aᵀ) + its input x: when a = e the input is a tensor the
                            model keeps anyway, shared by q/k/v and by gate/up (norm outputs
                            N·h·e each, silu(gate)·up N·i·e; o_proj's is SDPA's output, kept
                            already, but a fresh N·h·e after eager attention); when a ≠ e each
                            layer keeps its own up-cast copy, N·d_in·a
    LoRA with dropout       its own dropout(x), N·d_in·a, and the mask: on the CPU a noise
                            tensor as wide (N·d_in·a), on CUDA one byte per value; x itself is no
                            longer kept for it
    DoRA, each layer        + 2·N·d_out·a: W0 x and B A x, kept for the magnitude's gradient

The first block is cheaper when the embeddings are frozen: its input needs no gradient, so its
input norm keeps nothing, dropout there keeps no mask, and eager attention keeps q only if k
needs a gradient (q·kᵀ), k only if q does, and so on: each matmul keeps an operand only for the
other operand's gradient. The same rule drops terms in any block when nothing upstream trains.

**The fused backend** (``backend="fused"``, peftlab/production/fused.py) keeps less: each RMSNorm
N·h·e + N·4 (x as it came, not up-cast); the SwiGLU MLP 2·N·i·e (gate and up; silu(gate) and the
product, the down_proj LoRA's input, are recomputed), unless down_proj has DoRA or dropout; every
LoRA layer's input in the compute dtype, so shared as above even when a ≠ e (with dropout: its
dropout(x) in the compute dtype, N·d_in·e, and mask); DoRA + N·d_out·e (z = W0 x + s B A x); and
the loss keeps d(hidden), N·h·e, instead of the N·V·4 log-probabilities, with one chunk of logits
(~8M values) as its temporaries.

Outside the blocks: the final norm (as above), RoPE's cos and sin (2·T·head_dim·e), and the loss:
``log_softmax`` keeps its fp32 output, N·V·4 bytes, and the targets N·8; the logits' gradient
(two fp32 N·V buffers at the head of backward) is the ``temporaries`` line. Full fine-tuning adds
the head's input (N·h·e) and the embedding's token ids (N·8). With gradient checkpointing, a block
keeps only its input (N·h·e), so activations = L·N·h·e + the rest; one block at a time is
recomputed during backward, after the loss's buffers are freed, and counts as a temporary.

**BERT** blocks (post-LayerNorm, GELU): LayerNorm (x2) N·h·e + 2·N·4 (input, mean, 1/std);
attention as above with k = h (CPU SDPA has no kernel for attention dropout in training, so with
``attention_probs_dropout_prob`` > 0 it runs the eager way, plus the dropout mask and the dropped
probabilities, S·e each); MLP N·i·e (GELU's input); LoRA as above (intermediate.dense reads the
first LayerNorm's output, output.dense the GELU output: N·h·e and N·i·e of their own); two
hidden-dropout masks per block (N·h·e each on the CPU, N·h bytes on CUDA); after the blocks the
pooler's tanh output and the classifier's input (B·h·e each, and a dropout mask between them).
**Soft prompts.** An input prompt (prompt tuning, P-tuning) puts n virtual tokens before every
input: the whole model runs on T + n positions (logits included) and the first block's input
needs a gradient. A prefix (prefix tuning) gives every attention n trained keys and values: SDPA
then gets an explicit (B, 1, T, n + T) mask (kept, B·T·(n+T)·e) and k, v repeated to h wide over
n + T positions.

**Other methods.** Each adapted layer keeps, besides its input x (shared as above): LoRA, LoftQ,
AdaLoRA N·r·a (x Aᵀ; AdaLoRA at its starting rank); VeRA N·(r + d_out)·a and not x (its A is
frozen); LoHa two Hadamard factors, 2·d_out·d_in·a, and LoKr none, plus for both a materialised
ΔW (d_out·d_in·a) wherever x needs a gradient; BitFit nothing (not even x). IA3 and soft prompts
are as above. OFT, BOFT, bottleneck adapters, LLaMA-Adapter and X-LoRA are counted as LoRA of the
same rank on the same layers: on tiny-llama (2 x 64 tokens) their totals stay within 1% of the
measurement, but their own activations differ by 3-50% (OFT's rotation series, LLaMA-Adapter's
gated prompts, X-LoRA's classifier).

Measurement (:func:`measure_memory`) runs one real step: activations are the distinct storages
that ``torch.autograd.graph.saved_tensors_hooks`` sees and the graph still holds when forward ends
(parameters excluded); weights, gradients
and optimiser states are summed from the live tensors; and the process (CPU: RSS; CUDA:
``torch.cuda.max_memory_allocated``) peak above what was resident before the step is reported
next to them.

References: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (https://arxiv.org/abs/2205.05198, per-layer activation arithmetic); Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost" (https://arxiv.org/abs/1604.06174, checkpointing).
"""

from __future__ import annotations

import math
import os
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError

CATEGORIES = ("weights", "adapter_weights", "gradients", "optimizer", "activations", "temporaries")
NF4_BLOCK = 64  # values per absmax block (bitsandbytes' default for 4-bit)
NESTED_BLOCK = 256  # absmax values per block of the second (double) quantization
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class MemoryLedger:
    """Bytes per category of one training step; ``source`` is "estimate" or "measured"."""

    weights: int = 0
    adapter_weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    source: str = "estimate"
    details: dict[str, Any] = field(default_factory=dict)  # per-term bytes, settings, peaks

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def as_dict(self) -> dict[str, int]:
        """{category: bytes} (for ``peftlab.plots.memory_ledger``), plus the total."""
        return {**{c: getattr(self, c) for c in CATEGORIES}, "total": self.total}

    def relative_error(self, measured: MemoryLedger) -> dict[str, float]:
        """(self - measured) / measured per category ``measured`` has (non-zero), and "total"
        over those categories only (a measurement has no ``temporaries``)."""
        out = {}
        mine, theirs = self.as_dict(), measured.as_dict()
        shared = [c for c in CATEGORIES if theirs[c]]
        for c in shared:
            out[c] = (mine[c] - theirs[c]) / theirs[c]
        if shared:
            a, b = sum(mine[c] for c in shared), sum(theirs[c] for c in shared)
            out["total"] = (a - b) / b
        return out

    def table(self, other: MemoryLedger | None = None) -> str:
        """A text table in MB; with ``other``, side by side with the relative difference."""
        rows = [f"{'category':<16}{self.source:>12}" + (f"{other.source:>12}{'diff':>8}" if other else "")]
        for c in CATEGORIES + ("total",):
            a = self.as_dict()[c] / 2**20
            line = f"{c:<16}{a:>12.2f}"
            if other is not None:
                b = other.as_dict()[c] / 2**20
                line += f"{b:>12.2f}" + (f"{(a - b) / b:>+8.1%}" if b else f"{'':>8}")
            rows.append(line)
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# Estimate: config + meta-device model, no weights loaded
# --------------------------------------------------------------------------------------------
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
            the same tensors; "fused" (LoRA and DoRA) keeps fewer (see the module docstring).
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
    fusion = _fusion(model) if backend == "fused" else None

    quantized = _quantizable_linears(model) if quantization == "nf4" else set()
    weights = adapter = grads = optim = 0
    for name, param in _unique_parameters(model):
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

    adapter_dtype = _adapter_dtype(model, torch_dtype)
    # an input soft prompt (prompt tuning, P-tuning) puts n virtual tokens before every input:
    # the whole model runs on seq_len + n positions, all of them downstream of a trained tensor;
    # a prefix (prefix tuning) gives every layer's attention n more keys and values instead
    virtual, prefix = _soft_prompt_tokens(model)
    tokens = seq_len + virtual
    if device is None:
        from peftlab.models import default_device

        device = default_device(quantization)
    if formula_models(config, method):
        acts, terms = activation_bytes(config, model, batch, tokens, torch_dtype, adapter_dtype,
                                       gradient_checkpointing, attn_implementation, full, fusion,
                                       cuda=torch.device(device).type == "cuda", trained_input=virtual > 0,
                                       prefix=prefix, padded=padded)
    else:
        acts, terms = traced_activation_bytes(model, batch, seq_len, gradient_checkpointing,
                                              attn_implementation, padded)
    vocab = int(getattr(config, "vocab_size", 0)) if _is_causal(config) else 0
    rows = batch * tokens
    if fusion is not None and fusion.loss:  # one chunk of logits at a time (and logsumexp's copy)
        from peftlab.production.fused import default_chunk_rows

        rows = min(rows, default_chunk_rows(vocab))
    temporaries = 2 * rows * vocab * 4  # d(log-probs) and d(logits), fp32
    # with checkpointing, each block's activations live again during backward, one block at a
    # time and after the loss's buffers are gone: the larger of the two is the temporary
    temporaries = max(temporaries, terms.get("recomputed_block", 0))
    details = {"activation_terms": terms, "config": type(config).__name__, "method": method or "full",
               "activations_from": "formula" if "traced" not in terms else "traced on the meta device",
               "backend": backend,
               "r": r, "batch": batch, "seq_len": seq_len, "dtype": str(torch_dtype),
               "quantization": quantization, "gradient_checkpointing": gradient_checkpointing,
               "padded": padded,
               "trainable_params": sum(p.numel() for _, p in _unique_parameters(model) if p.requires_grad)}
    return MemoryLedger(weights, adapter, grads, optim, acts, temporaries, "estimate", details)


# Architectures (``config.model_type``) and methods whose activations the formula of the module
# docstring models term by term (tests/test_memory.py holds them within 2% of a measurement);
# every other pair is traced (:func:`traced_activation_bytes`).
FORMULA_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "bert", "roberta"})
FORMULA_METHODS = frozenset({None, "full", "lora", "loftq", "adalora", "dora", "vera", "loha", "lokr", "ia3",
                             "bitfit", "prompt_tuning", "p_tuning", "prefix_tuning"})


def formula_models(config, method: str | None) -> bool:
    """Whether the closed-form ledger covers this architecture and method (BERT's prefix aside:
    its explicit-mask attention path is not the Llama one the prefix terms describe)."""
    if getattr(config, "model_type", None) not in FORMULA_ARCHITECTURES or method not in FORMULA_METHODS:
        return False
    return not (method == "prefix_tuning" and _is_bert(config))


def traced_activation_bytes(model: nn.Module, batch: int, seq_len: int, checkpointing: bool = False,
                            attn: str = "sdpa", padded: bool = False) -> tuple[int, dict[str, int]]:
    """Activations of one step of the meta-device ``model``, counted as :func:`measure_memory`
    counts them: its forward runs on meta tensors (shapes only, no arithmetic) under the same
    ``saved_tensors_hooks``, and the distinct storages the graph still holds at the end are
    summed. Any architecture transformers builds from a config works, and any method.

    Two things differ from a CPU run and are put right: on the meta device, SDPA would take its
    "math" path (which keeps the attention probabilities), so each call takes the kernel the CPU
    picks for the same shapes, dtype, mask and dropout (``torch._fused_sdp_choice``, FlashAttention
    for the CPU in most cases); and transformers' mask code reads values (is the mask all ones? are
    the rows packed?), which meta tensors do not have, so it is told that it is being traced, as
    under torch.compile: it then builds the mask a padded batch gets (``padded``) and takes the
    rows as unpacked (they are: one sequence each)."""
    from unittest import mock

    from transformers import masking_utils

    def key(t: Tensor) -> int:  # meta storages have no address; their StorageImpl is the identity
        return t.untyped_storage()._cdata

    param_storages = {key(p) for p in model.parameters()} | {key(b) for b in model.buffers()}
    saved: dict[int, list[tuple[weakref.ref, int]]] = {}

    def pack(t: Tensor) -> Tensor:
        if key(t) not in param_storages:
            saved.setdefault(key(t), []).append((weakref.ref(t), t.untyped_storage().nbytes()))
        return t

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta") if _is_classifier(model) else ids
    mask = torch.ones(batch, seq_len, dtype=torch.long, device="meta") if padded else None  # values unread
    was_training, impl = model.training, getattr(model.config, "_attn_implementation", None)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        if attn == "eager" and impl is not None:  # "sdpa" is the default; models that cannot
            model.config._attn_implementation = attn  # use it (Gemma 2's soft-capping) chose eager
        real = getattr(masking_utils, "is_tracing", None)
        tracing = mock.patch.object(masking_utils, "is_tracing", lambda t=None: (
            isinstance(t, Tensor) and t.device.type == "meta") or real(t)) if real else mock.patch.dict({})
        with tracing, _CpuAttentionOnMeta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # holds the graph
        total = sum(max((nbytes for ref, nbytes in refs if ref() is not None), default=0)
                    for refs in saved.values())
        del loss
    finally:
        model.train(was_training)
        if impl is not None:
            model.config._attn_implementation = impl
    return total, {"traced": total}


class _CpuAttentionOnMeta(torch.overrides.TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors runs the kernel the CPU would choose."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention or args[0].device.type != "meta":
            return func(*args, **kwargs)
        q, k, v = args[:3]
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        options = dict(zip(names, args[3:])) | kwargs
        mask, p = options.get("attn_mask"), float(options.get("dropout_p", 0.0))
        causal, scale, gqa = bool(options.get("is_causal", False)), options.get("scale"), options.get("enable_gqa", False)

        def standin(t: Tensor) -> Tensor:  # same heads, head size and dtype; two positions
            return torch.zeros(1, *t.shape[1:-2], 2, t.shape[-1], dtype=t.dtype, requires_grad=t.requires_grad)

        small_mask = None if mask is None else torch.ones((1,) * (mask.dim() - 2) + (2, 2), dtype=mask.dtype)
        choice = torch._fused_sdp_choice(standin(q), standin(k), standin(v), small_mask, p, causal,
                                         scale=scale, enable_gqa=gqa)
        if choice == torch.nn.attention.SDPBackend.FLASH_ATTENTION.value:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, p, causal, attn_mask=mask, scale=scale)[0]
        return func(*args, **kwargs)


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


@dataclass
class Fusion:
    """What ``backend="fused"`` replaces in a model (peftlab.production.fused decides the same
    way): the SwiGLU MLPs, the RMSNorms, the loss."""

    swiglu: bool  # Llama-style MLPs: silu(gate) and the product recomputed in backward
    rms_norm: bool  # Llama-style RMSNorms: x and one float per row kept
    loss: bool  # the chunked cross-entropy: no logits kept


def _fusion(model: nn.Module) -> Fusion:
    from peftlab.production.fused import is_rms_norm, is_swiglu_mlp, loss_can_fuse

    modules = list(model.modules())
    return Fusion(swiglu=any(is_swiglu_mlp(m) for m in modules),
                  rms_norm=any(is_rms_norm(m) for m in modules), loss=loss_can_fuse(model))


def _check_backend(backend: str, method: str | None, full: bool) -> None:
    """peftlab.adapt's own checks: a known backend, and a method the fused path has kernels for."""
    from peftlab.api import BACKENDS, unknown_backend

    if backend not in BACKENDS:
        raise unknown_backend(backend)
    if backend == "fused":
        from peftlab.production.fused import check_fusable_method

        check_fusable_method("full fine-tuning" if full else method)


# widths of a block's linear layers, by short name: (input, output)
def _linear_widths(h: int, kv: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
            "query": (h, h), "key": (h, h), "value": (h, h), "dense": (h, h),
            "intermediate.dense": (h, inter), "output.dense": (inter, h)}


def activation_bytes(config, model: nn.Module, batch: int, seq_len: int, dtype: torch.dtype,
                     adapter_dtype: torch.dtype, checkpointing: bool, attn: str,
                     full: bool, fusion: Fusion | None = None, cuda: bool = False,
                     trained_input: bool = False, prefix: int = 0,
                     padded: bool = False) -> tuple[int, dict[str, int]]:
    """The per-block formula of the module docstring; returns (total, {term: bytes}).
    ``fusion``: what the fused backend replaces (None: the reference path); ``cuda``: dropout
    keeps a one-byte mask there, a noise tensor of the input's dtype on the CPU;
    ``trained_input``: the first block's input needs a gradient (an input soft prompt);
    ``prefix``: trained keys and values every attention layer reads first (prefix tuning);
    ``padded``: the batch has an attention mask with zeros."""
    from peftlab.methods.bitfit import BitFit
    from peftlab.methods.dora import DoRA
    from peftlab.methods.loha import LoHa
    from peftlab.methods.lokr import LoKr
    from peftlab.methods.vera import VeRA

    n, t, b = batch * seq_len, seq_len, batch
    e = torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=adapter_dtype).element_size() if not full else e
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = int(config.intermediate_size)
    layers = int(config.num_hidden_layers)
    llama = not _is_bert(config)
    if not llama:
        kv = h
    fused = fusion is not None
    widths = _linear_widths(h, kv, inter)
    if llama:
        qkv, out, ups, down = ("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_proj", "up_proj"), "down_proj"
    else:
        qkv, out, ups, down = ("query", "key", "value"), "dense", ("intermediate.dense",), "output.dense"
    hidden_p = 0.0 if llama else float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0)
    attn_p = float(getattr(config, "attention_dropout" if llama else "attention_probs_dropout_prob",
                           0.0) or 0.0)
    # eager attention, or SDPA with dropout on the CPU (it has no fused kernel for that), runs
    # matmul-softmax-(dropout)-matmul through autograd; otherwise one fused SDPA kernel
    math_attention = attn == "eager" or (attn_p > 0 and not cuda)

    adapters = _adapters_by_block(model)  # {short name: adapter} of layer 0's adapted linears
    adapted = {k: _rank(ad) for k, ad in adapters.items()}
    if full:  # every linear "adapted", with no r-wide intermediate
        adapted, adapters = {k: 0 for k in _block_linears(model)}, {}
    dropped = {k for k, ad in adapters.items()
               if isinstance(getattr(ad, "dropout", None), nn.Dropout) and ad.dropout.p > 0}
    dora = {k for k, ad in adapters.items() if isinstance(ad, DoRA)}
    # layers whose trained tensors need x for their gradient keep it; VeRA's x meets a frozen
    # random A first, and BitFit's bias gradient is the output gradient alone
    plain = adapted.keys() - dropped - {k for k, ad in adapters.items() if isinstance(ad, (VeRA, BitFit))}
    # the fused MLP runs when down_proj is frozen or carries LoRA without dropout
    swiglu = fused and fusion.swiglu and not ({"down_proj"} & (dropped | dora))

    def mask(value_bytes: int) -> int:  # bytes per value of a dropout mask
        return 1 if cuda else value_bytes

    def attention(qg: bool, kg: bool, vg: bool) -> int:
        """What attention keeps when q, k, v need gradients as flagged."""
        if not (qg or kg or vg):
            return 0
        if prefix or (padded and llama):  # an explicit mask (B, 1, T, P + T) goes in, and with it
            # k and v repeated to h wide over P + T positions (no grouped-query shortcut with a mask)
            return 2 * n * h * e + 2 * b * (prefix + t) * h * e + b * t * (prefix + t) * e + n * heads * 4
        if not math_attention:  # q, out, k, v and the logsumexp
            return 2 * n * h * e + 2 * n * kv * e + n * heads * 4
        scores, probs_grad = b * heads * t * t, qg or kg
        # q·kᵀ keeps q for dk and k for dq; probs·v keeps v for d(probs), probs for dv (k and v
        # repeated to h wide in Llama)
        total = n * h * e * (int(kg) + int(qg) + int(probs_grad))
        soft = 4 if llama else e  # Llama's eager softmax runs in fp32
        if probs_grad:
            total += scores * soft  # softmax keeps its output
        if attn_p > 0:
            total += (scores * mask(e) if probs_grad else 0) + (scores * e if vg else 0)
        elif vg and (soft != e or not probs_grad):
            total += scores * e  # the probabilities as probs·v reads them
        return total

    def own_tensors(k: str, qkv_grad: bool) -> int:
        """What an adapted layer keeps besides its input: LoRA (and methods counted as LoRA)
        x Aᵀ; VeRA Λ_d-scaled A x and B Λ_d A x (for Λ_d and Λ_b); LoHa and LoKr a weight-shaped
        ΔW for the input's gradient (none where x needs none) and LoHa its two Hadamard factors."""
        d_in, d_out = widths.get(k, (h, h))
        ad, rank = adapters.get(k), adapted[k]
        input_grad = k not in qkv or qkv_grad
        if isinstance(ad, VeRA):
            return n * (rank + d_out) * a
        if isinstance(ad, (LoHa, LoKr)):
            hadamard = 2 * d_out * d_in * a if isinstance(ad, LoHa) else 0
            return hadamard + (d_out * d_in * a if input_grad else 0)
        return n * rank * a

    def adapter_inputs(qkv_grad: bool, att_kept: bool) -> int:
        """Bytes the adapted layers add by keeping their inputs."""
        # a layer with dropout keeps its own dropout(x) (the fused path in the compute dtype)
        # and the dropout mask (none where x needs no gradient); x itself is no longer needed
        kept = e if fused else a
        total = sum(n * widths.get(k, (h, h))[0] * (kept + (mask(kept) if k not in qkv or qkv_grad
                                                             else 0)) for k in dropped)
        if a != e and not fused:  # the reference up-casts x: each layer keeps its own copy
            return total + sum(n * widths.get(k, (h, h))[0] * a for k in plain)
        # otherwise a layer's input is a tensor shared by the layers reading it
        if plain & set(qkv):
            total += n * h * e  # the block's (normed) input
        if out in plain and not att_kept:
            total += n * h * e  # the attention output (a fused SDPA kernel keeps it anyway)
        if plain & set(ups):
            total += n * h * e  # the second norm's output
        if down in plain and not swiglu:
            total += n * inter * e  # silu(gate) * up, or GELU's output (the fused MLP recomputes it)
        return total

    # RMSNorm keeps x (fp32 unless fused) and 1/rms; a trained weight also x/rms (in e)
    llama_norm = n * h * (e if fused and fusion.rms_norm else 4) + n * 4 + (n * h * e if full else 0)

    def block(first: bool) -> dict[str, int]:
        # frozen embeddings: block 0's input needs no gradient; only what the adapted layers
        # make trainable does
        grad_in = full or trained_input or not first
        qg, kg, vg = (grad_in or k in adapted or (prefix > 0 and k != qkv[0]) for k in qkv)
        mid_grad = qg or kg or vg or out in adapted  # the residual after attention
        mlp_grad = mid_grad or bool(adapted.keys() & {*ups, down})
        terms: dict[str, int] = {}
        if llama:
            terms["norms"] = llama_norm * (int(grad_in) + int(mid_grad))
        else:  # post-LayerNorm: input, mean and 1/std
            norm = n * h * e + 2 * n * 4
            terms["norms"] = norm * (int(mid_grad) + int(mlp_grad))
        terms["attention"] = attention(qg, kg, vg)
        if llama:
            g_grad, u_grad = mid_grad or ups[0] in adapted, mid_grad or ups[1] in adapted
            if swiglu:
                terms["mlp"] = 2 * n * inter * e if (g_grad or u_grad or down in adapted) else 0
            else:  # silu keeps gate; the product keeps silu(gate) and up
                terms["mlp"] = n * inter * e * (2 * int(g_grad) + int(u_grad))
        else:
            terms["mlp"] = n * inter * e if mid_grad or ups[0] in adapted else 0  # GELU's input
            if hidden_p > 0:  # after attention.output.dense and output.dense
                terms["dropout_masks"] = n * h * mask(e) * (int(mid_grad) + int(mlp_grad))
        att_kept = terms["attention"] > 0 and not math_attention
        terms["adapter_inputs"] = adapter_inputs(grad_in, att_kept)
        terms["adapter_tensors"] = sum(own_tensors(k, grad_in) for k in adapted)
        if dora:  # the reference keeps W0 x and B A x for the magnitude's gradient, fused z
            terms["dora_outputs"] = sum(n * widths.get(k, (h, h))[1] * (e if fused else 2 * a)
                                        for k in dora)
        return terms

    terms = block(first=False)
    per_block = {"block": sum(terms.values())}
    if checkpointing:  # each block keeps its input; one block is recomputed at a time, in
        per_block["checkpoint_inputs"] = layers * n * h * e  # backward (a temporary, see above)
        per_block["recomputed_block"] = per_block["block"]
        total = per_block["checkpoint_inputs"]
    else:
        per_block["first_block"] = sum(block(first=True).values())
        total = per_block["first_block"] + (layers - 1) * per_block["block"]
    rest: dict[str, int] = {}
    if llama:
        rest["final_norm"] = llama_norm
        rest["rope"] = 2 * t * head_dim * e
        if full:  # the trained head keeps its input, the trained embeddings their token ids
            rest["head_and_embedding_inputs"] = n * h * e + n * 8
    elif full:  # trained embeddings: their LayerNorm and dropout
        rest["embeddings"] = n * h * e + 2 * n * 4 + (n * h * mask(e) if hidden_p > 0 else 0)
    if _is_causal(config):
        if fused and fusion.loss:  # the chunked loss keeps d(hidden) only
            rest["loss_hidden_grad"] = n * h * e
        else:
            rest["log_softmax"] = n * int(config.vocab_size) * 4
        rest["targets"] = n * 8
    else:  # tanh's output, the trained classifier's input, and dropout between them
        rest["pooler_and_head"] = 2 * b * h * e + (b * h * mask(e) if hidden_p > 0 else 0)
        if full or _pooler_adapted(model):  # a trained pooler keeps the last hidden states
            rest["pooler_input"] = n * h * e  # (its input, the first token's, is a view of them)
    total += sum(rest.values())
    return total, {**{f"per_block.{k}": v for k, v in terms.items()}, **per_block, **rest,
                   "blocks": layers}


# --------------------------------------------------------------------------------------------
# Measure: one real step
# --------------------------------------------------------------------------------------------
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

    param_list = [p for _, p in _unique_parameters(model)]
    device = param_list[0].device
    if input_ids is None:
        vocab = int(model.config.vocab_size)
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    labels = input_ids  # a causal LM predicts its own next tokens
    if _is_classifier(model):  # one class per sequence
        generator = torch.Generator().manual_seed(seed)
        num_labels = int(getattr(model.config, "num_labels", 2))
        labels = torch.randint(0, num_labels, input_ids.shape[:1], generator=generator).to(device)
    trainable = [p for p in param_list if p.requires_grad]
    if not trainable:
        raise ConfigError("measure_memory: the model has no trainable parameters. Expected an "
                          "adapted model (peftlab.adapt) or one with requires_grad weights.")

    weights = tensor_bytes(p for p in param_list if not p.requires_grad)
    weights += tensor_bytes(model.buffers())
    adapter = tensor_bytes(trainable)
    # parameters and buffers are counted as weights: saving one (or a view of one) costs nothing
    param_storages = {_storage_key(p) for p in param_list} | {_storage_key(b) for b in model.buffers()}

    # storage address -> [(tensor saved, its storage's bytes)]; an address freed during forward
    # may come back for another storage, so bytes are kept per tensor
    saved: dict[int, list[tuple[weakref.ref, int]]] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in param_storages:
            saved.setdefault(key, []).append((weakref.ref(t), t.untyped_storage().nbytes()))
        return t

    was_training = model.training
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    _sync(device)
    resident = _resident_bytes(device)
    reset_peak_memory(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    # what the graph still holds when forward ends: a branch whose result was dropped (a weight
    # norm computed and then detached, say) has freed what it saved
    activations = sum(max((nbytes for ref, nbytes in refs if ref() is not None), default=0)
                      for refs in saved.values())
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


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of distinct storages, with a bitsandbytes 4-bit weight's quantization constants."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = _storage_key(t)
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
        if isinstance(t, Tensor) and _storage_key(t) not in seen:
            seen.add(_storage_key(t))
            total += t.untyped_storage().nbytes()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested, seen)
    return total


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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
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

    auto = AutoModelForCausalLM if _is_causal(config) else AutoModelForSequenceClassification
    if getattr(config, "is_encoder_decoder", False):  # T5, BART: the labels are the decoder's targets
        auto = AutoModelForSeq2SeqLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
        if method in (None, "full"):
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            from peftlab.api import adapt
            from peftlab.methods import get_method

            if method == "loftq":  # LoftQ only chooses LoRA's start values: LoRA's shapes
                method, hp = "lora", {k: v for k, v in hp.items() if k != "init"}
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


def _is_bert(config) -> bool:
    return getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta")


def _is_causal(config) -> bool:
    return not _is_bert(config)


def _is_classifier(model: nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForSequenceClassification")


def _quantizable_linears(model: nn.Module) -> set[str]:
    """Names of the linear layers bitsandbytes would store in 4 bits: all but the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head \
                and name.rsplit(".", 1)[-1] not in ("classifier", "score", "lm_head"):
            out.add(name)
    return out


def _unique_parameters(model: nn.Module):
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _adapter_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in model.parameters():
        if p.requires_grad:
            return p.dtype
    return default


def _block_prefix(model: nn.Module) -> str | None:
    for name, _ in model.named_modules():
        for marker in (".layers.0.", ".layer.0."):
            padded = name + "."
            if marker in padded:
                return padded[: padded.index(marker) + len(marker)]
    return None


def _block_linears(model: nn.Module) -> list[str]:
    prefix = _block_prefix(model)
    if prefix is None:
        return []
    names = []
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, nn.Linear):
            names.append(_short(name[len(prefix):]))
    return names


def _adapters_by_block(model: nn.Module) -> dict[str, nn.Module]:
    """{short layer name: its (first) adapter} for the adapted linears of the first block."""
    from peftlab.inject import AdaptedLayer

    prefix = _block_prefix(model)
    out: dict[str, nn.Module] = {}
    if prefix is None:
        return out
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, AdaptedLayer) and module.adapters:
            out[_short(name[len(prefix):])] = next(iter(module.adapters.values()))
    return out


def _rank(adapter: nn.Module) -> int:
    """An adapter's working rank: the rows of its A (AdaLoRA starts above its target r), VeRA's
    Λ_d length, else its ``r`` (0 for methods without one)."""
    for name, dim in (("lora_A", 0), ("vera_lambda_d", 0)):
        value = getattr(adapter, name, None)
        if isinstance(value, Tensor) and value.dim() > dim:
            return int(value.shape[dim])
    return int(getattr(adapter, "r", 0) or 0)


def _soft_prompt_tokens(model: nn.Module) -> tuple[int, int]:
    """(virtual input tokens, prefix tokens) of the model's soft prompt; (0, 0) if none."""
    from peftlab.methods.soft_prompt import SoftPrompt

    for module in model.modules():
        if isinstance(module, SoftPrompt):
            n = int(module.num_virtual_tokens)
            return (0, n) if module.is_prefix else (n, 0)
    return 0, 0


def _pooler_adapted(model: nn.Module) -> bool:
    from peftlab.inject import AdaptedLayer

    return any(name.endswith("pooler.dense") and isinstance(module, AdaptedLayer)
               for name, module in model.named_modules())


def _short(relative: str) -> str:
    """'self_attn.q_proj' -> 'q_proj'; BERT's 'attention.output.dense' -> 'dense', keeping the
    two MLP denses apart ('intermediate.dense', 'output.dense')."""
    parts = relative.split(".")
    if parts[-1] == "dense" and len(parts) >= 2 and parts[0] in ("intermediate", "output"):
        return f"{parts[0]}.dense"
    return parts[-1]


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not known. Expected one of {sorted(set(_DTYPES))}.")
    return _DTYPES[key]


def _storage_key(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr() or id(t)
    except (RuntimeError, NotImplementedError):
        return id(t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    return float(process_rss_bytes())


__all__ = ["CATEGORIES", "MemoryLedger", "estimate_memory", "measure_memory", "nf4_bytes",
           "activation_bytes", "process_rss_bytes", "resolve_config", "tensor_bytes"]


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
