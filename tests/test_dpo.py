"""DPO with an adapter (peftlab/train/dpo.py): the from-scratch loss equals TRL's DPOTrainer (with a
peft LoraConfig) on the same batch and the same weights; the reference is the base model, reached
by switching the adapter off; bad input is refused with a message; lesson 16's checkers."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import peftlab
from peftlab import exercises
from peftlab.errors import ConfigError, DataError
from peftlab.train import dpo

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ("q_proj", "v_proj")


def lora_with_weights(base, r: int = 4, alpha: float = 8.0, seed: int = 0, scale: float = 0.5):
    """A reference-backend LoRA on a copy of ``base`` whose A and B are seeded random (B = 0 at
    init would make policy == reference, and every loss log 2)."""
    model = peftlab.adapt(copy.deepcopy(base), "lora", r=r, alpha=alpha, targets=TARGETS)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data.copy_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def pairs(tiny_llama):
    """Four (prompt, chosen, rejected) rows of the sentiment task, with the 'chosen' answer of the
    second one changed to a longer text so the completions differ in length (padding)."""
    _, tokenizer = tiny_llama
    rows = dpo.preference_pairs("sentiment", tokenizer, limit=4).to_list()
    rows[1]["chosen"] = "It is " + rows[1]["chosen"] + ", clearly."
    rows[2]["rejected"] = rows[2]["rejected"] + tokenizer.eos_token  # an EOS already there stays one EOS
    return rows


def test_the_preference_set_prefers_the_right_label(tiny_llama):
    _, tokenizer = tiny_llama
    task = peftlab.load_task("sentiment")
    rows = task.rows("train", 8)
    got = dpo.preference_pairs(task, tokenizer, limit=8)
    assert got["chosen"] == [task.labels[y] for y in rows["label"]]
    assert all(c != r and {c, r} == set(task.labels) for c, r in zip(got["chosen"], got["rejected"]))
    assert got["prompt"][0].endswith("<|im_start|>assistant\n") and rows[0]["text"][:30] in got["prompt"][0]
    topic = dpo.preference_pairs("topic", tokenizer, limit=12)
    assert len(set(topic["rejected"])) > 2  # with 5 labels every wrong one appears, not always the same one
    with pytest.raises(DataError, match="no label words"):
        dpo.preference_pairs("qa", tokenizer, limit=2)


def test_same_loss_rewards_and_gradients_as_trls_dpo_trainer(tiny_llama, pairs, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from peftlab.production.hf_peft import copy_reference_to_peft

    base, tokenizer = tiny_llama
    ours = lora_with_weights(base)
    beta = 2.0  # large enough that the loss is far from log 2 on a tiny random model
    args = DPOConfig(str(tmp_path), beta=beta, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     disable_tqdm=True, bf16=False, max_length=None, seed=0)
    trainer = DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0))
    copy_reference_to_peft(ours, trainer.model)  # the same adapter weights in peft's layers

    # the same tokens: TRL's tokenized rows and collated batch are ours
    theirs_rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    tokens = dpo.tokenize_pairs(tokenizer, pairs)
    for mine, row in zip(tokens, theirs_rows):
        assert mine == {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    assert tokens[2]["rejected_ids"].count(tokenizer.eos_token_id) == 1
    theirs_batch = trainer.data_collator(theirs_rows)
    batch = dpo.collate_pairs(tokens, tokenizer.pad_token_id)
    for key in batch:
        assert torch.equal(batch[key], theirs_batch[key]), key
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # rows of different lengths: padding is there

    trainer.model.eval()
    ours.eval()
    their_loss = trainer.compute_loss(trainer.model, theirs_batch)
    out = dpo.batch_loss(ours, batch, beta=beta)
    assert abs(out.loss.item() - math.log(2)) > 0.05
    torch.testing.assert_close(out.loss, their_loss, rtol=1e-5, atol=1e-5)
    metrics = trainer._metrics["eval"]
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
    assert out.accuracy == pytest.approx(metrics["rewards/accuracies"][-1])

    # and the same gradient on every adapter weight
    their_loss.backward()
    out.loss.backward()
    theirs = dict(trainer.model.named_parameters())
    from peftlab.production.hf_peft import reference_to_peft_names

    for mine, peft_name in reference_to_peft_names(ours).items():
        torch.testing.assert_close(ours.get_parameter(mine).grad, theirs[peft_name].grad, rtol=1e-4, atol=1e-6)


def test_the_reference_is_the_base_model_with_the_adapter_off(tiny_llama, pairs):
    base, tokenizer = tiny_llama
    model = lora_with_weights(base)
    batch = dpo.collate_pairs(dpo.tokenize_pairs(tokenizer, pairs), tokenizer.pad_token_id)
    with torch.no_grad():
        base_logps = dpo.sequence_logps(base, batch)
        policy = dpo.sequence_logps(model, batch)
    ref = dpo.reference_logps(model, batch)
    torch.testing.assert_close(ref, base_logps, rtol=0, atol=1e-5)
    assert (policy - ref).abs().max() > 1e-3  # the adapter does change the policy
    with torch.no_grad():  # and it is switched back on afterwards
        torch.testing.assert_close(dpo.sequence_logps(model, batch), policy)
    assert dpo.reference_logps(model, batch).requires_grad is False
    # only real tokens count: whatever the padding holds, the log-probabilities stay the same
    padded = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    torch.testing.assert_close(dpo.reference_logps(model, padded), ref)
    assert (ref < 0).all()


def test_dpo_loss_is_the_papers_equation_and_training_raises_the_margin(tiny_llama, pairs):
    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
        torch.tensor([-3.0, -3.0])
    out = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = 0.5 * ((pc - rc) - (pr - rr))  # [0.75, -1.0]
    expected = -torch.log(torch.sigmoid(margins)).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.margins, margins)
    assert out.accuracy == 0.5
    same = dpo.dpo_loss(pc, pr, pc, pr, beta=0.1)  # policy == reference: every pair log 2
    assert same.loss.item() == pytest.approx(math.log(2))

    base, tokenizer = tiny_llama
    model = peftlab.adapt(copy.deepcopy(base), "lora", r=4, alpha=8, targets=TARGETS)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = dpo.collate_pairs(dpo.tokenize_pairs(tokenizer, pairs), tokenizer.pad_token_id)  # all four pairs
    run = dpo.train_dpo(model, pairs, tokenizer, steps=6, lr=5e-2, batch_size=2, beta=0.5)
    assert run.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: the policy starts as the reference
    assert run.margins[0] == 0.0 and len(run.history) == 6
    with torch.no_grad():
        after = dpo.batch_loss(model, batch, beta=0.5)
    assert after.loss.item() < math.log(2) - 0.05 and after.margins.mean() > 0  # the whole set is preferred better
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    measured = dpo.preference_accuracy(model, pairs, tokenizer, batch_size=3)
    assert measured["n"] == 4 and 0.0 <= measured["accuracy"] <= 1.0


def test_a_nan_step_is_not_applied_and_the_run_says_so(tiny_llama, pairs, monkeypatch):
    base, tokenizer = tiny_llama
    model = lora_with_weights(base)
    real = dpo.dpo_loss
    calls = []

    def nan_on_the_third(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        return dpo.DPOOutput(out.loss * math.nan, out.chosen_rewards, out.rejected_rewards) if len(calls) == 4 else out  # the first call checks beta

    monkeypatch.setattr(dpo, "dpo_loss", nan_on_the_third)
    before = {}
    with pytest.warns(RuntimeWarning, match="step 3: the loss or its gradient is not finite"):
        run = dpo.train_dpo(model, pairs, tokenizer, steps=5, lr=1e-2, batch_size=2, beta=0.5,
                            on_step=lambda record: before.update({n: p.detach().clone() for n, p in
                                                                   model.named_parameters() if p.requires_grad}))
    assert run.reason == "nan" and len(run.history) == 2
    for name, param in model.named_parameters():  # the adapter holds step 2's values, finite
        if param.requires_grad:
            assert torch.equal(param, before[name]) and torch.isfinite(param).all()


def test_bad_input_is_refused_with_a_clear_message(tiny_llama, pairs):
    base, tokenizer = tiny_llama
    logps = [torch.zeros(2)] * 4
    for beta in (0, -0.1, float("nan"), True):
        with pytest.raises(ConfigError, match="beta=.*Expected a positive number"):
            dpo.dpo_loss(*logps, beta=beta)
    with pytest.raises(ConfigError, match="one shape"):
        dpo.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(DataError, match="chosen completion is empty"):
        dpo.tokenize_pair(tokenizer, "Q?", "", "no")
    with pytest.raises(DataError, match="rejected completion is empty"):
        dpo.tokenize_pair(tokenizer, "Q?", "yes", "   ")
    with pytest.raises(DataError, match="the same text"):
        dpo.tokenize_pair(tokenizer, "Q?", "yes", "yes")
    with pytest.raises(DataError, match="missing \\['rejected'\\]"):
        dpo.tokenize_pairs(tokenizer, [{"prompt": "Q?", "chosen": "yes"}])
    with pytest.raises(DataError, match="empty"):
        dpo.tokenize_pairs(tokenizer, [])
    batch = dpo.collate_pairs(dpo.tokenize_pairs(tokenizer, pairs[:1]), tokenizer.pad_token_id)
    with pytest.raises(ConfigError, match="carries no adapter"):
        dpo.reference_logps(base, batch)
    model = peftlab.adapt(copy.deepcopy(base), "lora", r=2, targets=TARGETS)
    with pytest.raises(ConfigError, match="steps=0"):
        dpo.train_dpo(model, pairs, tokenizer, steps=0)
    with pytest.raises(ConfigError, match="beta=0"):
        dpo.train_dpo(model, pairs, tokenizer, steps=1, beta=0)


def test_lesson16_checkers_accept_right_answers_and_refuse_wrong_ones(capsys, monkeypatch):
    import torch.nn.functional as F

    from peftlab.exercises import catalog, lesson16_dpo_with_an_adapter

    for exercise in lesson16_dpo_with_an_adapter.LESSON_EXERCISES:  # in the catalogue or not yet
        monkeypatch.setitem(catalog.EXERCISES, exercise.name, exercise)

    def completion_logps(logits, input_ids, completion_mask):
        logps = logits[:, :-1].log_softmax(-1).gather(2, input_ids[:, 1:, None])[..., 0]
        return (logps * completion_mask[:, 1:]).sum(-1)

    def unshifted(logits, input_ids, completion_mask):  # the classic off-by-one
        logps = logits.log_softmax(-1).gather(2, input_ids[..., None])[..., 0]
        return (logps * completion_mask).sum(-1)

    def loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
        margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        return -F.logsigmoid(beta * margin).mean()

    def no_reference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
        return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps)).mean()

    assert exercises.check("completion_logps", completion_logps)
    assert not exercises.check("completion_logps", unshifted)
    assert exercises.check("dpo_loss", loss)
    assert not exercises.check("dpo_loss", no_reference)
    out = capsys.readouterr().out
    assert out.count("✓") == 2 and "Hint" in out


def test_checkpointing_and_dropout_change_nothing_but_memory(tiny_llama, pairs):
    base, tokenizer = tiny_llama
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same initial A
        model = peftlab.adapt(copy.deepcopy(base), "lora", r=4, alpha=8, targets=TARGETS, dropout=0.3)
        runs.append(dpo.train_dpo(model, pairs, tokenizer, steps=3, lr=5e-2, batch_size=2, beta=0.5,
                                  gradient_checkpointing=checkpointing))
        assert model.training is False and not getattr(model, "is_gradient_checkpointing", False)
        assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}  # given back
    assert runs[0].losses[0] == pytest.approx(math.log(2), abs=1e-6)  # dropout off: policy == reference at B = 0
    assert runs[0].losses == pytest.approx(runs[1].losses, abs=1e-5)
