"""Direct Preference Optimization (DPO) of an adapter, with the base model as its own reference.

Paper: Rafailov et al. 2023, *Direct Preference Optimization: Your Language Model is Secretly a
Reward Model*, https://arxiv.org/abs/2305.18290 (equation 7: the loss; section 5: the implicit reward).

For a prompt x, a chosen completion y_w and a rejected one y_l:

    r(x, y)  = β (log π_θ(y | x) - log π_ref(y | x))          the implicit reward
    L_DPO    = -log σ( r(x, y_w) - r(x, y_l) )                  averaged over the pairs

where log π(y | x) is the SUM of the log-probabilities of the completion's tokens (the prompt is
masked out). With an adapter, π_θ is the adapted model and π_ref is the same model with its adapter
switched off (``peftlab.set_disabled``): no second copy of the weights, as TRL does for a peft model.

    prompt tokens        completion tokens
    [ p1 p2 ... pn ] [ c1 c2 ... cm <eos> ]        one row for y_w, one for y_l
      mask 0 ......     mask 1 ..........         log π(y|x) = Σ over mask-1 positions of
                                                  log softmax(logits[t-1])[token t]

Tokenisation follows TRL 1.16's DPOTrainer for plain-text ("standard") pairs, so the two give the
same loss on the same batch (tests/test_dpo.py): the EOS token is appended to each completion when
missing, the prompt and prompt + completion are tokenized whole, and the completion starts where
the two token lists diverge; a batch stacks the B chosen rows, then the B rejected rows, padded on
the right. Dropout is off in :func:`train_dpo` (TRL's ``disable_dropout=True``): policy and
reference must see the same network apart from the adapter.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.api import set_disabled
from peftlab.errors import ConfigError, DataError
from peftlab.state import records
from peftlab.train.batches import EpochOrder, pad_token_id
from peftlab.train.device import disable_checkpointing, enable_checkpointing, model_device
from peftlab.train.settings import check_counts, check_lr


# --------------------------------------------------------------------------------------------
# A preference set from a bundled task
# --------------------------------------------------------------------------------------------
def preference_pairs(task: Any, tokenizer: Any, split: str = "train", limit: int | None = None) -> Any:
    """A ``datasets.Dataset`` of {"prompt", "chosen", "rejected"} strings from a label task.

    The prompt is the task's question in the model's chat template (``peftlab.data.chat_prompt``,
    the prompt ``peftlab.evaluate`` generates from); chosen is the right label word, rejected a
    wrong one (for k labels, the label ``1 + i % (k - 1)`` places after the right one, so every
    wrong label appears). ``task``: a Task or a task name ("sentiment", "topic").
    """
    from datasets import Dataset

    from peftlab.data import chat_prompt
    from peftlab.tasks import GENERATE, load_task

    task = load_task(task) if isinstance(task, str) else task
    if task.framing != GENERATE or not task.labels or len(task.labels) < 2:
        raise DataError(f"Task {task.name!r} ({task.framing}) has no label words to prefer one of. "
                        "Expected a generate task with labels; try 'sentiment' or 'topic'.")
    rows, k = task.rows(split, limit), len(task.labels)
    labels = list(rows[task.target_column])
    return Dataset.from_dict({
        "prompt": [chat_prompt(tokenizer, task.question(row)) for row in rows],
        "chosen": [task.labels[y] for y in labels],
        "rejected": [task.labels[(y + 1 + i % (k - 1)) % k] for i, y in enumerate(labels)],
    })


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} as TRL's DPOTrainer tokenizes a text pair."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"The {name} completion is empty ({text!r}) for the prompt {prompt[-60:]!r}. "
                            "Expected a non-empty string; drop the pair or fill in its completion.")
    if chosen == rejected:
        raise DataError(f"chosen and rejected are the same text ({chosen!r}): the pair prefers nothing "
                        "and its gradient is zero. Expected two different completions.")
    eos = tokenizer.eos_token or ""
    chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
    prompt_ids = tokenizer(prompt)["input_ids"]
    with_chosen, with_rejected = (tokenizer(prompt + c)["input_ids"] for c in (chosen, rejected))
    n = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": with_chosen[n:], "rejected_ids": with_rejected[n:]}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def collate_pairs(pairs: list[dict[str, list[int]]], pad_id: int) -> dict[str, Tensor]:
    """The B pairs as one batch of 2B rows (chosen rows first), right-padded: ``input_ids``,
    ``attention_mask`` and ``completion_mask`` (1 on completion tokens), each (2B, T)."""
    if not pairs:
        raise DataError("collate_pairs() got no pairs. Expected at least one tokenized pair.")
    rows = [(p["prompt_ids"] + p[side], len(p["prompt_ids"])) for side in ("chosen_ids", "rejected_ids")
            for p in pairs]
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id)  # (2B, T)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        completion_mask[i, n_prompt:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# --------------------------------------------------------------------------------------------
# Log-probabilities and the loss
# --------------------------------------------------------------------------------------------
def completion_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Σ over each row's completion tokens of log softmax(logits[t-1])[input_ids[t]]: (N, T, V) -> (N,).

    Only the K completion positions go through the softmax over the vocabulary, (K, V) instead of
    (N, T, V): the prompt's positions are masked out anyway, and a 49k-word vocabulary at every
    position would cost more memory than the model's activations."""
    targets, mask = input_ids[:, 1:], completion_mask[:, 1:].bool()  # position t - 1 predicts token t
    rows = mask.nonzero()[:, 0]  # (K,): the row of each completion token
    picked = logits[:, :-1][mask].float()  # (K, V)
    token_logps = picked.log_softmax(-1).gather(1, targets[mask][:, None])[:, 0]  # (K,)
    return torch.zeros(len(logits), dtype=token_logps.dtype, device=logits.device).index_add(0, rows, token_logps)


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """log π(y | x) of each row of a collated batch: :func:`completion_logps` of the model, (2B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1]:]  # soft prompts prepend virtual positions
    return completion_logps(logits, batch["input_ids"], batch["completion_mask"])


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """:func:`sequence_logps` of the reference: the SAME model with its adapters switched off."""
    if not (records(model) or hasattr(model, "peft_config")):
        raise ConfigError(f"{type(model).__name__} carries no adapter, so switching adapters off leaves the "
                          "policy itself, not a reference. Expected an adapted model; try "
                          "peftlab.adapt(model, 'lora', r=8) first.")
    set_disabled(model, True)
    try:
        return sequence_logps(model, batch)
    finally:
        set_disabled(model, False)


@dataclass(frozen=True)
class DPOOutput:
    """The loss of a batch of pairs and what it measures on the way (rewards are β-scaled)."""

    loss: Tensor  # mean of -log σ(r_w - r_l) over the pairs, a scalar
    chosen_rewards: Tensor  # r(x, y_w) = β (log π_θ - log π_ref) of the chosen completions, (B,)
    rejected_rewards: Tensor  # r(x, y_l), (B,)

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        """Share of the pairs whose implicit reward ranks chosen above rejected."""
        return (self.margins > 0).float().mean().item()


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1) -> DPOOutput:
    """The DPO loss, -log σ(β[(π_c - ref_c) - (π_r - ref_r)]), from four (B,) log-probabilities."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
        raise ConfigError(f"beta={beta!r} is invalid. Expected a positive number (how far the policy may "
                          "move from the reference: smaller is farther); try 0.1, DPO's usual value.")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if len({tuple(t.shape) for t in logps}) != 1 or policy_chosen_logps.ndim != 1:
        raise ConfigError(f"dpo_loss needs four log-probability vectors of one shape (B,); got shapes "
                          f"{[tuple(t.shape) for t in logps]}. Expected one value per pair, e.g. from "
                          "sequence_logps(...).chunk(2).")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return DPOOutput(loss, chosen_rewards.detach(), rejected_rewards.detach())


def batch_loss(model: nn.Module, batch: dict[str, Tensor], beta: float = 0.1) -> DPOOutput:
    """The DPO loss of one collated batch: the policy's log-probs, then the reference's (adapter off)."""
    ref_chosen, ref_rejected = reference_logps(model, batch).chunk(2)
    chosen, rejected = sequence_logps(model, batch).chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)


# --------------------------------------------------------------------------------------------
# Measuring and training
# --------------------------------------------------------------------------------------------
def tokenize_pairs(tokenizer: Any, pairs: Any) -> list[dict[str, list[int]]]:
    """:func:`tokenize_pair` for every row of ``pairs`` (a Dataset or a list of dicts with
    "prompt", "chosen" and "rejected")."""
    rows = list(pairs)
    if not rows:
        raise DataError("The preference set is empty. Expected rows with 'prompt', 'chosen' and 'rejected'; "
                        "try peftlab.train.dpo.preference_pairs('sentiment', tokenizer, limit=64).")
    missing = {"prompt", "chosen", "rejected"} - set(rows[0])
    if missing:
        raise DataError(f"A preference row needs 'prompt', 'chosen' and 'rejected'; missing {sorted(missing)} "
                        f"(the row has {sorted(rows[0])}).")
    return [tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in rows]


@torch.no_grad()
def pair_logps(model: nn.Module, pairs: Any, tokenizer: Any, batch_size: int = 4,
               reference: bool = False) -> tuple[Tensor, Tensor]:
    """(log π(y_w|x), log π(y_l|x)) of every pair, each (P,), ``batch_size`` pairs at a time (a batch's
    logits are rows x tokens x the vocabulary: 48 pairs at once would take 2 GB); ``reference``: the
    model with its adapters off (:func:`reference_logps`)."""
    tokens, device = tokenize_pairs(tokenizer, pairs), model_device(model)
    pad_id, was_training = pad_token_id(tokenizer, model), model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for start in range(0, len(tokens), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(tokens[start:start + batch_size], pad_id).items()}
            c, r = (reference_logps if reference else sequence_logps)(model, batch).chunk(2)
            chosen.append(c)
            rejected.append(r)
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(model: nn.Module, pairs: Any, tokenizer: Any, batch_size: int = 4) -> dict[str, float]:
    """How often the model ranks chosen above rejected: ``{"accuracy": share of pairs with
    log π(y_w|x) > log π(y_l|x), "margin": mean of that log-prob difference, "n": pairs}``."""
    chosen, rejected = pair_logps(model, pairs, tokenizer, batch_size)
    margin = chosen - rejected
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(), "n": len(margin)}


@dataclass
class DPOResult:
    """What :func:`train_dpo` returns: one record per applied step (loss, mean reward margin, reward
    accuracy, mean chosen and rejected rewards) and why the run ended: "completed", "nan" (a
    non-finite loss or gradient: that step is not applied, the adapter keeps its last good values)
    or "interrupted" (Ctrl-C / the kernel's stop button between two steps)."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    reason: str = "completed"

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history]

    @property
    def margins(self) -> list[float]:
        return [r["margin"] for r in self.history]


def train_dpo(model: nn.Module, pairs: Any, tokenizer: Any, *, steps: int = 20, lr: float = 1e-3,
              batch_size: int = 4, beta: float = 0.1, seed: int = 0, gradient_checkpointing: bool = False,
              on_step: Callable[[dict], None] | None = None) -> DPOResult:
    """Train the model's adapter with the DPO loss: ``steps`` AdamW steps of ``batch_size`` pairs,
    drawn in a seeded order (as :func:`peftlab.train`), the reference being the same model with its
    adapter off. Only the parameters that require gradients (the adapter's) move. ``on_step`` gets
    each applied step's record (a live plot, a log).

    Dropout is off throughout (every ``nn.Dropout`` at p = 0, TRL's ``disable_dropout``), so policy
    and reference differ by the adapter alone. ``gradient_checkpointing`` recomputes activations in
    the backward pass (transformers models only): far less memory, about a third more time."""
    check_counts(steps=steps, batch_size=batch_size)
    check_lr(lr, "1e-3 for LoRA with DPO")
    dpo_loss(*(torch.zeros(1),) * 4, beta=beta)  # refuse a bad beta before any work
    tokens, device, pad_id = tokenize_pairs(tokenizer, pairs), model_device(model), pad_token_id(tokenizer, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("The model has no trainable parameters. Expected an adapted model; try "
                          "peftlab.adapt(model, 'lora', r=8) first.")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order, result, was_training = EpochOrder(len(tokens), seed), DPOResult(model), model.training
    dropouts = {m: m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    for module in dropouts:
        module.p = 0.0  # dropout off: policy and reference differ by the adapter alone
    model.train()  # transformers checkpoints activations only in training mode
    checkpointing_was_off = gradient_checkpointing and enable_checkpointing(model)
    try:
        for step in range(steps):
            rows = order.rows(step * batch_size, batch_size)
            batch = {k: v.to(device) for k, v in collate_pairs([tokens[i] for i in rows], pad_id).items()}
            out = batch_loss(model, batch, beta)
            out.loss.backward()
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None]))
            if not (torch.isfinite(out.loss) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)  # the step is not applied: the adapter stays as it was
                result.reason = "nan"
                warnings.warn(f"DPO step {step + 1}: the loss or its gradient is not finite (loss {out.loss.item()}); "
                              f"stopped after {step} applied steps, the adapter keeps their values. Try a "
                              "smaller lr or beta.", RuntimeWarning, stacklevel=2)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.history.append({"step": step + 1, "loss": out.loss.item(), "margin": out.margins.mean().item(),
                                   "accuracy": out.accuracy, "chosen_reward": out.chosen_rewards.mean().item(),
                                   "rejected_reward": out.rejected_rewards.mean().item()})
            if on_step is not None:
                on_step(result.history[-1])
    except KeyboardInterrupt:  # the steps applied so far are kept, and so is their history
        result.reason = "interrupted"
    finally:
        if checkpointing_was_off:
            disable_checkpointing(model)
        for module, p in dropouts.items():
            module.p = p
        model.train(was_training)
    return result


__all__ = ["preference_pairs", "tokenize_pair", "tokenize_pairs", "collate_pairs", "completion_logps", "sequence_logps",
           "reference_logps", "dpo_loss", "DPOOutput", "batch_loss", "pair_logps", "preference_accuracy", "train_dpo",
           "DPOResult"]
