"""Measure a task's metric on any model: reference, peft or fused backend, 4-bit bases too.

    task = peftlab.load_task("sentiment")
    peftlab.evaluate(model, task, tokenizer=tokenizer)            # {'accuracy': 0.61, 'n': 200}
    for g in generations(model, task, tokenizer, n=3): print(g)   # read what the model answers

Generation is greedy with the KV cache, in batches of prompts of similar length, padded on the
left (so every answer starts right after its prompt); label tasks generate a few tokens only.
The same weights and batch size give the same numbers on every call: no sampling, no dropout.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data import IGNORE_INDEX, chat_prompt, collate
from peftlab.errors import ConfigError
from peftlab.progress import progress_bar
from peftlab.models import keep_4bit_trainable
from peftlab.tasks import (CLASSIFY, GENERATE, PERPLEXITY, Task, exact_match, label_of_generation,
                           load_task, perplexity, token_f1)


@dataclass(frozen=True)
class Generation:
    """One held-out prompt, what the model answered, and what was expected."""

    question: str
    answer: str
    expected: str

    def __str__(self) -> str:
        return f"Q: {self.question}\nA: {self.answer}\n(expected: {self.expected})"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task | str,
    *,
    tokenizer: Any = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """The task's metrics on the first ``limit`` rows of ``split`` (default: ``task.eval_limit``).

    ``batch_size``: rows per forward pass; default 16, and 4 for perplexity, whose logits cover the
    whole vocabulary at every position (SmolLM2, 64 passages: a peak of 1.3 GB at 4 against 2.0 GB
    at 16, about 5% slower, the same perplexity).

    ``progress``: a bar over the generated batches (peftlab.progress: quiet in CI); off by default,
    as training measures its task every few steps.

    Returns ``{metric: value, ..., "n": rows}``: ``accuracy`` (label tasks), ``f1`` and
    ``exact_match`` (free answers) or ``perplexity``. The model is put in eval mode for the
    measurement and given back in the mode it came in.
    """
    task = load_task(task) if isinstance(task, str) else task
    if tokenizer is None:
        raise ConfigError(f"evaluate() needs the model's tokenizer to read task {task.name!r}. "
                          "Pass tokenizer=... (the second value peftlab.load_model returns).")
    rows = task.rows(split, task.eval_limit if limit is None else limit)
    _check_head(model, task)
    if batch_size is None:
        batch_size = 4 if task.framing == PERPLEXITY else 16
    was_training = model.training
    model.eval()
    try:
        if task.framing == CLASSIFY:
            result = {"accuracy": _classification_accuracy(model, task, tokenizer, rows, batch_size)}
        elif task.framing == PERPLEXITY:
            result = {"perplexity": _perplexity(model, task, tokenizer, rows, batch_size)}
        else:
            answers = generate_answers(model, tokenizer, [task.question(r) for r in rows],
                                       task.max_new_tokens, batch_size, progress=progress)
            result = _score_answers(task, answers, [task.target(r) for r in rows])
    finally:
        model.train(was_training)
    return {**result, "n": len(rows)}


def generations(model: nn.Module, task: Task | str, tokenizer: Any, n: int = 4,
                split: str = "test") -> list[Generation]:
    """The model's greedy answers to the first ``n`` held-out prompts of a generate task."""
    task = load_task(task) if isinstance(task, str) else task
    if task.framing != GENERATE:
        raise ConfigError(f"Task {task.name!r} is framed as {task.framing!r}: it has no answers "
                          "to read. Expected a generate task such as 'sentiment' or 'qa'.")
    rows = list(task.rows(split, n))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            answers = generate_answers(model, tokenizer, [task.question(r) for r in rows],
                                       task.max_new_tokens)
    finally:
        model.train(was_training)
    return [Generation(task.input_text(r), a.strip(), task.target(r)) for r, a in zip(rows, answers)]


def _score_answers(task: Task, answers: list[str], targets: list[str]) -> dict[str, float]:
    n = max(len(answers), 1)
    if task.labels is not None:
        hits = sum(label_of_generation(a, task.labels) == t for a, t in zip(answers, targets))
        return {"accuracy": hits / n}
    return {"f1": sum(token_f1(a, t) for a, t in zip(answers, targets)) / n,
            "exact_match": sum(exact_match(a, t) for a, t in zip(answers, targets)) / n}


def generate_answers(model: nn.Module, tokenizer: Any, questions: list[str], max_new_tokens: int,
                     batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers to ``questions`` (user turns of the chat template), in the given order.

    Prompts are sorted by length and batched, padded on the left; the KV cache is on.
    """
    from transformers import GenerationConfig

    keep_4bit_trainable(model)
    with_template = bool(getattr(tokenizer, "chat_template", None))
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    encoded = tokenizer(prompts, add_special_tokens=not with_template)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=_eos_ids(model, tokenizer))
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    bar = progress_bar(len(prompts), desc="generating", unit="answer", enabled=progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad] * (longest - len(encoded[i])) + encoded[i] for i in chunk])  # (B, T)
        mask = torch.tensor([[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config notices about unused sampling knobs
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(out[row, longest:], skip_special_tokens=True)
        bar.update(len(chunk))
    bar.close()
    return answers


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the model's generation config's and the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if isinstance(ids, int) else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _classification_accuracy(model, task: Task, tokenizer, rows, batch_size: int) -> float:
    device = next(model.parameters()).device
    texts = [task.input_text(r) for r in rows]
    labels = list(rows[task.target_column])
    correct = 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True,
                        max_length=task.defaults.max_length, padding=True, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (B, C)
        target = torch.tensor(labels[start:start + batch_size], device=device)
        correct += int((logits.argmax(-1) == target).sum())
    return correct / max(len(texts), 1)


def _perplexity(model, task: Task, tokenizer, rows, batch_size: int) -> float:
    """exp of the mean next-token cross-entropy over the texts (each cut to max_length tokens)."""
    keep_4bit_trainable(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = tokenizer([task.input_text(r) for r in rows], truncation=True,
                    max_length=task.defaults.max_length)["input_ids"]
    total, tokens = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch = collate([{"input_ids": row} for row in ids[start:start + batch_size]], pad)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX).to(device)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        logits = logits[:, -labels.shape[1]:]  # soft-prompt methods prepend virtual positions
        for row, target in zip(logits, labels):  # one row's (T, V) at a time: no copy of the batch's logits
            total += F.cross_entropy(row[:-1].float(), target[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    value = perplexity(total, tokens)
    return value if math.isfinite(value) else math.inf


def _check_head(model: nn.Module, task: Task) -> None:
    classifier = any(type(m).__name__.endswith("ForSequenceClassification") for m in (model, *model.children()))
    if task.framing == CLASSIFY and not classifier:
        raise ConfigError(f"Task {task.name!r} ({task.framing}) needs a sequence-classification model, "
                          f"e.g. peftlab.load_model({task.model!r}, num_labels={len(task.labels or ())}); "
                          "or load_task(name, framing='generate') for a causal LM.")
    if task.framing != CLASSIFY and classifier:
        raise ConfigError(f"Task {task.name!r} ({task.framing}) needs a causal language model, not a "
                          "classifier; try load_task(name, framing='classify').")
    if task.framing == CLASSIFY:
        outputs = getattr(getattr(model, "config", None), "num_labels", None)
        if outputs is not None and task.labels is not None and outputs != len(task.labels):
            raise ConfigError(f"The classifier has {outputs} outputs but task {task.name!r} has "
                              f"{len(task.labels)} classes ({', '.join(task.labels)}). Load it with "
                              f"num_labels={len(task.labels)}.")
