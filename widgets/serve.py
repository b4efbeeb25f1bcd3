"""Chat with several adapters side by side: one prompt, one mixed batch, a column per adapter.

    chat = AdapterChat(model, tokenizer)                          # every adapter on the model + the base
    chat = AdapterChat(base, tokenizer, adapters={"alice": "adapters/alice", "bob": "adapters/bob"})

Every adapter answers in the same ``generate`` call: row i of the batch runs adapter i
(``adapter_names``, peftlab/routing.py), so N answers cost one batched generation on one base
model, not N models. The answers are greedy, so the same prompt gives the same columns again.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

from peftlab.widgets.explorers import Shown
from peftlab.widgets.live import error_text, message_html

BASE = "__base__"


class AdapterChat(Shown):
    """One prompt, answered by each of ``names`` (adapter names, "__base__" for the base model)
    in one mixed batch; ``adapters`` ({name: folder}) are loaded onto ``model`` first."""

    def __init__(self, model: Any, tokenizer: Any, names: Sequence[str] | None = None,
                 adapters: Mapping[str, str] | None = None, max_new_tokens: int = 32,
                 prompt: str = "What is LoRA?") -> None:
        import ipywidgets as W

        from peftlab.compose import list_adapters
        from peftlab.io.hotswap import load_adapters
        from peftlab.routing import check_names

        if adapters:
            load_adapters(model, adapters)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.names = list(names) if names is not None else [*list_adapters(model), BASE]
        check_names(model, self.names, allow_base=True)
        self.prompt_w = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="100%"))
        self.tokens_w = W.IntSlider(value=max_new_tokens, min=1, max=256, description="new tokens")
        self.ask_w = W.Button(description="Ask every adapter", button_style="primary")
        self.status = W.HTML()
        self.columns = W.HBox([W.HTML() for _ in self.names], layout=W.Layout(width="100%"))
        self.ask_w.on_click(lambda _b: self.ask())
        self.widget = W.VBox([self.prompt_w, W.HBox([self.tokens_w, self.ask_w]), self.status, self.columns])
        self.answers: dict[str, str] = {}

    def ask(self, prompt: str | None = None) -> dict[str, str]:
        """Answer ``prompt`` (default: the text box) with every adapter; returns {name: answer}."""
        if prompt is not None:
            self.prompt_w.value = prompt
        try:
            start = time.perf_counter()
            self.answers = answer_each(self.model, self.tokenizer, self.prompt_w.value, self.names,
                                       self.tokens_w.value)
            seconds = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - shown in the widget, never a traceback
            self.status.value = message_html(error_text(exc), "error")
            return {}
        self.status.value = message_html(
            f"{len(self.names)} answers from one generate call on one base model ({seconds:.2f} s): "
            "row i of the batch ran adapter i.", "ok")
        for column, name in zip(self.columns.children, self.names):
            title = "base model" if name == BASE else name
            column.value = (f'<div style="flex:1;padding:4px 8px;border-left:3px solid #0072B2">'
                            f"<b>{html.escape(title)}</b><div style='white-space:pre-wrap'>"
                            f"{html.escape(self.answers[name])}</div></div>")
        return self.answers


def answer_each(model: Any, tokenizer: Any, prompt: str, names: Sequence[str], max_new_tokens: int) -> dict[str, str]:
    """{name: greedy answer} for one prompt, every adapter in one mixed batch."""
    import torch

    if not prompt.strip():
        raise ValueError("The prompt is empty. Expected a question or an instruction to send to every adapter.")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    encoded = tokenizer([text] * len(names), return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**encoded, adapter_names=list(names), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    start = encoded["input_ids"].shape[1]
    return {name: tokenizer.decode(out[i, start:], skip_special_tokens=True).strip() for i, name in enumerate(names)}


__all__ = ["AdapterChat", "answer_each"]
