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
    model                          one forward pre-hook, insert_soft_prompt (an encoder-decoder's
                                   encoder a second one, insert_encoder_prompt: see below)

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

Encoder-decoders (T5, BART; peft's PeftModelForSeq2SeqLM). The source x goes to the encoder, the
target y (``decoder_input_ids``, or ``labels`` shifted right by the model) to the decoder:

    input prompt  encoder reads [P_1..n ; E x]  (n + T_x positions)  ──▶ states H (B, n + T_x, d)
                  decoder reads y as before, its cross-attention over all of H
                  attention_mask   -> [1 ... 1 ; attention_mask]   (the encoder's and the
                                      cross-attention's mask: the model passes one mask to both)
                  labels, decoder_input_ids, decoder_attention_mask  -> unchanged
                  logits           -> (B, T_y, V), one per target token: no virtual positions
    prefix        the decoder's self-attention in layer l reads P_K, P_V of block (2l mod L)
                  encoder, cross-attention, attention_mask  -> unchanged: they see no prefix
                  decoder_attention_mask  -> [1 ... 1 ; decoder_attention_mask]

Three of peft's conventions shape this, and peftlab follows them so that adapters move both ways:

- An input prompt's table has 2n rows, one prompt per transformer stack (peft's
  num_transformer_submodules = 2), but only rows 1..n are read, by the encoder; rows n+1..2n
  never reach the model (P-tuning's LSTM still reads them, as context for rows 1..n). A saved
  adapter holds all 2n rows. With num_transformer_submodules=1 (peft's option) the table has
  only the encoder's n rows; a prefix keeps peft's two stacks (other counts are refused).
- A prefix has L = num_hidden_layers blocks (the encoder's depth, which peft reads from the
  config) of keys and values. peft stacks the blocks twice ([K^0, V^0, ..., K^(L-1), V^(L-1)]
  repeated) and cuts the stack into fours (self-attention K, V; cross-attention K, V) for decoder
  layers 0, 1, ...; it then drops the cross-attention parts. Decoder layer l therefore reads
  block (2l mod L): with L = 2 both layers read block 0, and block 1 trains nothing.
- generate() runs the encoder itself, not through the model's forward. So the input prompt goes
  in with a second pre-hook, on the encoder (insert_encoder_prompt); the model's pre-hook widens
  the attention mask for the cross-attention whenever the encoder's states carry the prompt.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, AdaptedLayer, base_of, inject
from peftlab.methods.base import AdapterConfig, PromptPositions, is_count


@dataclass(frozen=True)
class SoftPromptConfig(AdapterConfig):
    """Fields every soft-prompt method shares. ``targets`` is always None: a soft prompt adapts
    no layer (it sits on the input embeddings), so peftlab's default targets do not apply."""

    num_virtual_tokens: int = 20  # n, the number of virtual tokens
    # prompts in the table, one per transformer stack (peft's field): None = peft's default, 2 on an
    # encoder-decoder (the encoder reads the first) and 1 elsewhere; 1 on an encoder-decoder: the
    # table holds only the encoder's n rows (module docstring)
    num_transformer_submodules: int | None = None
    # True: the prompt is a plain table to be loaded (what a saved adapter holds, peft's
    # "prompt_embeddings"), so it is neither initialised nor computed by an encoder
    inference_mode: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", None)
        check_virtual_tokens(self.num_virtual_tokens)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                f"num_transformer_submodules={self.num_transformer_submodules!r} is invalid. Expected 1 or "
                "2 (prompts per transformer stack), or None for peft's default (2 on an encoder-decoder)."
            )


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

    def prompt_positions(self) -> PromptPositions:
        """For the memory ledger: n positions before every input, or n keys and values before
        every attention's own (a prefix)."""
        n = int(self.num_virtual_tokens)
        return PromptPositions(prefix=n) if self.is_prefix else PromptPositions(inputs=n)

    def prompt(self) -> Tensor:
        """The virtual tokens: (n, d_model) for an input prompt ((2n, d_model) on an
        encoder-decoder, see table_rows), (n, 2 · layers · d_kv) for a prefix. This is also what
        peft saves, as ``prompt_embeddings``."""
        raise NotImplementedError

    def batched_prompt(self, batch: int) -> Tensor:
        """``prompt()`` for each of ``batch`` rows: (batch, n, width)."""
        return self.prompt().expand(batch, -1, -1)


# --------------------------------------------------------------------------------------------
# What the methods need to know about a model
# --------------------------------------------------------------------------------------------
def is_encoder_decoder(model: nn.Module) -> bool:
    """T5, BART and the like: an encoder stack and a decoder stack (peft's SEQ_2_SEQ_LM)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and callable(getattr(model, "get_encoder", None))


def prompt_host(model: nn.Module) -> nn.Module:
    """The module whose input embedding layer carries the soft prompt: the model itself, or, for an
    encoder-decoder, its encoder (the input prompt is the encoder's, and T5's encoder has its own
    embedding module, sharing its weight with ``model.shared``)."""
    return model.get_encoder() if is_encoder_decoder(model) else model


def input_embedding_name(model: nn.Module) -> str:
    """Module path of the embedding layer that carries the prompt (``model.embed_tokens`` for
    Llama, ``encoder.embed_tokens`` for T5)."""
    get_in = getattr(prompt_host(model), "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    for name, module in model.named_modules():
        if embedding is not None and module is embedding:
            return name
    raise ConfigError(
        f"{type(model).__name__} has no input embedding layer that peftlab can find (it asks "
        "model.get_input_embeddings()). Soft prompts need one: they are extra input embeddings. "
        "Expected a transformers model; try a causal LM, a sequence classifier or a text "
        "encoder-decoder (T5, BART)."
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
    if getattr(config, "is_encoder_decoder", False):  # the prefix is the decoder's (module docstring)
        heads = kv_heads = getattr(config, "decoder_attention_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # T5: d_kv
    return layers, kv_heads, head_dim


def decoder_depth(model: nn.Module) -> int:
    """Layers of an encoder-decoder's decoder (T5: num_decoder_layers, BART: decoder_layers)."""
    config = model.config
    depth = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    return depth or config.num_hidden_layers


def table_rows(model: nn.Module, config: SoftPromptConfig) -> int:
    """Rows of an input prompt's table: n · stacks, stacks = num_transformer_submodules (peft's
    default: 2 on an encoder-decoder, of which the encoder reads the first n rows; 1 elsewhere)."""
    return config.num_virtual_tokens * prompt_stacks(model, config)


def prompt_stacks(model: nn.Module, config: SoftPromptConfig, method: str = "an input prompt") -> int:
    """num_transformer_submodules, or peft's default for the model; refuses what peft does not
    compute as the module docstring says (two stacks on a single-stack model; a prefix's stacks)."""
    default = 2 if is_encoder_decoder(model) else 1
    stacks = config.num_transformer_submodules or default
    if (stacks == 2 and default == 1) or (method == "prefix tuning" and stacks != default):
        raise ConfigError(
            f"num_transformer_submodules={stacks} does not fit {method} on this {type(model).__name__}: "
            f"peftlab follows peft's layout with {default} (one prompt per transformer stack; "
            f"{'an encoder-decoder has two' if default == 2 else 'this model has one'}). Expected "
            f"num_transformer_submodules={default} or None; try leaving it out."
        )
    return stacks


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
    """Put ``prompt`` on the input embedding layer and make sure the pre-hooks are installed."""
    if prompt.is_prefix and _checkpointing(model):
        raise ConfigError(_CHECKPOINTING_MESSAGE)
    inject(model, [input_embedding_name(model)], lambda _name, _base: prompt, adapter_name)
    _add_hook(model, insert_soft_prompt)
    if is_encoder_decoder(model):  # generate() runs the encoder without the model's forward
        _add_hook(model.get_encoder(), insert_encoder_prompt)


def _add_hook(module: nn.Module, hook) -> None:
    if hook not in module._forward_pre_hooks.values():
        # a module-level function (not a closure), so copy.deepcopy(model) keeps working
        module.register_forward_pre_hook(hook, with_kwargs=True)


def active_soft_prompt(model: nn.Module) -> SoftPrompt | None:
    """The soft prompt that runs now: None when adapters are disabled or another one is active."""
    return _running_prompt(prompt_host(model))


def _running_prompt(host: nn.Module) -> SoftPrompt | None:
    get_in = getattr(host, "get_input_embeddings", None)
    layer = get_in() if callable(get_in) else None
    if not isinstance(layer, AdaptedLayer) or layer.disabled or not layer.active:
        return None
    adapter = layer.adapters[layer.active[0]]
    return adapter if isinstance(adapter, SoftPrompt) else None


# --------------------------------------------------------------------------------------------
# The pre-hooks: the one place where a soft prompt meets the model
# --------------------------------------------------------------------------------------------
def insert_soft_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of an adapted model: rewrite the call so the active soft prompt is read
    first (module docstring). Returns None (call unchanged) when no soft prompt is active."""
    prompt = active_soft_prompt(model)
    if prompt is None:
        return None
    kwargs = _named_arguments(model, args, kwargs)
    n = prompt.num_virtual_tokens
    cache = kwargs.get("past_key_values")
    if kwargs.get("use_cache") is False and cache is not None:
        # no cache wanted: one passed in is stale (generate(use_cache=False) hands back the prefix
        # cache the model returned), so start afresh; peft 0.21 crashes here instead
        cache = kwargs["past_key_values"] = None
    first_call = cache is None or cache.get_seq_length() == 0  # else the prompt is in the cache
    if is_encoder_decoder(model):
        return (), _encoder_decoder_call(model, prompt, kwargs, first_call)

    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    batch = (ids if ids is not None else embeds).shape[0]
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = _widen(kwargs["attention_mask"], n)  # (B, n + T)

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


def _encoder_decoder_call(model: nn.Module, prompt: SoftPrompt, kwargs: dict, first_call: bool) -> dict:
    """An encoder-decoder's call (module docstring). An input prompt reaches the encoder through
    insert_encoder_prompt; here the mask widens for the decoder's cross-attention, which reads it
    over the encoder's states: those about to be computed, or those passed in (generate's steps)
    when they hold the prompt. A prefix fills the decoder's cache; the encoder sees none."""
    n = prompt.num_virtual_tokens
    if not prompt.is_prefix:
        mask, states = kwargs.get("attention_mask"), kwargs.get("encoder_outputs")
        if mask is not None and (states is None or states[0].shape[1] == mask.shape[1] + n):
            kwargs["attention_mask"] = _widen(mask, n)  # (B, n + T_x)
        return kwargs
    if kwargs.get("decoder_attention_mask") is not None:
        kwargs["decoder_attention_mask"] = _widen(kwargs["decoder_attention_mask"], n)  # (B, n + T_y)
    if first_call:  # the batch size, from whatever the call has (generate's steps: no input_ids)
        states = kwargs.get("encoder_outputs")
        sources = [kwargs.get(k) for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels",
                                           "input_ids", "inputs_embeds")]
        batch = next(t for t in [*sources, states[0] if states is not None else None] if t is not None).shape[0]
        kwargs["past_key_values"] = prefix_cache(model, prompt, batch, kwargs.get("past_key_values"))
    return kwargs


def insert_encoder_prompt(encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of an encoder-decoder's encoder: the input prompt's first n rows before the
    encoder's input, inputs_embeds = [P_1..n ; E x] (B, n + T, d_model). The mask widens only while
    it is T wide: generate() hands the encoder the caller's mask, but the model's forward hands it
    the mask its own hook has widened already (for the cross-attention)."""
    prompt = _running_prompt(encoder)
    if prompt is None or prompt.is_prefix:
        return None
    kwargs = _named_arguments(encoder, args, kwargs)
    n, embeds = prompt.num_virtual_tokens, kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = encoder.get_input_embeddings()(kwargs["input_ids"])  # (B, T, d_model)
    batch, length = embeds.shape[:2]
    virtual = prompt.prompt()[:n].to(embeds.dtype).expand(batch, -1, -1)  # (B, n, d_model)
    kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([virtual, embeds], dim=1), None
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[-1] == length:
        kwargs["attention_mask"] = _widen(mask, n)
    return (), kwargs


def _named_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """model(ids, mask) as model(input_ids=ids, attention_mask=mask)."""
    if not args:
        return kwargs
    names = list(inspect.signature(module.forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


def _widen(mask: Tensor, n: int) -> Tensor:
    """[1 ... 1 ; mask]: (B, T) -> (B, n + T), the n virtual positions always attended."""
    if mask.dim() != 2:
        raise ConfigError(
            f"Soft prompts need a 2-D attention_mask (batch, tokens); got {mask.dim()}-D. "
            "Expected the tokenizer's mask; pass that, or none."
        )
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def prefix_cache(model: nn.Module, prompt: SoftPrompt, batch: int, cache=None):
    """A key/value cache holding the prefix of every layer (``cache``, if given empty, is filled)."""
    from transformers import DynamicCache

    if model.training and torch.is_grad_enabled() and _checkpointing(model):
        raise ConfigError(_CHECKPOINTING_MESSAGE)  # checking when it is turned on after adapt()
    layers, kv_heads, head_dim = prompt.layers, prompt.kv_heads, prompt.head_dim
    n, flat = prompt.num_virtual_tokens, prompt.batched_prompt(batch)  # (B, n, 2·L·d_kv)
    kv = flat.to(getattr(model, "dtype", flat.dtype)).view(batch, n, 2 * layers, kv_heads, head_dim)
    kv = kv.permute(2, 0, 3, 1, 4)  # (2L, B, H, n, hd): [K^0, V^0, K^1, ...]
    if is_encoder_decoder(model):
        return _decoder_prefix_cache(model, kv, cache)
    cache = cache if cache is not None else DynamicCache()
    for layer in range(layers):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    return cache


def _decoder_prefix_cache(model: nn.Module, kv: Tensor, cache=None):
    """An encoder-decoder's cache: decoder layer l's self-attention holds block (2l mod L) of the
    prefix (peft's layout, module docstring); the cross-attention part stays empty, so each layer
    computes it from the encoder's states as without a prefix."""
    from transformers import DynamicCache, EncoderDecoderCache

    if not isinstance(cache, EncoderDecoderCache):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    blocks = kv.shape[0] // 2  # L
    for layer in range(decoder_depth(model)):
        block = 2 * layer % blocks
        cache.self_attention_cache.update(kv[2 * block], kv[2 * block + 1], layer)
    return cache


def embedding_init(word_embeddings: nn.Embedding, token_ids: list[int] | Tensor) -> Tensor:
    """Rows of the (frozen) vocabulary embedding, as a float32 copy: a prompt's starting value."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=word_embeddings.weight.device)
    with torch.no_grad():
        return word_embeddings(ids).detach().clone().float()


def check_virtual_tokens(n: int) -> None:
    if not is_count(n):
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
