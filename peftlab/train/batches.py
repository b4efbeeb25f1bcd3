"""The data of a training run, framed for the model: tokenized, checked, and batched in a
seeded order.

Data order comes from the seed alone: sample i of the endless stream is row ``order(epoch)[i % n]``
with ``epoch = i // n``, each epoch a permutation from its own seeded ``torch.Generator``
(:class:`EpochOrder`). Any step's batch can be found without replaying the steps before it, which
makes resuming exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError, DataError

IGNORE_INDEX = -100  # label value that cross-entropy skips: prompt tokens and padding
_MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "label")


@dataclass(frozen=True)
class TrainData:
    """What train() trains on (:func:`frame_data` builds it)."""

    dataset: Any  # tokenized datasets.Dataset, the model's columns only
    eval_set: Any  # eval_data framed the same way, or None
    classification: bool  # one label per row (sequence classifier), else next tokens (causal LM)
    max_length: int  # tokens per row, capped at the model's context
    pad_id: int  # the id padding uses (masked out anyway)
    order: EpochOrder  # which row is sample i of the seeded stream

    def micro_batches(self, step: int, batch_size: int, grad_accum: int,
                      device: torch.device) -> list[dict[str, Tensor]]:
        """Optimizer step ``step``'s ``grad_accum`` batches of ``batch_size`` rows, on ``device``."""
        first = step * grad_accum * batch_size  # index of this step's first sample in the stream
        return [
            to_device(collate_rows(self.dataset, self.order.rows(first + m * batch_size, batch_size), self.pad_id),
                      device)
            for m in range(grad_accum)
        ]


def frame_data(model: nn.Module, data: Any, eval_data: Any, tokenizer: Any, max_length: int,
               seed: int) -> TrainData:
    """Tokenize and check ``data`` (its "train" split) and ``eval_data`` for this model."""
    classification = is_classification(model)
    if not classification and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            f"train() frames data for decoder-only language models (next tokens) and classifiers; "
            f"{type(model).__name__} is an encoder-decoder, whose labels are the decoder's targets, "
            "which peftlab does not frame yet. Expected a causal LM or a sequence classifier; try "
            "transformers' Seq2SeqTrainer on the adapted model (peftlab.adapt, save_adapter and "
            "estimate_memory work on it), or a decoder-only model."
        )
    dataset = prepare_dataset(data, tokenizer, max_length, classification, split="train")
    eval_set = None if eval_data is None else prepare_dataset(eval_data, tokenizer, max_length, classification)
    if classification:
        for part in (dataset, eval_set) if eval_set is not None else (dataset,):
            check_labels(part, model)
    return TrainData(dataset=dataset, eval_set=eval_set, classification=classification, max_length=max_length,
                     pad_id=pad_token_id(tokenizer, model), order=EpochOrder(len(dataset), seed))


START_BATCHES = 4  # batches a data-driven LoRA start sees (EVA, LoRA-GA, CorDA): peft's examples use a few


def start_data(model: nn.Module, method: str, data: Any, tokenizer: Any, *, max_length: int, batch_size: int,
               n_batches: int = START_BATCHES, seed: int = 0) -> dict[str, list[dict[str, Tensor]]]:
    """``{"data": batches}`` for ``peftlab.adapt(model, method, **...)`` where the method learns its
    start from data, else ``{}``: the first ``n_batches`` batches of the run that
    ``train(model, data, ..., seed=seed)`` makes (the same tokenization, order and padding), so the
    Lab, the study and the command line start EVA, LoRA-GA and CorDA from the data they then train on.
    ``data`` is what train() takes (a dataset, or a task's training data); ``model`` the base model.
    A method whose config says ``rows_per_batch`` (CorDA: 1) gets the same rows in batches of that size."""
    from peftlab.methods import get_method
    from peftlab.train.device import model_device

    spec = get_method(method)
    if not spec.learns_from_data:
        return {}
    framed = frame_data(model, data, None, tokenizer, fit_context(model, max_length), seed)
    rows = getattr(spec.config, "rows_per_batch", None) or batch_size  # CorDA reads one row at a time
    return {"data": framed.micro_batches(0, rows, n_batches * batch_size // rows, model_device(model))}


def fit_context(model: nn.Module, max_length: int) -> int:
    """``max_length`` capped at the model's context (``max_position_embeddings``), with a warning:
    BERT-style absolute positions fail past it, RoPE models silently leave what they learned."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and max_length > context:
        warnings.warn(
            f"max_length={max_length} is longer than the model's context of {context} tokens "
            f"(max_position_embeddings); texts are cut to {context} tokens instead. Pass "
            f"max_length<={context} to silence this.",
            UserWarning, stacklevel=3,
        )
        return context
    return max_length


def is_classification(model: nn.Module) -> bool:
    """Sequence classification (one label per row) or causal LM (next tokens)? From the class."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(type(m).__name__.endswith("ForSequenceClassification") for m in (model, inner))


def prepare_dataset(data: Any, tokenizer: Any, max_length: int, classification: bool,
                    split: str | None = None) -> Any:
    """A tokenized ``datasets.Dataset`` holding only the columns the model takes."""
    if isinstance(data, Mapping):  # a DatasetDict (a dict of splits)
        splits = [split] if split else ["validation", "test"]
        name = next((s for s in splits if s in data), None)
        if name is None:
            raise DataError(
                f"The DatasetDict has the splits {list(data)}, none of {splits}. Expected a "
                f"{' or '.join(repr(s) for s in splits)} split; try passing the Dataset itself."
            )
        data = data[name]
    if not hasattr(data, "column_names"):
        raise DataError(
            f"Cannot train on a {type(data).__name__}. Expected a datasets.Dataset or DatasetDict; "
            "try peftlab.load_dataset('chatterbot-qa') or datasets.Dataset.from_list(rows)."
        )
    if len(data) == 0:
        raise DataError("The dataset is empty (0 rows). Expected at least one row; check the "
                        "filter or file that built it, or try peftlab.load_dataset('chatterbot-qa').")
    columns = set(data.column_names)
    if "input_ids" not in columns:
        if tokenizer is None:
            raise DataError(
                f"The dataset is not tokenized (columns: {sorted(columns)}) and no tokenizer was "
                "given. Expected tokenizer=...; try train(model, data, tokenizer=tokenizer)."
            )
        from peftlab import data as peftlab_data

        if classification:
            if not {"text", "label"} <= columns:
                raise DataError(
                    f"A classification model needs 'text' and 'label' columns; this dataset has "
                    f"{sorted(columns)}. Try peftlab.load_dataset('rotten-tomatoes')."
                )
            data = peftlab_data.tokenize_classification(data, tokenizer, max_length)
        elif {"question", "answer"} <= columns or "text" in columns:
            data = peftlab_data.tokenize_causal_lm(data, tokenizer, max_length)
        else:
            raise DataError(
                f"A causal LM needs 'question' + 'answer' or 'text' columns; this dataset has "
                f"{sorted(columns)}. Try peftlab.load_dataset('chatterbot-qa')."
            )
    keep = [c for c in _MODEL_COLUMNS if c in data.column_names]
    if classification and not {"label", "labels"} & set(keep):
        raise DataError("A classification model needs a 'label' or 'labels' column in the tokenized data.")
    return data.select_columns(keep)


def check_labels(dataset: Any, model: nn.Module) -> None:
    """Every class id must have an output of the classifier, else cross-entropy fails deep inside."""
    column = "labels" if "labels" in dataset.column_names else "label"
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    labels = dataset[column]
    if num_labels is not None and (min(labels) < 0 or max(labels) >= num_labels):
        raise DataError(
            f"The data has class ids from {min(labels)} to {max(labels)}, but the model's classifier "
            f"has {num_labels} outputs. Expected ids in 0..{num_labels - 1}; load the model with "
            f"num_labels={max(labels) + 1}, e.g. peftlab.load_model(name, num_labels={max(labels) + 1})."
        )


class EpochOrder:
    """Row of the dataset for sample i of an endless, seeded, epoch-by-epoch shuffled stream."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}  # keep one epoch
        return self._cache[epoch]

    def rows(self, start: int, count: int) -> list[int]:
        return [self._epoch(i // self.n)[i % self.n] for i in range(start, start + count)]


def collate_rows(dataset: Any, rows: Iterable[int], pad_id: int) -> dict[str, Tensor]:
    """Pad the rows into tensors (peftlab.data.collate) and make sure ``labels`` is there."""
    from peftlab.data import collate

    batch = dict(collate([dataset[i] for i in rows], pad_id))
    if "labels" not in batch and "label" in batch:
        batch["labels"] = batch.pop("label")
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "labels" not in batch:  # plain text: learn every real token, never the padding
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return batch


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The batch's tensors moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def pad_token_id(tokenizer: Any, model: nn.Module) -> int:
    """The id used for padding (masked out anyway): the tokenizer's pad, else its EOS, else 0."""
    for owner, names in ((tokenizer, ("pad_token_id", "eos_token_id")),
                         (getattr(model, "config", None), ("pad_token_id", "eos_token_id"))):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0
