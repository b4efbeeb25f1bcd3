"""The memory ledger: where the bytes of a training step go, predicted and measured.

    est = peftlab.estimate_memory("smollm2-135m", "lora", r=16, batch=2, seq_len=64, targets="all-linear")
    model = peftlab.adapt(peftlab.load_model("smollm2-135m")[0], "lora", r=16)
    got = peftlab.measure_memory(model, batch=2, seq_len=64)
    print(est.table(got))

Categories (bytes), the same for both:

    weights          frozen base weights as stored: dense, or 4-bit codes + their constants
    adapter_weights  trainable parameters (the adapter; every weight for full fine-tuning)
    gradients        one gradient per trainable parameter, same dtype
    optimizer        AdamW: two moments per trainable parameter, in the parameter's dtype
                     (fp32 for peftlab's adapters), plus a one-element step counter each
    activations      tensors saved by the forward pass for backward (logits included)
    temporaries      the biggest short-lived buffer of backward: the logits' gradient
                     (estimate only: nothing saves it, so the hooks below cannot see it)

**4-bit weights** (bitsandbytes NF4, QLoRA; Dettmers et al. 2023, https://arxiv.org/abs/2305.14314):
n values cost n/2 bytes of codes, one absmax per block of 64 values (fp32, or with double
quantization uint8 plus one fp32 per 256 blocks and a 256-entry fp32 code book), and the
16-entry NF4 code book; the output head and the embeddings stay in the model dtype.

**Activations of a Llama decoder block**, N = batch · seq_len tokens, h hidden size, k the key /
value width (n_kv_heads · head_dim), i the MLP width, r the rank, e bytes per activation value
(4 fp32, 2 bf16), a bytes per adapter value (peftlab's adapters are fp32), n_h heads:

    RMSNorm (x2)            N·h·4 + N·4         (it up-casts to fp32 and keeps x and 1/rms)
    attention, SDPA         2·N·h·e + 2·N·k·e + N·n_h·4    (q, out, k, v, logsumexp)
    attention, eager        + B·n_h·T²·4 (the probabilities) [+ B·n_h·T²·e if e ≠ 4], and k, v
                            are kept repeated to h wide; out is copied (+N·h·e)
    MLP (SwiGLU)            3·N·i·e              (gate, up, silu(gate))
    each LoRA layer         N·r·a (x Aᵀ) + its input x: when a = e the input is a tensor the
                            model keeps anyway, shared by q/k/v and by gate/up (norm outputs
                            N·h·e each, silu(gate)·up N·i·e); when a ≠ e each layer keeps its
                            own up-cast copy, N·d_in·a
    the first block's input norm saves nothing when the embeddings are frozen.

Outside the blocks: the final norm (as above), RoPE's cos and sin (2·T·head_dim·e), and the loss:
``log_softmax`` keeps its fp32 output, N·V·4 bytes, and the targets N·8; the logits' gradient
(two fp32 N·V buffers at the head of backward) is the ``temporaries`` line. With gradient
checkpointing, a block keeps only its input (N·h·e) and one block at a time is recomputed during
backward, so activations = L·N·h·e + one block + the rest. **BERT** blocks (post-LayerNorm, GELU)
use: LayerNorm (x2) N·h·e + 2·N·4, attention as above with k = h, MLP 2·N·i·e, LoRA as above, plus
dropout masks (N·h bytes, three per block) when hidden dropout is on. Other methods than LoRA
are counted as LoRA of the same rank on the same layers (their own tensors are the same order).

Measurement (:func:`measure_memory`) runs one real step: activations are the distinct storages
that ``torch.autograd.graph.saved_tensors_hooks`` sees (parameters excluded); weights, gradients
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
    r: int = 16,
    batch: int = 4,
    seq_len: int = 128,
    dtype: torch.dtype | str = torch.float32,
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    *,
    targets: str | tuple[str, ...] | None = None,
    attn_implementation: str = "sdpa",
    **hyperparameters: Any,
) -> MemoryLedger:
    """Predict the memory of one training step before loading anything.

    Args:
        model_name_or_config: a bundled model name ("smollm2-135m", "tiny-llama", ...), a local
            folder or hub id (its config.json only), a transformers ``PretrainedConfig``, or a
            model (its ``.config``).
        method: a registered peftlab method, or None / "full" for full fine-tuning.
        r: rank of the adapter (ignored for full fine-tuning).
        batch, seq_len: the step's input shape.
        dtype: dtype of the weights and activations (fp32, bf16, fp16).
        quantization: None or "nf4" (bitsandbytes 4-bit, double quantization).
        gradient_checkpointing: recompute each block's activations in backward.
        targets: the adapter's target layers, e.g. "all-linear"; default: the method's own
            defaults, exactly what ``peftlab.adapt(model, method)`` would adapt.
        attn_implementation: "sdpa" (transformers' default) or "eager".
        **hyperparameters: other fields of the method's config (alpha, dropout, ...).

    Returns:
        A :class:`MemoryLedger` with ``source="estimate"``; ``details`` holds the terms.
    """
    torch_dtype = _resolve_dtype(dtype)
    if quantization not in (None, "nf4"):
        raise ConfigError(f"quantization={quantization!r} is not supported. Expected None or 'nf4'.")
    if batch < 1 or seq_len < 1:
        raise ConfigError(f"batch and seq_len must be positive (got {batch}, {seq_len}).")
    config = resolve_config(model_name_or_config)
    model = meta_model(config, torch_dtype, method, r, targets, **hyperparameters)
    full = method in (None, "full")

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
    acts, terms = activation_bytes(config, model, batch, seq_len, torch_dtype, adapter_dtype,
                                   gradient_checkpointing, attn_implementation, full)
    vocab = int(getattr(config, "vocab_size", 0)) if _is_causal(config) else 0
    temporaries = 2 * batch * seq_len * vocab * 4  # d(log-probs) and d(logits), fp32
    details = {"activation_terms": terms, "config": type(config).__name__, "method": method or "full",
               "r": r, "batch": batch, "seq_len": seq_len, "dtype": str(torch_dtype),
               "quantization": quantization, "gradient_checkpointing": gradient_checkpointing,
               "trainable_params": sum(p.numel() for _, p in _unique_parameters(model) if p.requires_grad)}
    return MemoryLedger(weights, adapter, grads, optim, acts, temporaries, "estimate", details)


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


def activation_bytes(config, model: nn.Module, batch: int, seq_len: int, dtype: torch.dtype,
                     adapter_dtype: torch.dtype, checkpointing: bool, attn: str,
                     full: bool) -> tuple[int, dict[str, int]]:
    """The per-block formula of the module docstring; returns (total, {term: bytes})."""
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

    adapted = _adapted_by_block(model)  # {short name: rank} of layer 0's adapted linears
    if full:  # every linear "adapted", with no r-wide intermediate
        adapted = {k: 0 for k in _block_linears(model)}

    def lora_inputs(shared_ok: bool) -> int:
        """Bytes the adapted layers add by keeping their inputs."""
        if not adapted:
            return 0
        width = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h,
                 "down_proj": inter, "query": h, "key": h, "value": h, "dense": h,
                 "intermediate.dense": h, "output.dense": inter}
        if not shared_ok:  # a != e: each adapted layer keeps its own up-cast copy
            return sum(n * width.get(k, h) * a for k in adapted)
        total = 0
        if llama:
            if adapted.keys() & {"q_proj", "k_proj", "v_proj"}:
                total += n * h * e  # input_layernorm's output
            if adapted.keys() & {"gate_proj", "up_proj"}:
                total += n * h * e  # post_attention_layernorm's output
            if "down_proj" in adapted:
                total += n * inter * e  # silu(gate) * up
        else:
            if adapted.keys() & {"query", "key", "value"}:
                total += n * h * e  # the block input (previous LayerNorm output)
            # attention.output.dense reads the attention output (kept by SDPA), intermediate.dense
            # the first LayerNorm's output (kept by that norm), output.dense the GELU output
            if "output.dense" in adapted:
                total += n * inter * e
        return total

    shared_ok = a == e
    terms: dict[str, int] = {}
    if llama:
        norm = n * h * 4 + n * 4
        terms["norms"] = 2 * norm
        if attn == "eager":
            att = 3 * n * h * e + b * heads * t * t * 4 + (b * heads * t * t * e if e != 4 else 0)
            att += n * h * e  # the transposed output copied for o_proj
        else:
            att = 2 * n * h * e + 2 * n * kv * e + n * heads * 4
        terms["attention"] = att
        terms["mlp"] = 3 * n * inter * e
    else:
        terms["norms"] = 2 * (n * h * e + 2 * n * 4)
        att = 4 * n * h * e + n * heads * 4
        if attn == "eager":
            att = 3 * n * h * e + b * heads * t * t * (4 + (e if e != 4 else 0)) + n * h * e
        terms["attention"] = att
        terms["mlp"] = 2 * n * inter * e
        if float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0) > 0:
            terms["dropout_masks"] = 3 * n * h
    terms["adapter_inputs"] = lora_inputs(shared_ok)
    terms["adapter_rank"] = sum(n * rank * a for rank in adapted.values())
    block = sum(terms.values())
    first_norm_saved = full  # frozen embeddings: nothing upstream of block 0 needs a gradient
    per_block = {"block": block}
    if checkpointing:
        total = layers * n * h * e + block
        per_block["checkpoint_inputs"] = layers * n * h * e
    else:
        total = layers * block - (0 if first_norm_saved or not llama else n * h * 4 + n * 4)
    rest: dict[str, int] = {}
    if llama:
        rest["final_norm"] = n * h * 4 + n * 4
        rest["rope"] = 2 * t * head_dim * e
    if _is_causal(config):
        rest["log_softmax"] = n * int(config.vocab_size) * 4
        rest["targets"] = n * 8
    else:
        rest["pooler_and_head"] = 2 * b * h * e
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
    lr: float = 1e-5,
    seed: int = 0,
) -> MemoryLedger:
    """Measure the ledger's categories during one real training step of ``model``.

    ``model`` is ready to train (adapted, or all weights trainable for full fine-tuning; any
    backend, 4-bit bases included). One step runs on random tokens (or ``input_ids``): forward
    with ``labels``, backward, ``torch.optim.AdamW`` step. The model's trainable weights change
    (by one small step): measure a copy if that matters.

    Returns:
        A :class:`MemoryLedger` with ``source="measured"``; ``details`` holds the process's
        resident bytes before the step and its peak above that (CPU: RSS; CUDA: allocated).
    """
    from peftlab.train import peak_memory_mb, reset_peak_memory

    param_list = [p for _, p in _unique_parameters(model)]
    device = param_list[0].device
    if input_ids is None:
        vocab = int(model.config.vocab_size)
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    input_ids = input_ids.to(device)
    trainable = [p for p in param_list if p.requires_grad]
    if not trainable:
        raise ConfigError("measure_memory: the model has no trainable parameters. Expected an "
                          "adapted model (peftlab.adapt) or one with requires_grad weights.")

    weights = tensor_bytes(p for p in param_list if not p.requires_grad)
    weights += tensor_bytes(model.buffers())
    adapter = tensor_bytes(trainable)
    param_storages = {_storage_key(p) for p in param_list}

    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in param_storages:  # a parameter (or a view of one) costs nothing extra
            saved[key] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    _sync(device)
    resident = _resident_bytes(device)
    reset_peak_memory(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    activations = sum(saved.values())
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
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module):
        inner = source.get_base_model() if hasattr(source, "get_base_model") else source
        return inner.config
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"estimate_memory: cannot read a model config from {type(source).__name__}. "
                          "Expected a bundled name, a folder, a hub id, a PretrainedConfig or a model.")
    from peftlab import models

    name = str(source)
    if name == "tiny-llama":
        return models._tiny_llama_config()
    if name == "tiny-bert":
        return models._tiny_bert_config(2)
    if name == "smollm2-135m":
        folder = models._cache_root() / models._smollm2_folder_name()
        if (folder / "config.json").exists():
            return AutoConfig.from_pretrained(folder)
        gguf = models._smollm2_gguf()  # metadata only: the tensors are not read
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if name == "minilm-l6":
        config = AutoConfig.from_pretrained(models._minilm_dir())
        config.num_labels = 2
        return config
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as err:
        raise ConfigError(f"estimate_memory: no config for {name!r} ({err}). Expected a bundled "
                          "name (see `peftlab info`), a local folder or a reachable hub id.") from None


def meta_model(config, dtype: torch.dtype, method: str | None, r: int, targets, **hp) -> nn.Module:
    """The model built on the meta device (shapes only) and adapted with peftlab's reference."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if _is_causal(config) else AutoModelForSequenceClassification
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
            extra = {"r": r} if "r" in takes else {}
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


def _adapted_by_block(model: nn.Module) -> dict[str, int]:
    """{short layer name: rank} for the adapted linears of the first block."""
    from peftlab.inject import AdaptedLayer

    prefix = _block_prefix(model)
    out: dict[str, int] = {}
    if prefix is None:
        return out
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, AdaptedLayer):
            ranks = [int(getattr(ad, "r", 0) or 0) for ad in module.adapters.values()]
            out[_short(name[len(prefix):])] = max(ranks, default=0)
    return out


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
