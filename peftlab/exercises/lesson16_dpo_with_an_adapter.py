"""The exercises of lesson 16 (notebooks/16_dpo_with_an_adapter.ipynb): DPO from scratch: the
log-probability of a completion given its prompt, then the DPO loss from four of them.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


def _logps_inputs(g: torch.Generator) -> dict:
    n, t, v = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 6), (4, 12), (5, 30)))
    prompt = torch.randint(1, t - 1, (n, 1), generator=g)  # each row's prompt length, >= 1
    length = prompt + torch.randint(1, 3, (n, 1), generator=g)  # then 1 or 2 completion tokens
    positions = torch.arange(t)
    completion_mask = ((positions >= prompt) & (positions < length.clamp(max=t))).long()  # (n, t)
    return {"logits": 3 * torch.randn(n, t, v, generator=g), "input_ids": torch.randint(0, v, (n, t), generator=g),
            "completion_mask": completion_mask}


def _completion_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    from peftlab.train.dpo import completion_logps

    return completion_logps(logits, input_ids, completion_mask)


def _loss_inputs(g: torch.Generator) -> dict:
    b = int(torch.randint(1, 9, (1,), generator=g))
    logps = [-20 * torch.rand(b, generator=g) for _ in range(4)]
    return {"policy_chosen_logps": logps[0], "policy_rejected_logps": logps[1], "ref_chosen_logps": logps[2],
            "ref_rejected_logps": logps[3], "beta": float(torch.rand(1, generator=g)) + 0.05}


def _dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, beta: float) -> Tensor:
    from peftlab.train.dpo import dpo_loss

    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta).loss


LESSON_EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "completion_logps",
        "completion_logps(logits, input_ids, completion_mask) -> (N,): for each row, the sum over its "
        "completion tokens (completion_mask == 1) of the log-probability the model gave that token.",
        _completion_logps,
        _logps_inputs,
        "The logits at position t are the model's guess for the token at position t + 1, so line up "
        "logits[:, :-1] with input_ids[:, 1:] (and the mask with it). Take log_softmax over the vocabulary, "
        "pick each target's entry with gather, and add up only the masked-in positions.",
    ),
    Exercise(
        "dpo_loss",
        "dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) "
        "-> scalar: the mean over the pairs of -log σ(β[(π_c - ref_c) - (π_r - ref_r)]).",
        _dpo_loss,
        _loss_inputs,
        "Each completion's implicit reward is beta times how much more likely the policy makes it than "
        "the reference does. The loss is the negative log-sigmoid of the chosen reward minus the rejected "
        "one, averaged over the batch; F.logsigmoid is the stable way to write log σ.",
    ),
)


__all__ = ["LESSON_EXERCISES"]
