"""peftlab models in the tools practitioners already use: transformers' Trainer and TRL's
SFTTrainer save a peftlab-adapted model as a peft adapter (adapter_config.json +
adapter_model.safetensors) that peftlab and peft load back with the same logits, and a Trainer
resumes from such a checkpoint. Tiny seeded Llama, two steps, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ("reference", "fused")


def adapted(backend: str = "reference", **kwargs):
    model, tokenizer = load_model("tiny-llama")
    torch.manual_seed(0)  # the adapter's initial weights
    return peftlab.adapt(model, "lora", r=4, alpha=8, backend=backend, **kwargs), tokenizer


def rows(tokenizer, n: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        ids = tokenizer(f"Question {i}: what is {i} plus {i}? Answer: {2 * i}.")["input_ids"][:24]
        out.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)})
    return out


def trainer_for(model, tokenizer, out: Path, eval_dataset=None, **overrides):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    settings = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2, save_steps=1,
                    report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0)
    settings.update(overrides)
    args = TrainingArguments(str(out), **settings)
    return Trainer(model=model, args=args, train_dataset=rows(tokenizer), eval_dataset=eval_dataset,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))


PROBE = torch.tensor([[1, 5, 9, 14, 20, 33, 47, 2]])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=PROBE).logits


def lora_b(model) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]


def assert_reloads(trained, folder: Path) -> None:
    """peftlab.load_adapter and peft.PeftModel.from_pretrained give the trained model's logits."""
    from peft import PeftModel

    assert any(b.abs().max() > 0 for b in lora_b(trained)), "training did not move the adapter"
    expected = logits(trained)
    ours = peftlab.load_adapter(load_model("tiny-llama")[0], folder)
    theirs = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(folder))
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    base = logits(load_model("tiny-llama")[0])
    assert (expected - base).abs().max() > 1e-4  # the adapter is what the files carry


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_save_model_writes_a_peft_adapter(tmp_path, backend):
    model, tokenizer = adapted(backend)
    trainer = trainer_for(model, tokenizer, tmp_path / "out")
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-2"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
        assert not names & {"model.safetensors", "pytorch_model.bin"}, names
    assert (tmp_path / "out" / "checkpoint-1" / "optimizer.pt").is_file()  # Trainer's files kept
    assert_reloads(model, tmp_path / "out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_trainer_saves_a_peft_adapter(tmp_path, backend):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = adapted(backend)
    data = Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(8)])
    args = SFTConfig(str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                     report_to=[], use_cpu=True, disable_tqdm=True, save_steps=2, max_length=32, seed=0,
                     bf16=False)  # bf16 autocast on CPU would stay wrapped around model.forward (accelerate)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "sft"))
    assert not (tmp_path / "sft" / "model.safetensors").exists()
    assert_reloads(model, tmp_path / "sft")
    assert_reloads(model, tmp_path / "sft" / "checkpoint-2")


def optimizer_state(trainer) -> list[torch.Tensor]:
    return [t.clone() for st in trainer.optimizer.state_dict()["state"].values() for t in st.values()
            if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plain_trainer_resumes_a_middle_checkpoint_as_if_never_stopped(tmp_path, backend):
    """No peftlab call: the checkpoint's index + trainable shard are what Trainer loads, and the
    Trainer restores the optimizer and scheduler beside them, so the run ends where an
    uninterrupted one does (AdamW moments and a decaying learning rate would differ otherwise)."""
    model, tokenizer = adapted(backend)
    straight = trainer_for(model, tokenizer, tmp_path / "a", max_steps=4, lr_scheduler_type="linear")
    straight.train()
    middle = tmp_path / "a" / "checkpoint-2"
    names = {p.name for p in middle.iterdir()}
    assert {"model.safetensors.index.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}, names  # never the base weights
    from safetensors.torch import load_file

    shard = load_file(middle / "trainable.safetensors")
    assert shard and all(".adapters." in k for k in shard), sorted(shard)[:3]

    fresh, tokenizer = adapted(backend)
    before = lora_b(fresh)
    resumed = trainer_for(fresh, tokenizer, tmp_path / "b", max_steps=4, lr_scheduler_type="linear")
    resumed.train(resume_from_checkpoint=str(middle))
    assert resumed.state.global_step == 4
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    for a, b in zip(optimizer_state(straight), optimizer_state(resumed)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b, b0 in zip(lora_b(model), lora_b(fresh), before):
        assert not torch.equal(b, b0)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert_reloads(fresh, tmp_path / "b" / "checkpoint-4")


def test_resuming_without_the_optimizer_state_would_not_match(tmp_path):
    """The test above can fail: a run resumed with the adapter but a fresh optimizer ends elsewhere."""
    model, tokenizer = adapted()
    trainer_for(model, tokenizer, tmp_path / "a", max_steps=4).train()
    middle = tmp_path / "a" / "checkpoint-2"
    (middle / "optimizer.pt").unlink()
    fresh, tokenizer = adapted()
    trainer_for(fresh, tokenizer, tmp_path / "b", max_steps=4).train(resume_from_checkpoint=str(middle))
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(lora_b(model), lora_b(fresh)))


def test_sft_trainer_resumes_a_checkpoint(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(8)])

    def run(out: Path, resume: str | None = None):
        model, tokenizer = adapted("fused")
        args = SFTConfig(str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
                         report_to=[], use_cpu=True, disable_tqdm=True, save_steps=1, max_length=32, seed=0,
                         bf16=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    for a, b in zip(lora_b(straight), lora_b(resumed)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_from_pretrained_on_a_checkpoint_keeps_the_adapter(tmp_path):
    """The index does not make transformers load the folder as a (base-less) model: it reads
    adapter_config.json first and loads the base plus the adapter through peft."""
    import json

    from transformers import AutoModelForCausalLM

    load_model("tiny-llama")[0].save_pretrained(tmp_path / "base")  # the base, where a hub id would be
    model, tokenizer = adapted()
    trainer_for(model, tokenizer, tmp_path / "out").train()
    folder = tmp_path / "out" / "checkpoint-2"
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(str(folder))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_best_model_at_end_loads_the_best_adapter(tmp_path):
    model, tokenizer = adapted()
    trainer = trainer_for(model, tokenizer, tmp_path / "out", max_steps=2, eval_strategy="steps", eval_steps=1,
                          save_strategy="steps", load_best_model_at_end=True, metric_for_best_model="loss",
                          greater_is_better=True, eval_dataset=rows(tokenizer, 4))
    peftlab.adapter_checkpoints(trainer).train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-1"  # "best" = the higher eval loss: the earlier step, not the last
    last = peftlab.load_adapter(load_model("tiny-llama")[0], best.parent / "checkpoint-2")
    assert (logits(last) - logits(model)).abs().max() > 1e-4  # the model went back to step 1
    reloaded = peftlab.load_adapter(load_model("tiny-llama")[0], best)
    torch.testing.assert_close(logits(model), logits(reloaded), rtol=1e-5, atol=1e-5)


def test_save_pretrained_puts_a_second_adapter_in_a_subfolder_as_peft_does(tmp_path):
    from peft import PeftModel

    model, _ = adapted()
    peftlab.add_adapter(model, "other", "lora", r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    (tmp_path / "keep.txt").write_text("a file of someone else's")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "a file of someone else's"
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    theirs = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    peftlab.set_adapter(model, "other")
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)


def test_push_to_hub_uploads_the_adapter(tmp_path, monkeypatch):
    """model.push_to_hub saves through the same save_pretrained; the upload itself is stubbed."""
    import transformers.utils.hub as hub

    uploaded = {}

    class Repo:
        repo_id = "me/tiny-lora"

    monkeypatch.setattr(hub, "hf_api", lambda: type("Api", (), {"create_repo": lambda *a, **k: Repo()})())
    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda *a, **k: type("Card", (), {"save": lambda self, path: None})())
    model, _ = adapted()
    def upload(folder, repo_id, **kwargs):
        uploaded[repo_id] = sorted(p.name for p in Path(folder).iterdir())

    monkeypatch.setattr(model, "_upload_modified_files", upload)
    model.push_to_hub("me/tiny-lora")
    assert uploaded == {"me/tiny-lora": ["adapter_config.json", "adapter_model.safetensors",
                                         "model.safetensors.index.json", "trainable.safetensors"]}


def test_a_model_whose_adapters_are_all_deleted_saves_as_a_plain_model(tmp_path):
    model, _ = adapted()
    peftlab.delete_adapter(model, "default")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
