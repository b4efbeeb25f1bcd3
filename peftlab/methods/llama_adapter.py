"""LLaMA-Adapter: zero-init attention with learnable adaption prompts.

Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention", https://arxiv.org/abs/2303.16199 (section 3.1-3.2)

In each of the top L decoder layers, K learnable prompt vectors P (K x d_model) become extra keys
and values that every token can attend to. Their attention is computed with its own softmax and
multiplied by a gate g that starts at ZERO, so at initialisation the model is exactly the
pretrained one and the prompts fade in as g learns (paper, eq. 8-10):

    q = RoPE(W_q x)                        the layer's own queries, with rotary positions
    k_p = W_k P,  v_p = W_v P              the prompts through the frozen key/value projections
                                           (no positions: the prompts sit "outside" the sequence)
    h' = h + W_o ( g · softmax(q k_pᵀ / √d_head) v_p )

         x ─── attention (frozen) ─────────────────── h ──(+)──▶ h'
         │                                                  │
         └─ q ─┬─ softmax(q k_pᵀ/√d) · g ─ · v_p ─ W_o ─────┘
               │      ▲ gate g = 0 at init
         P ── W_k, W_v (frozen) ─ k_p, v_p

Trainable: K · d_model prompt numbers and one gate per adapted layer. The prompts start from
N(0, 1) (the official code's nn.Embedding init) and the gate at 0; with grouped-query attention
the prompt's key/value heads are repeated like the model's own.

This matches Hugging Face peft's ``AdaptionPromptConfig(adapter_len=K, adapter_layers=L)``
exactly (one scalar gate per layer, the separate softmax, W_o applied to the prompt branch), on
the architectures peft 0.21 supports: Llama-style attention (llama, mistral) as above, and GPT-2,
where peft's variant differs in three ways, followed here:

    q, _, _ = c_attn(x).split(d_model)     queries from the fused projection (its bias too),
    _, k_p, v_p = c_attn(P).split(d_model)  no rotary positions (GPT-2 adds positions at the input)
    h' = h + g · softmax(q k_pᵀ / √d_head) v_p      no output projection on the prompt branch:
                                                    h is already past c_proj

peft wraps each attention module the same way peftlab does: ``PromptedAttention`` holds the
original attention as ``base_layer``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, AdaptedLayer, set_module, candidate_modules, matches
from peftlab.methods.base import AdapterConfig, is_count

# peft 0.21's AdaptionPrompt: Llama-architecture attention, and GPT-2's (its own variant)
SUPPORTED = ("llama", "mistral", "gpt2")
ATTENTION_TARGETS = {"llama": ("self_attn",), "mistral": ("self_attn",), "gpt2": ("attn",)}


@dataclass(frozen=True)
class LlamaAdapterConfig(AdapterConfig):
    adapter_len: int = 10  # K: prompt vectors per layer (the paper's 10)
    adapter_layers: int | None = None  # L: adapted layers, from the top; None: all of them
    # (the paper adapts the top 30 of LLaMA-7B's 32 layers)

    def __post_init__(self) -> None:
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if value is not None and not is_count(value):
                raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer "
                                  "(the paper: adapter_len=10, adapter_layers=30).")


def attention_modules(model: nn.Module, config: LlamaAdapterConfig) -> list[str]:
    """Names of the attention modules matching the targets, in layer order (bottom first)."""
    targets = config.targets if isinstance(config.targets, (str, tuple)) else tuple(config.targets)
    return [n for n, _ in candidate_modules(model).items() if matches(n, targets)]


def resolve_llama_adapter(model: nn.Module, config: LlamaAdapterConfig) -> LlamaAdapterConfig:
    """Refuse non-Llama models clearly; fill in adapter_layers (all layers) for this model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"LLaMA-Adapter works on the architectures peft's AdaptionPrompt knows (model_type "
            f"{', '.join(SUPPORTED)}), and this is a {model_type or type(model).__name__!r} model. It "
            "recomputes each attention's queries, so it needs that attention's own layout (Llama's "
            "q_proj, k_proj, v_proj, o_proj with rotary positions, or GPT-2's c_attn). Expected e.g. "
            "peftlab.load_model('smollm2-135m') or 'tiny-llama'; for this model try 'prompt_tuning' "
            "or 'lora'."
        )
    found = attention_modules(model, config)
    if not found:
        expected = ATTENTION_TARGETS[model_type]
        raise ConfigError(f"Targets {config.targets!r} matched no attention module. Expected "
                          f"{expected!r}, the {model_type} attention modules.")
    layers = config.adapter_layers or len(found)
    if layers > len(found):
        raise ConfigError(f"adapter_layers={layers} is more than the model's {len(found)} attention "
                          f"layers. Expected at most {len(found)}.")
    return dataclasses.replace(config, adapter_layers=layers)


def rotate_half(x: Tensor) -> Tensor:
    """RoPE's rotation: (x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AdaptionPrompt(Adapter):
    """h' = h + W_o(g · softmax(RoPE(W_q x) (W_k P)ᵀ / √d) W_v P) on one attention module."""

    mergeable = False
    unmergeable_reason = "the prompts add attention over extra keys and values, not a change of any weight"

    def __init__(self, attention: nn.Module, config: LlamaAdapterConfig) -> None:
        super().__init__()
        cfg = attention.config
        self.gpt2 = hasattr(attention, "c_attn")  # GPT-2's fused projection (module docstring)
        dtype = (attention.c_proj if self.gpt2 else attention.q_proj).weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32  # a quantised base: fp32 prompts
        self.adapter_len = config.adapter_len
        self.adaption_prompt = nn.Parameter(torch.randn(1, config.adapter_len, cfg.hidden_size, dtype=dtype))
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype))  # zero-init: output unchanged

    def forward(self, hidden_states: Tensor, attention: nn.Module, output: Tensor,
                position_embeddings: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.gpt2:
            return self._gpt2(hidden_states, attention, output)
        cfg = attention.config
        head_dim, n_heads, n_kv = attention.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        bsz, q_len, _ = hidden_states.shape
        # the layer's own queries, recomputed, with rotary positions: (B, H, T, d)
        q = attention.q_proj(hidden_states).view(bsz, q_len, n_heads, head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # (B, 1, T, d)
        q = q * cos + rotate_half(q) * sin
        # the prompts' keys and values, without positions: (1, H, K, d) after repeating kv heads
        k = attention.k_proj(self.adaption_prompt).view(1, self.adapter_len, n_kv, head_dim).transpose(1, 2)
        v = attention.v_proj(self.adaption_prompt).view(1, self.adapter_len, n_kv, head_dim).transpose(1, 2)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=1) for t in (k, v))
        scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(head_dim)  # (B, H, T, K)
        probs = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        prompt_out = (probs @ v).transpose(1, 2).reshape(bsz, q_len, -1)  # (B, T, H·d)
        return (output + attention.o_proj(prompt_out)).to(q.dtype)

    def _gpt2(self, hidden_states: Tensor, attention: nn.Module, output: Tensor) -> Tensor:
        """h + g · softmax(q k_pᵀ / √d) v_p, all from c_attn, with no positions and no c_proj."""
        heads, head_dim = attention.config.num_attention_heads, attention.head_dim
        bsz, q_len, d_model = output.shape
        q = attention.c_attn(hidden_states).split(d_model, dim=2)[0]
        q = q.view(bsz, q_len, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        _, k, v = attention.c_attn(self.adaption_prompt).split(d_model, dim=2)
        k, v = (t.view(1, self.adapter_len, heads, head_dim).transpose(1, 2) for t in (k, v))  # (1, H, K, d)
        scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(head_dim)  # (B, H, T, K)
        probs = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        prompt_out = (probs @ v).transpose(1, 2).reshape(bsz, q_len, -1)  # (B, T, d_model)
        return (output + prompt_out).to(q.dtype)


class PromptedAttention(AdaptedLayer):
    """An attention module plus adaption prompts. transformers calls attention with keyword
    arguments and gets (output, weights) back, so this wrapper passes everything through and
    adds the active prompts' contribution to the output."""

    def forward(self, *args, **kwargs):
        output, *rest = self.base_layer(*args, **kwargs)
        if self.disabled:
            return (output, *rest)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        # Llama's (cos, sin); GPT-2's attention takes none (its branch does not read this)
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        for name in self.active:
            output = self.adapters[name](hidden, self.base_layer, output, position_embeddings)
        return (output, *rest)


def build_llama_adapter(model: nn.Module, config: LlamaAdapterConfig, adapter_name: str) -> None:
    """Wrap the top ``adapter_layers`` attention modules and give each its prompts and gate."""
    for name in attention_modules(model, config)[-config.adapter_layers:]:
        module = model.get_submodule(name)
        layer = module if isinstance(module, PromptedAttention) else PromptedAttention(module)
        if adapter_name in layer.adapters:
            raise ConfigError(f"Layer {name!r} already has an adapter named {adapter_name!r}. "
                              "Expected a new name; try adapter_name='other'.")
        device = next(layer.base_layer.parameters()).device
        layer.adapters[adapter_name] = AdaptionPrompt(layer.base_layer, config).to(device)
        layer.active = [adapter_name]
        if layer is not module:
            set_module(model, name, layer)


def llama_adapter_parameter_count(model: nn.Module, config: LlamaAdapterConfig) -> int:
    """Closed form: adapter_layers · (adapter_len · d_model + 1)."""
    return config.adapter_layers * (config.adapter_len * model.config.hidden_size + 1)
