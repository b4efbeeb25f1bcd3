"""Tiny random models for unit tests: 2-layer Llama and BERT with the bundled tokenizers' vocabularies.

Built from a config in well under a second, seeded so two builds are identical, and without
touching the caller's random number generator.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama_config():
    """The config of ``tiny-llama``: a 2-layer Llama, hidden size 64."""
    from transformers import LlamaConfig

    # SmolLM2's vocabulary and special-token ids, so its tokenizer and chat template fit
    return LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def tiny_bert_config(num_labels: int):
    """The config of ``tiny-bert``: a 2-layer BERT classifier, hidden size 64."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, num_labels=num_labels,
    )


def tiny_llama() -> nn.Module:
    """``tiny-llama``, random but seeded: the same weights on every call."""
    from transformers import LlamaForCausalLM

    return _seeded(LlamaForCausalLM, tiny_llama_config())


def tiny_bert(num_labels: int = 2) -> nn.Module:
    """``tiny-bert`` with ``num_labels`` outputs, random but seeded."""
    from transformers import BertForSequenceClassification

    return _seeded(BertForSequenceClassification, tiny_bert_config(num_labels))


def _seeded(cls, config, seed: int = 0) -> nn.Module:
    """Build a random model deterministically without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()
