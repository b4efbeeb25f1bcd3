"""P-tuning: virtual-token embeddings produced by a small trained encoder.

Liu et al., 2021, GPT Understands, Too, https://arxiv.org/abs/2103.10385

Like prompt tuning, the frozen model reads n virtual tokens before its input. P-tuning does not
train the n vectors directly: it trains free inputs h_i and a prompt encoder that maps all of
them, jointly, to the prompt (paper, section 3.2: the encoder makes the virtual tokens depend on
each other and eases optimisation):

    h (n x d_model, trained) ─▶ prompt encoder (trained) ─▶ P (n x d_model) ─▶ [P ; E x] ─▶ frozen model

    "MLP":  P = W3 relu(W2 relu(W1 h + b1) + b2) + b3                      (hidden size k)
    "LSTM": P = W2 relu(W1 BiLSTM(h) + b1) + b2      (encoder_num_layers layers, hidden size k)

    trainable parameters, d = d_model, k = encoder_hidden_size (default d), n virtual tokens:
      MLP:  n·d + (d·k + k) + (k·k + k) + (k·d + d)
      LSTM: n·d + Σ_layers 2·4k·(d_in + k + 2) + (2k·2k + 2k) + (2k·d + d),  d_in = d, then 2k

After training the encoder is no longer needed: only its output P matters, and that is what a
saved adapter holds (peft's ``prompt_embeddings``). Loading one gives ``inference_mode=True``: P
is then a plain table, exactly as in prompt tuning. The MLP always has three linear layers (as in
peft); ``encoder_num_layers`` counts LSTM layers only. The prompt enters the model as in
peftlab/methods/soft_prompt.py; on an encoder-decoder (T5) there are 2n inputs h_i, as in peft,
and the encoder reads the first n rows of P (the LSTM reads all 2n).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.methods.base import check_range, is_count
from peftlab.methods.soft_prompt import SoftPrompt, SoftPromptConfig, attach, table_rows, word_embeddings

ENCODERS = ("MLP", "LSTM")  # peft's PromptEncoderReparameterizationType values


@dataclass(frozen=True)
class PTuningConfig(SoftPromptConfig):
    # num_virtual_tokens (n, default 20) and inference_mode (True: P is a loaded table, no
    # encoder; a saved adapter holds the encoder's output, not the encoder) from SoftPromptConfig
    encoder_reparameterization_type: str = "MLP"  # "MLP" or "LSTM" (any case)
    encoder_hidden_size: int | None = None  # k; None: d_model (peft's default)
    encoder_num_layers: int = 2  # LSTM layers (the MLP has three linear layers whatever this is)
    encoder_dropout: float = 0.0  # dropout between LSTM layers

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = str(self.encoder_reparameterization_type).split(".")[-1].upper()  # also peft's enum
        if kind not in ENCODERS:
            raise ConfigError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not "
                "known. Expected 'MLP' (the paper's recommendation) or 'LSTM'."
            )
        object.__setattr__(self, "encoder_reparameterization_type", kind)  # stored as peft spells it
        for name in ("encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, name)
            if value is not None and not is_count(value):
                raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer.")
        check_range("encoder_dropout", self.encoder_dropout, low=0.0, high=1.0, high_open=True)
        if kind == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(f"encoder_num_layers={self.encoder_num_layers} is ignored by the MLP "
                          "encoder, which always has three linear layers (as in peft).", stacklevel=3)


class PromptEncoder(SoftPrompt):
    """Free inputs h (n, d_model) and the encoder that maps them to P (peft: PromptEncoder)."""

    def __init__(self, config: PTuningConfig, d_model: int, rows: int | None = None) -> None:
        super().__init__()
        # rows: n, or 2n on an encoder-decoder (peft's layout; the encoder reads the first n)
        rows, k = rows or config.num_virtual_tokens, config.encoder_hidden_size or d_model
        self.num_virtual_tokens = config.num_virtual_tokens
        self.kind = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(rows, d_model)  # h: weight (rows, d_model)
        self.inference_mode = config.inference_mode
        if self.inference_mode:
            return  # the table *is* P: nothing to encode
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(d_model, k, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * k, 2 * k), nn.ReLU(), nn.Linear(2 * k, d_model))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d_model, k), nn.ReLU(), nn.Linear(k, k), nn.ReLU(),
                                          nn.Linear(k, d_model))

    def prompt(self) -> Tensor:
        h = self.embedding.weight  # (rows, d_model)
        if self.inference_mode:
            return h
        if self.kind == "LSTM":  # the LSTM reads all the rows as one sequence, both ways
            h = self.lstm_head(h.unsqueeze(0))[0].squeeze(0)  # (rows, 2k)
        return self.mlp_head(h)  # (rows, d_model)


def build_p_tuning(model: nn.Module, config: PTuningConfig, adapter_name: str) -> None:
    """Add a P-tuning soft prompt named ``adapter_name`` to ``model``."""
    rows = table_rows(model, config)
    attach(model, PromptEncoder(config, word_embeddings(model).embedding_dim, rows), adapter_name)


def p_tuning_parameter_count(model: nn.Module, config: PTuningConfig) -> int:
    """Closed form of the trainable parameters (module docstring; n is 2n on an encoder-decoder)."""
    d = word_embeddings(model).embedding_dim
    k, n = config.encoder_hidden_size or d, table_rows(model, config)
    if config.inference_mode:
        return n * d
    if config.encoder_reparameterization_type == "MLP":
        return n * d + (d * k + k) + (k * k + k) + (k * d + d)
    # each LSTM layer and direction: 4 gates x (input weights + hidden weights + two biases)
    lstm = sum(2 * 4 * k * ((d if layer == 0 else 2 * k) + k + 2) for layer in range(config.encoder_num_layers))
    return n * d + lstm + (2 * k * 2 * k + 2 * k) + (2 * k * d + d)
