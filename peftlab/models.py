"""The model catalogue: bundled offline models, tiny test models, and any hub id when online.

(Being completed: smollm2-135m, minilm-l6, hub ids, NF4 loading.)
"""

from __future__ import annotations

import torch
from torch import nn


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return _seeded(LlamaForCausalLM, config)


def _tiny_bert(num_labels: int = 2) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, num_labels=num_labels,
    )
    return _seeded(BertForSequenceClassification, config)


def _seeded(cls, config, seed: int = 0) -> nn.Module:
    """Build a random model deterministically without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()
