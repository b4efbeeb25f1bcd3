"""Prefix tuning: trained keys and values in front of every attention layer.

Li & Liang, 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation,
https://arxiv.org/abs/2101.00190

Prompt tuning adds virtual tokens at the input only; prefix tuning gives every layer its own.
Layer l attends over n trained key/value pairs before the real ones (paper, section 4.2; as in
peft, the prefix is the layers' past keys and values):

    head_l(x) = softmax(q_t [P_K^l ; K^l]^T / sqrt(d_head)) [P_V^l ; V^l]

    P (n x 2·L·d_kv, trained) ─▶ split per layer ─▶ P_K^0, P_V^0, ..., P_K^(L-1), P_V^(L-1)
                                                   each (n x d_kv) = (kv heads, n, head dim)

d_kv is the width of the keys: kv_heads · head_dim, smaller than d_model under grouped-query
attention (SmolLM2: 3 · 64 = 192, not 576).

Optimising P directly is unstable (section 4.3), so the paper reparameterises it through an MLP
over smaller free vectors (``prefix_projection=True``; hidden size k = encoder_hidden_size):

    P = W2 tanh(W1 P' + b1) + b2,    P' (n x d_kv)

    trainable parameters, L layers, n virtual tokens:
      prefix_projection=False:  n · 2 · L · d_kv
      prefix_projection=True:   n·d_kv + (d_kv·k + k) + (k·2L·d_kv + 2L·d_kv)

After training only P is kept (the paper drops the MLP; peft saves P as ``prompt_embeddings``).
Loading a saved adapter gives ``inference_mode=True``: P is then a plain table. How the prefix
enters the model (a key/value cache, positions shifted by n) is in peftlab/methods/soft_prompt.py.
On an encoder-decoder (T5, BART) it enters the decoder's self-attention only, as in peft: L is the
config's num_hidden_layers, d_kv the decoder's key width, and decoder layer l reads block
(2l mod L) of P (peft's layout, explained there).
Gradient checkpointing must be off: checkpointed layers drop the cache the prefix lives in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.methods.base import is_count
from peftlab.methods.soft_prompt import SoftPrompt, SoftPromptConfig, attach, attention_geometry, prompt_stacks


@dataclass(frozen=True)
class PrefixTuningConfig(SoftPromptConfig):
    # num_virtual_tokens (n, default 20) and inference_mode (True: P is a loaded table, no MLP;
    # a saved adapter holds P, not the MLP that made it) from SoftPromptConfig
    prefix_projection: bool = False  # reparameterise P through an MLP (paper, section 4.3)
    encoder_hidden_size: int | None = None  # k, the MLP's hidden size; None: d_kv (peft's default)
    # None: P ~ N(0, 1); "zero": P = 0 (zero values add nothing, though zero keys still draw
    # some attention weight, so the model does not start exactly at the base model)
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and not is_count(self.encoder_hidden_size):
            raise ConfigError(f"encoder_hidden_size={self.encoder_hidden_size!r} is invalid. "
                              "Expected a positive integer, or None for d_kv.")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights={self.init_weights!r} is not known. Expected None "
                              "(random) or 'zero'.")


class PrefixEncoder(SoftPrompt):
    """P (n, 2·L·d_kv), directly or through the MLP (peft: PrefixEncoder)."""

    is_prefix = True

    def __init__(self, config: PrefixTuningConfig, layers: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_virtual_tokens, self.layers, self.kv_heads, self.head_dim = (
            config.num_virtual_tokens, layers, kv_heads, head_dim)
        n, d_kv = config.num_virtual_tokens, kv_heads * head_dim
        width = 2 * layers * d_kv  # keys and values of every layer, side by side
        self.projected = config.prefix_projection and not config.inference_mode
        if self.projected:
            k = config.encoder_hidden_size or d_kv
            self.embedding = nn.Embedding(n, d_kv)  # P': weight (n, d_kv)
            self.transform = nn.Sequential(nn.Linear(d_kv, k), nn.Tanh(), nn.Linear(k, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)  # P: weight (n, 2·L·d_kv)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prompt(self) -> Tensor:
        if self.projected:
            return self.transform(self.embedding.weight)  # (n, d_kv) -> (n, 2·L·d_kv)
        return self.embedding.weight  # (n, 2·L·d_kv)

    def batched_prompt(self, batch: int) -> Tensor:
        """The MLP runs on every row's copy of P', as peft runs it: the same numbers, but a
        (B·n)-row matrix product, which a CPU's kernels may round differently from an n-row one."""
        if not self.projected:
            return super().batched_prompt(batch)
        tokens = torch.arange(self.num_virtual_tokens, device=self.embedding.weight.device).expand(batch, -1)
        return self.transform(self.embedding(tokens))  # (B, n, d_kv) -> (B, n, 2·L·d_kv)


def build_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> None:
    """Add a prefix-tuning adapter named ``adapter_name`` to ``model``."""
    prompt_stacks(model, config, "prefix tuning")
    attach(model, PrefixEncoder(config, *attention_geometry(model)), adapter_name)


def resolve_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
    """adapt()'s early check, for either backend: the model must read a key/value cache."""
    check_reads_a_cache(model)
    return config


def check_reads_a_cache(model: nn.Module) -> None:
    """The prefix is the layers' past keys and values, so the model must take a cache
    (``past_key_values``), itself or in its transformer backbone, as peft checks it too.
    DistilBERT takes none: its attention would never see the prefix, which would not train."""
    backbone = getattr(model, "base_model", model)
    if any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone)):
        return
    raise ConfigError(
        f"Prefix tuning needs a model whose attention reads past keys and values (a "
        f"past_key_values argument), and {type(model).__name__} takes none, so the prefix would "
        "never reach the attention (peft refuses it for the same reason). Expected a model with "
        "a key/value cache (Llama, GPT-2, BERT, ...); on this one try prompt_tuning or p_tuning, "
        "which put trained vectors at the input instead."
    )


def prefix_tuning_parameter_count(model: nn.Module, config: PrefixTuningConfig) -> int:
    """Closed form of the trainable parameters (module docstring)."""
    layers, kv_heads, head_dim = attention_geometry(model)
    n, d_kv = config.num_virtual_tokens, kv_heads * head_dim
    if not config.prefix_projection or config.inference_mode:
        return n * 2 * layers * d_kv
    k = config.encoder_hidden_size or d_kv
    return n * d_kv + (d_kv * k + k) + (k * 2 * layers * d_kv + 2 * layers * d_kv)
