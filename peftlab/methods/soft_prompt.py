"""How a soft prompt enters a model: shared by prompt tuning, P-tuning and prefix tuning.

Soft-prompt methods change no weight of the model. They learn n "virtual tokens" that the frozen
model reads before the real ones, in one of two places:

    input prompt (prompt tuning, P-tuning): n vectors of size d_model before the input embeddings

        [p_1 ... p_n, E x_1 ... E x_T] ──▶ frozen transformer ──▶ logits for n + T positions

    prefix (prefix tuning): n extra keys and values in every attention layer l

        attention(q_t, [P_K^l ; K^l], [P_V^l ; V^l])  ──▶ logits for T positions

How peftlab attaches them, without touching the transformer's code:

    model.model.embed_tokens       AdaptedLayer (the model's input embedding layer)
        ├── base_layer             nn.Embedding, frozen, its output unchanged
        └── adapters["default"]    the soft prompt's trainable module (a SoftPrompt)
    model                          one forward pre-hook, insert_soft_prompt

The trainable module lives beside the word embeddings it extends, so peftlab's usual switches work
on it unchanged: only parameters under ``.adapters.<name>.`` train, ``set_active`` picks a named
adapter, ``set_disabled`` gives back exactly the base model, and merging refuses (a prompt is no
change of a weight). The pre-hook rewrites the arguments of every call of the model, so training
code and ``generate`` keep calling ``model(input_ids=..., attention_mask=..., labels=...)``:

    input prompt  input_ids        -> inputs_embeds = [P ; E input_ids]     (first call only)
                  attention_mask   -> [1 ... 1 ; attention_mask]            (every call)
                  labels (per token) -> [-100 ... -100 ; labels]            (no loss on P)
                  position_ids     -> dropped: the model numbers all n + T positions itself
                  token_type_ids   -> [0 ... 0 ; token_type_ids] for a classifier (BERT);
                                      dropped for a causal LM
    prefix        past_key_values  -> a cache holding P_K^l, P_V^l of every layer (first call)
                  attention_mask   -> [1 ... 1 ; attention_mask]            (every call)
                  position_ids     -> position_ids + n: real tokens come after the prefix

"First call" means the model has no cache yet (a training step, or the prefill of ``generate``);
later decoding steps find the prompt already in the cache. With ``use_cache=False`` every call
is a first call. These are the conventions of Hugging Face peft's PeftModelForCausalLM and
PeftModelForSequenceClassification (peft 0.21), so both give the same logits, gradients and
generated tokens. In particular an input prompt's logits cover the n virtual positions too,
shape (B, n + T, V), as in peft; a classifier's labels (one per sequence) are left alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, AdaptedLayer, base_of, inject
from peftlab.methods.base import AdapterConfig


@dataclass(frozen=True)
class SoftPromptConfig(AdapterConfig):
    """Fields every soft-prompt method shares. ``targets`` is always None: a soft prompt adapts
    no layer (it sits on the input embeddings), so peftlab's default targets do not apply."""

    num_virtual_tokens: int = 20  # n, the number of virtual tokens
    # True: the prompt is a plain table to be loaded (what a saved adapter holds, peft's
    # "prompt_embeddings"), so it is neither initialised nor computed by an encoder
    inference_mode: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", None)
        check_virtual_tokens(self.num_virtual_tokens)


class SoftPrompt(Adapter):
    """A soft prompt's trainable module. It sits on the input embedding layer but leaves that
    layer's output alone; :func:`insert_soft_prompt` puts ``prompt()`` into the model."""

    mergeable: ClassVar[bool] = False
    unmergeable_reason: ClassVar[str] = ("a soft prompt adds virtual tokens the model reads, not a change "
                                         "of any weight")
    is_prefix: ClassVar[bool] = False  # True: keys/values of every layer; False: input embeddings
    num_virtual_tokens: int

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        return result  # the word embeddings themselves are unchanged

    def prompt(self) -> Tensor:
        """The virtual tokens: (n, d_model) for an input prompt, (n, 2 · layers · d_kv) for a
        prefix. This is also what peft saves, as ``prompt_embeddings``."""
        raise NotImplementedError

    def batched_prompt(self, batch: int) -> Tensor:
        """``prompt()`` for each of ``batch`` rows: (batch, n, width)."""
        return self.prompt().expand(batch, -1, -1)


# --------------------------------------------------------------------------------------------
# What the methods need to know about a model
# --------------------------------------------------------------------------------------------
def input_embedding_name(model: nn.Module) -> str:
    """Module path of the model's input embedding layer (``model.embed_tokens`` for Llama)."""
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    for name, module in model.named_modules():
        if embedding is not None and module is embedding:
            return name
    raise ConfigError(
        f"{type(model).__name__} has no input embedding layer that peftlab can find (it asks "
        "model.get_input_embeddings()). Soft prompts need one: they are extra input embeddings. "
        "Expected a transformers model; try a causal LM or a sequence classifier."
    )


def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The frozen nn.Embedding of the vocabulary (unwrapped if it already carries adapters)."""
    layer = model.get_submodule(input_embedding_name(model))
    return base_of(layer)


def attention_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers model, as peft reads them.

    With grouped-query attention (Llama, SmolLM2) keys and values have fewer heads than queries,
    so a prefix vector is d_kv = kv_heads · head_dim wide, not d_model."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            f"{type(model).__name__} has no transformers config, so peftlab cannot tell its number "
            "of layers and attention heads. Expected a transformers model."
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B style multi-query attention: one key/value head for every query
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def is_sequence_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


# --------------------------------------------------------------------------------------------
# Attaching
# --------------------------------------------------------------------------------------------
_CHECKPOINTING_MESSAGE = (
    "Prefix tuning does not work with gradient checkpointing: the prefix lives in the key/value "
    "cache, which transformers' checkpointed layers drop (past_key_values=None). Expected "
    "gradient checkpointing off: peftlab.train(..., gradient_checkpointing=False), "
    "model.activation_checkpointing_disable(), or, with peft's prepare_model_for_kbit_training, "
    "use_gradient_checkpointing=False. Prompt tuning and P-tuning work with it."
)


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def attach(model: nn.Module, prompt: SoftPrompt, adapter_name: str) -> None:
    """Put ``prompt`` on the input embedding layer and make sure the pre-hook is installed."""
    if prompt.is_prefix and _checkpointing(model):
        raise ConfigError(_CHECKPOINTING_MESSAGE)
    inject(model, [input_embedding_name(model)], lambda _name, _base: prompt, adapter_name)
    if insert_soft_prompt not in model._forward_pre_hooks.values():
        # a module-level function (not a closure), so copy.deepcopy(model) keeps working
        model.register_forward_pre_hook(insert_soft_prompt, with_kwargs=True)


def active_soft_prompt(model: nn.Module) -> SoftPrompt | None:
    """The soft prompt that runs now: None when adapters are disabled or another one is active."""
    get_in = getattr(model, "get_input_embeddings", None)
    layer = get_in() if callable(get_in) else None
    if not isinstance(layer, AdaptedLayer) or layer.disabled or not layer.active:
        return None
    adapter = layer.adapters[layer.active[0]]
    return adapter if isinstance(adapter, SoftPrompt) else None


# --------------------------------------------------------------------------------------------
# The pre-hook: the one place where a soft prompt meets the model
# --------------------------------------------------------------------------------------------
def insert_soft_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of an adapted model: rewrite the call so the active soft prompt is read
    first (module docstring). Returns None (call unchanged) when no soft prompt is active."""
    prompt = active_soft_prompt(model)
    if prompt is None:
        return None
    if args:  # model(ids, mask): name the positional arguments
        names = list(inspect.signature(model.forward).parameters)
        kwargs = {**dict(zip(names, args)), **kwargs}
    n = prompt.num_virtual_tokens
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    batch = (ids if ids is not None else embeds).shape[0]
    cache = kwargs.get("past_key_values")
    if kwargs.get("use_cache") is False and cache is not None:
        # no cache wanted: one passed in is stale (generate(use_cache=False) hands back the prefix
        # cache the model returned), so start afresh; peft 0.21 crashes here instead
        cache = kwargs["past_key_values"] = None
    first_call = cache is None or cache.get_seq_length() == 0  # else the prompt is in the cache

    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ConfigError(
                f"Soft prompts need a 2-D attention_mask (batch, tokens); got {mask.dim()}-D. "
                "Expected the tokenizer's mask; pass that, or none."
            )
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + T)

    if prompt.is_prefix:
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if first_call:
            kwargs["past_key_values"] = prefix_cache(model, prompt, batch, cache)
        return (), kwargs

    # an input prompt: positions are renumbered by the model itself over all n + T tokens
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = None
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:  # BERT-like: the prompt is segment 0; causal LMs take none
        kwargs["token_type_ids"] = (torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
                                    if is_sequence_classifier(model) else None)
    if first_call:
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # (B, T, d_model)
        virtual = prompt.prompt().to(embeds.dtype).expand(batch, -1, -1)  # (B, n, d_model)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)  # (B, n + T, d_model)
        kwargs["input_ids"] = None
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and not is_sequence_classifier(model):
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    return (), kwargs


def prefix_cache(model: nn.Module, prompt: SoftPrompt, batch: int, cache=None):
    """A key/value cache holding the prefix of every layer (``cache``, if given empty, is filled)."""
    from transformers import DynamicCache

    if model.training and torch.is_grad_enabled() and _checkpointing(model):
        raise ConfigError(_CHECKPOINTING_MESSAGE)  # checking when it is turned on after adapt()
    layers, kv_heads, head_dim = prompt.layers, prompt.kv_heads, prompt.head_dim
    n, flat = prompt.num_virtual_tokens, prompt.batched_prompt(batch)  # (B, n, 2·L·d_kv)
    kv = flat.to(getattr(model, "dtype", flat.dtype)).view(batch, n, 2 * layers, kv_heads, head_dim)
    kv = kv.permute(2, 0, 3, 1, 4)  # (2L, B, H, n, hd): [K^0, V^0, K^1, ...]
    cache = cache if cache is not None else DynamicCache()
    for layer in range(layers):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    return cache


def embedding_init(word_embeddings: nn.Embedding, token_ids: list[int] | Tensor) -> Tensor:
    """Rows of the (frozen) vocabulary embedding, as a float32 copy: a prompt's starting value."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=word_embeddings.weight.device)
    with torch.no_grad():
        return word_embeddings(ids).detach().clone().float()


def check_virtual_tokens(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(
            f"num_virtual_tokens={n!r} is invalid. Expected a positive integer (typical: 8 to "
            "100; the prompt-tuning paper uses 100 for T5, peftlab's default is 20)."
        )


def soft_prompt_of(model: nn.Module, adapter_name: str) -> SoftPrompt:
    """The soft prompt called ``adapter_name`` on ``model`` (active or not)."""
    layer = model.get_submodule(input_embedding_name(model))
    adapters = layer.adapters if isinstance(layer, AdaptedLayer) else {}
    if adapter_name not in adapters or not isinstance(adapters[adapter_name], SoftPrompt):
        raise ConfigError(
            f"The model has no soft prompt named {adapter_name!r}. Expected one added by "
            "peftlab.adapt(model, 'prompt_tuning' | 'prefix_tuning' | 'p_tuning', adapter_name=...)."
        )
    return adapters[adapter_name]
