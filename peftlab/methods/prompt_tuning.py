"""Prompt tuning: learn a few input embeddings, keep the whole model frozen.

Lester et al., 2021, The Power of Scale for Parameter-Efficient Prompt Tuning,
https://arxiv.org/abs/2104.08691

The model reads n "virtual tokens" before every input. They are free vectors P (n x d_model),
not rows of the vocabulary, and they are all that trains (paper, section 2):

    input ids x_1 .. x_T ─▶ embedding E (frozen) ─▶ E x_1 .. E x_T ─┐
                                                                    ▼
    P (n x d_model, trained) ─────────────────────▶ [p_1 .. p_n ; E x_1 .. E x_T]
                                                                    ▼
                                              frozen transformer ─▶ logits, n + T positions

    trainable parameters: n · d_model     (SmolLM2-135M, n = 20: 20 · 576 = 11,520)

Where P starts (section 3.2): "random" (N(0, 1), torch's nn.Embedding default, as peft),
"sample_vocab" (the embeddings of n random vocabulary tokens) or "text": the embeddings of a task
description such as "Classify the sentiment of this review:", tokenized with the model's own
tokenizer and repeated or cut to n tokens. The paper finds the last two much better than random
for all but the largest models.

How P enters the model (attention mask widened, labels padded with -100, generation) is shared
with P-tuning and prefix tuning: see peftlab/methods/soft_prompt.py. On an encoder-decoder (T5)
the table has 2n rows, as in peft, and the encoder reads the first n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.methods.soft_prompt import (SoftPrompt, SoftPromptConfig, attach, embedding_init, table_rows,
                                         word_embeddings)

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")  # peft's PromptTuningInit values


@dataclass(frozen=True)
class PromptTuningConfig(SoftPromptConfig):
    # num_virtual_tokens (n, default 20) and inference_mode come from SoftPromptConfig
    prompt_tuning_init: str = "RANDOM"  # "random", "text" or "sample_vocab" (any case)
    prompt_tuning_init_text: str | None = None  # the text whose embeddings start P ("text" init)
    tokenizer_name_or_path: str | None = None  # tokenizer for that text (or pass tokenizer=)
    # a tokenizer object instead of a name; it stays out of the saved adapter_config.json, which
    # records its name_or_path instead
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        init = str(self.prompt_tuning_init).split(".")[-1].upper()  # also takes peft's enum
        if init not in INITS:
            raise ConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} is not known. Expected one of "
                f"{', '.join(i.lower() for i in INITS)}. Try 'text' with prompt_tuning_init_text=..."
            )
        object.__setattr__(self, "prompt_tuning_init", init)  # stored as peft spells it
        if self.tokenizer is not None and self.tokenizer_name_or_path is None:
            object.__setattr__(self, "tokenizer_name_or_path", getattr(self.tokenizer, "name_or_path", None))
        if init == "TEXT" and not self.inference_mode:
            if not self.prompt_tuning_init_text:
                raise ConfigError(
                    "prompt_tuning_init='text' needs the text: prompt_tuning_init_text is empty. "
                    "Expected a task description, e.g. prompt_tuning_init_text='Classify the "
                    "sentiment of this review:'."
                )
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ConfigError(
                    "prompt_tuning_init='text' needs the model's tokenizer to turn the text into "
                    "embeddings. Expected tokenizer=<the tokenizer> or tokenizer_name_or_path=... ; "
                    "e.g. model, tokenizer = peftlab.load_model(...), then tokenizer=tokenizer."
                )


class PromptEmbedding(SoftPrompt):
    """P, an (n, d_model) table of virtual-token embeddings (peft: PromptEmbedding)."""

    def __init__(self, config: PromptTuningConfig, vocabulary: nn.Embedding, tokenizer=None,
                 rows: int | None = None) -> None:
        super().__init__()
        # rows: n, or 2n on an encoder-decoder (peft's layout; the encoder reads the first n)
        rows, d_model = rows or config.num_virtual_tokens, vocabulary.embedding_dim
        self.num_virtual_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(rows, d_model)  # weight (rows, d_model), N(0, 1): "random"
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            token_ids = torch.randint(0, vocabulary.num_embeddings, (rows,))
        else:  # "TEXT": the text's tokens, repeated until there are enough, then cut to the rows
            token_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            token_ids = (token_ids * math.ceil(rows / len(token_ids)))[:rows]
        self.embedding.weight = nn.Parameter(embedding_init(vocabulary, token_ids))

    def prompt(self) -> Tensor:
        return self.embedding.weight  # (rows, d_model)


def load_tokenizer(config: PromptTuningConfig):
    """The tokenizer for the init text: the one passed, or AutoTokenizer from its name/path."""
    if config.tokenizer is not None:
        return config.tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Cannot load the tokenizer {config.tokenizer_name_or_path!r} for the prompt's init "
            f"text ({type(err).__name__}: {err}). Expected a local tokenizer folder or, online, a "
            "hub id. Try tokenizer=<the tokenizer object> (peftlab.load_model returns it)."
        ) from err


def build_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> None:
    """Add a prompt-tuning soft prompt named ``adapter_name`` to ``model``."""
    needs_text = config.prompt_tuning_init == "TEXT" and not config.inference_mode
    tokenizer = load_tokenizer(config) if needs_text else None
    rows = table_rows(model, config)
    attach(model, PromptEmbedding(config, word_embeddings(model), tokenizer, rows), adapter_name)


def prompt_tuning_parameter_count(model: nn.Module, config: PromptTuningConfig) -> int:
    """Closed form of the trainable parameters: n · d_model (2n · d_model on an encoder-decoder)."""
    return table_rows(model, config) * word_embeddings(model).embedding_dim
