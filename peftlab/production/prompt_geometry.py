"""The shape of a soft prompt as peft's prompt configs need it (token_dim, num_layers,
num_attention_heads), read through each model config's own key names, and the prefixes peft
would shape wrongly, refused before peft fails inside its forward pass."""

from __future__ import annotations

from torch import nn

from peftlab.errors import ConfigError
from peftlab.methods import Method


# the model-config keys peft 0.21 reads each prompt dimension from (peft.utils.other.
# _prepare_prompt_learning_config); a model with none of them needs the value in the peft config
_PEFT_GEOMETRY_KEYS = {"token_dim": ("hidden_size", "n_embd", "d_model"),
                       "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
                       "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")}


def soft_prompt_geometry(spec: Method, model: nn.Module, *, for_peft_model: bool = True) -> dict:
    """token_dim, num_layers and num_attention_heads for peft's prompt configs, where peft cannot
    read them itself: it looks for the config's own keys (hidden_size, n_embd, ...), which not
    every model has (DistilBERT's are dim, n_layers, n_heads); peftlab reads them through the
    config's aliases. ``for_peft_model``: refuse a prefix peft would shape wrongly (see below);
    False when only describing a reference adapter on disk (peftlab loads it back)."""
    from peftlab.methods.soft_prompt import attention_geometry, is_encoder_decoder

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, kv_heads, head_dim = attention_geometry(model)
    values = {"token_dim": int(config.hidden_size), "num_layers": layers,
              "num_attention_heads": int(config.num_attention_heads)}
    keys = config.to_dict()
    if spec.name == "prefix_tuning" and is_encoder_decoder(model):
        return _decoder_prefix_geometry(model, layers, kv_heads, head_dim, for_peft_model)
    if for_peft_model and spec.name == "prefix_tuning" and kv_heads != keys.get("num_key_value_heads", config.num_attention_heads):
        # peft sizes the prefix for num_key_value_heads when the config has that key, else for
        # every attention head: Falcon's multi-query attention (config key num_kv_heads) has one
        raise ConfigError(
            f"peft cannot build prefix tuning for this {type(model).__name__}: its attention has "
            f"{kv_heads} key/value head(s), but peft sizes the prefix for "
            f"{keys.get('num_key_value_heads', config.num_attention_heads)} (it reads only the config key "
            "num_key_value_heads), and the forward pass fails. Expected backend='reference' "
            "(peftlab's prefix has the model's own key/value width; peft cannot load its adapter), "
            "or prompt_tuning / p_tuning, which peft runs on this model."
        )
    return {k: v for k, v in values.items() if not any(key in keys for key in _PEFT_GEOMETRY_KEYS[k])}


def _decoder_prefix_geometry(model: nn.Module, layers: int, heads: int, head_dim: int, for_peft_model: bool) -> dict:
    """An encoder-decoder's prefix is the decoder's, but peft would size its heads from the config
    (token_dim // num_attention_heads: d_model over the encoder's heads), which is wrong where T5's
    d_kv · heads is not d_model (T5 v1.1, mT5) or BART's decoder has its own head count; so the
    decoder's heads and key width are named outright. peft gives the decoder one cache layer per
    num_layers (L, the encoder's depth); a deeper decoder fails in peft, so it is refused there."""
    from peftlab.methods.soft_prompt import decoder_depth

    if for_peft_model and decoder_depth(model) > layers:
        raise ConfigError(
            f"peft cannot run prefix tuning on this {type(model).__name__}: its decoder has "
            f"{decoder_depth(model)} layers, but peft builds the decoder's key/value cache for "
            f"num_layers={layers} (num_hidden_layers, the encoder's depth), and the forward pass fails. "
            "Expected backend='reference' (peftlab's prefix reaches every decoder layer; peft cannot "
            "load its adapter), or prompt_tuning / p_tuning, which peft runs on this model."
        )
    return {"token_dim": heads * head_dim, "num_layers": layers, "num_attention_heads": heads}
