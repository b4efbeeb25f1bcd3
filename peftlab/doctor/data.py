"""The doctor's checks on the training rows: a chat template whose prompt fills max_length (no
answer token left), and labels that are all -100."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.data import IGNORE_INDEX, chat_prompt
from peftlab.doctor.report import Finding

SAMPLED_ROWS = 256  # rows the data checks read (enough for the shares; fast on any dataset)


def _rows(data: Any) -> list[dict]:
    if isinstance(data, dict) and "train" in data:
        data = data["train"]
    if hasattr(data, "select") and hasattr(data, "column_names"):
        return [dict(r) for r in data.select(range(min(len(data), SAMPLED_ROWS)))]
    return [dict(r) for r in list(data)[:SAMPLED_ROWS]]


def check_data(model: nn.Module, data: Any, tokenizer: Any, max_length: int) -> list[Finding]:
    rows = _rows(data)
    if not rows:
        return []
    if "labels" in rows[0] and isinstance(rows[0]["labels"], (list, tuple, torch.Tensor)):
        return _check_labels(rows)
    if {"question", "answer"} <= set(rows[0]) and tokenizer is not None:
        return _check_truncation(rows, tokenizer, max_length)
    return []


def _check_labels(rows: list[dict]) -> list[Finding]:
    # a causal LM predicts token t from the ones before it: label 0 never enters the loss
    supervised = [sum(1 for t in list(r["labels"])[1:] if int(t) != IGNORE_INDEX) for r in rows]
    empty = sum(1 for s in supervised if s == 0)
    if empty == 0:
        return []
    return [Finding("labels", "error" if empty == len(rows) else "warning",
                    "Rows whose labels are all -100 put no token into the loss: the loss is 0 or NaN for "
                    "them and the adapter learns nothing from them (a completion-only mask whose response "
                    "template never matched, or labels masked twice).",
                    f"{empty} of {len(rows)} rows have every label -100.",
                    "Mask only the prompt: labels = input_ids with -100 on the prompt's tokens; check the "
                    "response template your collator looks for.",
                    {"masked_rows": empty, "rows": len(rows)})]


def _check_truncation(rows: list[dict], tokenizer: Any, max_length: int) -> list[Finding]:
    special = not getattr(tokenizer, "chat_template", None)  # a template writes its own special tokens

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    prompts = sorted(length(chat_prompt(tokenizer, str(r["question"]))) for r in rows)
    lost = sum(1 for p in prompts if p >= max_length)
    if lost == 0:
        return []
    overhead = length(chat_prompt(tokenizer, ""))
    answers = sorted(length(" " + str(r["answer"])) for r in rows)
    need = prompts[-1] + answers[len(answers) // 2]
    return [Finding("truncation", "error" if lost == len(rows) else "warning",
                    f"The prompt as the chat template writes it fills max_length={max_length}, so truncation "
                    "cuts the whole answer away: those rows have no token to learn from (peftlab.train "
                    "drops them; other trainers train on prompts only).",
                    f"{lost} of {len(rows)} rows keep no answer token: prompts are {prompts[0]} to "
                    f"{prompts[-1]} tokens (median {prompts[len(prompts) // 2]}), {overhead} of them the "
                    "template's own (system prompt, role markers).",
                    f"max_length={need} or more (the longest prompt plus a median answer), or a chat template "
                    "without a default system prompt.",
                    {"lost_rows": lost, "rows": len(rows), "template_tokens": overhead, "needed": need})]


__all__ = ["check_data"]
