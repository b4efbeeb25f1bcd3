"""The exercises of lesson 8 (notebooks/08_soft_prompts.ipynb): a soft prompt put before the input
embeddings, and the attention mask widened.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _soft_prompt_inputs(g: torch.Generator) -> dict:
    batch, tokens, n = (int(torch.randint(1, 6, (1,), generator=g)) for _ in range(3))
    d = 4 * int(torch.randint(1, 5, (1,), generator=g))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, : int(torch.randint(0, tokens, (1,), generator=g))] = 0  # a left-padded first row
    return {"embeds": torch.randn(batch, tokens, d, generator=g), "attention_mask": mask,
            "prompt": torch.randn(n, d, generator=g)}


def _prepend_soft_prompt(embeds: Tensor, attention_mask: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
    batch, n = embeds.shape[0], prompt.shape[0]
    virtual = prompt.unsqueeze(0).expand(batch, -1, -1)  # (B, n, d): the same prompt for every row
    return (torch.cat([virtual, embeds], dim=1),  # (B, n + T, d)
            torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1))  # (B, n + T)


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "soft_prompt_prepend",
        "prepend_soft_prompt(embeds, attention_mask, prompt) -> (embeds', mask'): put the n soft-prompt "
        "vectors (prompt, shape (n, d)) before every row of embeds (B, T, d), giving (B, n + T, d), and "
        "widen the mask (B, T) to (B, n + T) with ones in front (the model must see the prompt).",
        _prepend_soft_prompt,
        _soft_prompt_inputs,
        "The same n vectors go before every row: give the prompt a batch axis and repeat it B times "
        "(expand costs no memory), then concatenate along the sequence axis. The mask grows the same "
        "way, with ones in the mask's own dtype.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
