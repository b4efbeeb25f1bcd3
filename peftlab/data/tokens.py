"""Tokenization and batching: token ids, attention masks and labels, padded into tensors.

Instruction tuning masks the prompt out of the loss (label -100), so the model is trained only
to produce the answer, the usual supervised fine-tuning recipe (Ouyang et al. 2022, InstructGPT;
Dettmers et al. 2023, QLoRA section 5 "train on target only").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from peftlab.errors import DataError

if TYPE_CHECKING:  # type hints only; `datasets` and `transformers` load when first used
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


def tokenize_causal_lm(
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> Dataset | DatasetDict:
    """Token ids and labels for causal language-model training.

    * ``question``/``answer`` rows (instruction tuning): the question is the user turn and the
      answer the assistant turn of the tokenizer's chat template (a plain "Question: ...\\n
      Answer:" layout when it has none). ``labels`` are -100 on every prompt token, so the loss
      is only on the answer (and its end-of-turn token).
    * ``text`` rows (plain language modelling): ``labels = input_ids``; the model shifts them.

    Rows longer than ``max_length`` tokens are cut, with one warning that counts them; rows whose
    prompt alone fills ``max_length`` have no answer token to learn from and are dropped.
    Works on a Dataset or a DatasetDict (each split; still one warning).
    """
    return _per_split(dataset, lambda split: _tokenize_causal_split(split, tokenizer, max_length),
                      max_length)


def tokenize_classification(
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> Dataset | DatasetDict:
    """``input_ids``, ``attention_mask`` and ``labels`` (the class id) for sequence classification.

    A label outside the dataset's label set raises :class:`DataError` naming it. Texts longer than
    ``max_length`` tokens are cut (keeping the tokenizer's end token), with one warning that
    counts them.
    """
    return _per_split(dataset, lambda split: _tokenize_classification_split(split, tokenizer, max_length),
                      max_length)


def collate(batch: Sequence[dict] | dict, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized rows to the longest one and stack them into tensors.

    Padding goes on the right (fine for training; causal attention never looks ahead, so the
    real tokens never see the padding). ``input_ids`` are padded with ``pad_token_id``,
    ``attention_mask`` with 0 and token ``labels`` with -100 so padding never enters the loss.
    Scalar labels (classification) are stacked as they are. Also accepts a dict of lists, i.e.
    a sliced dataset such as ``tokens[0:8]``.
    """
    if isinstance(batch, dict):
        batch = [dict(zip(batch, values)) for values in zip(*batch.values())]
    if not batch:
        raise DataError("collate() got an empty batch. Expected at least one tokenized row.")
    if pad_token_id is None:
        raise DataError("pad_token_id is None. Expected the tokenizer's pad id; "
                        "peftlab.load_model sets one (tokenizer.pad_token_id).")
    longest = max(len(row["input_ids"]) for row in batch)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [row[key] for row in batch]
        if isinstance(values[0], (list, tuple, torch.Tensor)):
            fill = pad_values.get(key, 0)
            out[key] = torch.tensor([list(v) + [fill] * (longest - len(v)) for v in values])  # (B, T)
        else:
            out[key] = torch.tensor(values)  # (B,)
    if "attention_mask" not in out:
        lengths = torch.tensor([len(row["input_ids"]) for row in batch])
        out["attention_mask"] = (torch.arange(longest) < lengths[:, None]).long()  # (B, T)
    return out


@dataclass
class _Cut:
    """What truncation did to one split, so a DatasetDict gets one warning, not one per split."""

    rows: int
    truncated: int
    dropped: int = 0


def _per_split(dataset, fn, max_length: int):
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        results = {name: fn(split) for name, split in dataset.items()}
        out = DatasetDict({name: tokens for name, (tokens, _) in results.items()})
        cuts = [cut for _, cut in results.values()]
    else:
        out, cut = fn(dataset)
        cuts = [cut]
    truncated, rows = sum(c.truncated for c in cuts), sum(c.rows for c in cuts)
    dropped = sum(c.dropped for c in cuts)
    if truncated:
        warnings.warn(
            f"{truncated} of {rows} rows were longer than max_length={max_length} tokens and were "
            "truncated" + (f"; {dropped} of them kept no answer token and were dropped"
                           if dropped else "") + ". Raise max_length to keep more.",
            UserWarning, stacklevel=3,  # point at the caller of tokenize_*
        )
    return out


def chat_prompt(tokenizer, question: str) -> str:
    """The text a model sees before its answer: the chat template's user turn and the start of
    the assistant turn, or "Question: ...\nAnswer:" for a tokenizer without a template. Training
    (:func:`tokenize_causal_lm`) and generation (``peftlab.evaluate``) share it."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    return f"Question: {question}\nAnswer:"


def _prompt_and_answer(tokenizer, question: str, answer: str) -> tuple[str, str]:
    """The text before the answer (the prompt) and the answer text, as the model sees them."""
    prompt = chat_prompt(tokenizer, question)
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        # templates that rewrite earlier turns: fall back to prompt + answer + end of turn
        return prompt, answer + (tokenizer.eos_token or "")
    return prompt, f" {answer}{tokenizer.eos_token or ''}"


def _tokenize_causal_split(split, tokenizer, max_length: int):
    from datasets import Dataset

    columns = set(split.column_names)
    if {"question", "answer"} <= columns:
        pairs = [_prompt_and_answer(tokenizer, q, a) for q, a in zip(split["question"], split["answer"])]
        # A chat template already writes any special tokens the model expects. The prompt and the
        # answer are tokenized apart, so the mask boundary falls exactly between them.
        with_template = bool(getattr(tokenizer, "chat_template", None))
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=not with_template)["input_ids"]
        answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
        ids = [p + a for p, a in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
    elif "text" in columns:
        ids = tokenizer(list(split["text"]))["input_ids"]
        labels = [list(row) for row in ids]
    else:
        raise DataError(f"tokenize_causal_lm needs columns 'question' and 'answer', or 'text'; "
                        f"the dataset has {sorted(columns)}.")
    truncated = sum(len(row) > max_length for row in ids)
    ids = [row[:max_length] for row in ids]
    labels = [row[:max_length] for row in labels]
    # the first label is never predicted (nothing comes before it), so it cannot carry the loss
    keep = [i for i, row in enumerate(labels) if any(t != IGNORE_INDEX for t in row[1:])]
    if not keep:
        raise DataError(f"No row keeps an answer token within max_length={max_length} tokens. "
                        "Raise max_length.")
    tokens = Dataset.from_dict({
        "input_ids": [ids[i] for i in keep],
        "attention_mask": [[1] * len(ids[i]) for i in keep],
        "labels": [labels[i] for i in keep],
    })
    return tokens, _Cut(rows=len(ids), truncated=truncated, dropped=len(ids) - len(keep))


def _tokenize_classification_split(split, tokenizer, max_length: int):
    from datasets import ClassLabel, Dataset

    missing = {"text", "label"} - set(split.column_names)
    if missing:
        raise DataError(f"tokenize_classification needs columns 'text' and 'label'; missing "
                        f"{sorted(missing)} (the dataset has {split.column_names}).")
    feature = split.features["label"]
    labels = list(split["label"])
    names = feature.names if isinstance(feature, ClassLabel) else None
    for value in labels:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if ok and names is not None:
            ok = value < len(names)
        if not ok:
            shown = (", ".join(f"{i} ({n})" for i, n in enumerate(names)) if names is not None
                     else "class ids 0, 1, 2, ...")
            raise DataError(f"Label {value!r} is not in the label set. Expected one of: {shown}. "
                            "Map labels to class ids first (peftlab.load_dataset does this for "
                            "files).")
    texts = list(split["text"])
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    if encoded.encodings is not None:  # fast tokenizers keep what truncation cut off
        truncated = sum(bool(e.overflowing) for e in encoded.encodings)
    else:
        truncated = sum(len(row) > max_length for row in tokenizer(texts)["input_ids"])
    tokens = Dataset.from_dict({"input_ids": encoded["input_ids"],
                                "attention_mask": encoded["attention_mask"], "labels": labels})
    return tokens, _Cut(rows=len(labels), truncated=truncated)
