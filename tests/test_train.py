"""peftlab.train: the loop learns, is repeatable, and never loses work (stop, NaN, errors, resume)."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

import peftlab
from peftlab.errors import AdapterFileError, DataError, TrainingError
from peftlab.train import _EpochOrder, evaluate, lr_factor, train

FAST = dict(batch_size=4, max_length=32, lr=1e-2, progress=False)


def lm_rows(n: int = 8, seed: int = 0):
    """A tokenized causal-LM dataset of n fixed rows of different lengths (6-10 tokens)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 2000, (6 + i % 5,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return Dataset.from_list(rows)


def lora(model, seed: int = 0, **hp):
    torch.manual_seed(seed)  # the adapter's initial weights
    return peftlab.adapt(model, "lora", **{"r": 4, **hp})


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_falls_and_records_are_complete(tiny_llama):
    model, _ = tiny_llama
    result = train(lora(model, targets="all-linear"), lm_rows(), steps=12, **{**FAST, "lr": 2e-2})
    assert result.stop_reason == "completed"
    assert len(result.history) == 12
    assert result.losses[-1] < result.losses[0] - 0.2  # it starts memorising 8 fixed rows
    record = result.history[0]
    for key in ("step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "memory_mb"):
        assert key in record and math.isfinite(record[key])
    assert [r["step"] for r in result.history] == list(range(1, 13))
    assert result.peak_memory_mb >= max(r["memory_mb"] for r in result.history) > 0
    assert result.final_loss == result.losses[-1]
    assert not model.training  # the mode it came in with (load_model returns eval mode)


def test_same_seed_gives_bitwise_identical_curve(tiny_llama):
    def run(seed):
        model, _ = peftlab.load_model("tiny-llama")
        return train(lora(model, dropout=0.1), lm_rows(), steps=4, seed=seed, **FAST).losses

    first = run(0)
    assert run(0) == first  # exact, on CPU
    assert run(1) != first  # the seed really drives data order and dropout


def test_gradient_accumulation_matches_a_bigger_batch(tiny_llama):
    model, _ = tiny_llama
    big = train(lora(model), lm_rows(), steps=3, **{**FAST, "lr": 1e-3})
    big_state = adapter_state(model)
    model2, _ = peftlab.load_model("tiny-llama")
    accum = train(lora(model2), lm_rows(), steps=3, **{**FAST, "lr": 1e-3, "batch_size": 2}, grad_accum=2)
    assert accum.losses == pytest.approx(big.losses, abs=1e-5)
    for name, value in adapter_state(model2).items():
        torch.testing.assert_close(value, big_state[name], atol=1e-5, rtol=1e-4)


def test_stop_flag_ends_after_the_current_step(tiny_llama):
    model, _ = tiny_llama
    flag = threading.Event()
    seen = []

    def watcher(record, model):
        seen.append(record["step"])
        if record["step"] == 2:
            flag.set()  # e.g. a Stop button in a widget

    result = train(lora(model), lm_rows(), steps=10, callbacks=[watcher], stop=flag, **FAST)
    assert result.stop_reason == "stopped" and "Stop flag" in result.message
    assert seen == [1, 2] and len(result.history) == 2


def test_callback_gets_records_and_can_stop(tiny_llama):
    model, _ = tiny_llama
    got = []

    def early_stop(record, model_arg):
        got.append((record, model_arg))
        return "stop" if record["step"] == 3 else None

    result = train(lora(model), lm_rows(), steps=30, callbacks=early_stop, **FAST)
    assert result.stop_reason == "stopped" and "early_stop" in result.message
    assert len(result.history) == len(got) == 3
    assert all(m is model for _, m in got)
    assert [r for r, _ in got] == result.history


def test_nan_loss_stops_without_applying_the_step(tiny_llama):
    model, _ = tiny_llama
    model = lora(model)
    poison = {"on": False, "good": None}
    model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else None)

    def after_step(record, model):
        if record["step"] == 2:
            poison["good"] = adapter_state(model)
            poison["on"] = True  # the next forward returns NaN logits

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        result = train(model, lm_rows(), steps=6, callbacks=[after_step], **FAST)
    assert result.stop_reason == "nan" and "Step 3" in result.message
    assert len(result.history) == 2 and math.isfinite(result.final_loss)
    for name, value in adapter_state(model).items():  # the last good adapter, untouched
        assert torch.equal(value, poison["good"][name])


def test_callback_error_keeps_everything_and_raises_training_error(tiny_llama, tmp_path):
    model, _ = tiny_llama

    def broken_plot(record, model):
        if record["step"] == 2:
            raise ValueError("boom")

    with pytest.raises(TrainingError, match="broken_plot raised ValueError: boom") as info:
        train(lora(model), lm_rows(), steps=5, callbacks=[broken_plot], out_dir=tmp_path, **FAST)
    result = info.value.result
    assert result.stop_reason == "callback_error" and len(result.history) == 2
    assert isinstance(info.value.__cause__, ValueError)
    assert result.checkpoint == tmp_path / "checkpoint-000002"
    assert len(json.loads((result.checkpoint / "history.json").read_text())) == 2


def test_keyboard_interrupt_saves_and_returns(tiny_llama, tmp_path):
    model, _ = tiny_llama

    def ctrl_c(record, model):
        if record["step"] == 2:
            raise KeyboardInterrupt

    result = train(lora(model), lm_rows(), steps=5, callbacks=[ctrl_c], out_dir=tmp_path, **FAST)
    assert result.stop_reason == "interrupted" and len(result.history) == 2
    assert (tmp_path / "checkpoint-000002" / "trainer_state.pt").is_file()


def test_checkpoints_are_written_whole(tiny_llama, tmp_path):
    model, _ = tiny_llama
    result = train(lora(model), lm_rows(), steps=4, out_dir=tmp_path, checkpoint_every=2, **FAST)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-000002", "checkpoint-000004"]  # no temporary folders left
    assert result.checkpoint == tmp_path / "checkpoint-000004"
    assert (result.checkpoint / "adapter" / "adapter_config.json").is_file()
    assert json.loads((result.checkpoint / "history.json").read_text()) == result.history


def test_resume_continues_the_same_curve(tiny_llama, tmp_path):
    model, _ = tiny_llama
    kwargs = dict(steps=6, **FAST)
    straight = train(lora(model, dropout=0.1), lm_rows(), **kwargs)  # dropout: RNG state matters
    straight_state = adapter_state(model)

    first, _ = peftlab.load_model("tiny-llama")
    half = train(lora(first, dropout=0.1), lm_rows(), out_dir=tmp_path,
                 callbacks=[lambda r, m: "stop" if r["step"] == 3 else None], **kwargs)
    assert half.stop_reason == "stopped" and len(half.history) == 3

    fresh, _ = peftlab.load_model("tiny-llama")
    resumed = train(lora(fresh, seed=123, dropout=0.1), lm_rows(), resume_from=tmp_path, **kwargs)
    assert resumed.stop_reason == "completed"
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    for name, value in adapter_state(fresh).items():
        torch.testing.assert_close(value, straight_state[name], atol=1e-6, rtol=0)


def test_resume_rejects_a_different_adapter(tiny_llama, tmp_path):
    model, _ = tiny_llama
    train(lora(model), lm_rows(), steps=1, out_dir=tmp_path, **FAST)
    other, _ = peftlab.load_model("tiny-llama")
    with pytest.raises(AdapterFileError, match="does not fit this model"):
        train(peftlab.adapt(other, "lora", r=2, targets="all-linear"), lm_rows(), steps=2,
              resume_from=tmp_path, **FAST)
    with pytest.raises(AdapterFileError, match="No checkpoint"):
        train(other, lm_rows(), steps=2, resume_from=tmp_path / "missing", **FAST)


def test_peft_backend_trains(tiny_llama):
    model, _ = tiny_llama
    torch.manual_seed(0)
    peft_model = peftlab.adapt(model, "lora", backend="peft", r=4)
    before = adapter_state(peft_model)
    result = train(peft_model, lm_rows(), steps=8, **FAST)
    assert result.losses[-1] < result.losses[0]
    assert any(not torch.equal(v, before[n]) for n, v in adapter_state(peft_model).items())


def test_classification_trains_and_evaluates(tiny_bert):
    from datasets import Dataset

    model, tokenizer = tiny_bert
    # A random tiny BERT gives nearly the same pooled vector for every text, so what it can learn
    # in a few steps is the class prior: 6 positive rows to 2 negative ones.
    words = {1: ["good", "great", "lovely", "fine", "superb", "fun"], 0: ["bad", "dull"]}
    rows = [{"text": f"a {w} film", "label": label} for label, ws in words.items() for w in ws]
    data = Dataset.from_list(rows)  # raw text + label: train tokenizes it
    model = lora(model)
    before = evaluate(model, data, tokenizer=tokenizer)
    assert before["loss"] == pytest.approx(math.log(2), abs=0.05) and before["examples"] == 8
    result = train(model, data, tokenizer=tokenizer, steps=8, eval_data=data, **{**FAST, "batch_size": 8})
    assert result.losses[-1] < result.losses[0]
    assert result.eval["loss"] < before["loss"] - 0.05
    assert result.eval["accuracy"] == pytest.approx(0.75)  # all predicted positive
    assert result.history[-1]["eval_loss"] == result.eval["loss"]
    again = evaluate(model, data, tokenizer=tokenizer)
    assert again["loss"] == pytest.approx(result.eval["loss"], abs=1e-6)  # eval mode: no dropout


def test_raw_question_answer_rows_are_tokenized(tiny_llama):
    from datasets import Dataset, DatasetDict

    model, tokenizer = tiny_llama
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(6)]
    data = DatasetDict({"train": Dataset.from_list(rows)})
    # SmolLM2's chat template adds a system prompt: ~40 tokens before the question
    result = train(lora(model), data, tokenizer=tokenizer, steps=2, **{**FAST, "max_length": 96})
    assert len(result.history) == 2 and result.history[0]["tokens"] > 40
    with pytest.raises(DataError, match="no tokenizer was given"):
        train(model, data, steps=1, **FAST)


def test_gradient_checkpointing_gives_the_same_losses(tiny_llama):
    model, _ = tiny_llama
    plain = train(lora(model), lm_rows(), steps=2, **FAST).losses
    model2, _ = peftlab.load_model("tiny-llama")
    checkpointed = train(lora(model2), lm_rows(), steps=2, gradient_checkpointing=True, **FAST)
    assert checkpointed.losses == pytest.approx(plain, abs=1e-5)
    assert not model2.is_activation_checkpointing  # switched back off afterwards


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_runs(tiny_llama, monkeypatch, native):
    """bf16 as asked; on a CPU without native bfloat16 a warning says it will be slow, and why."""
    import warnings

    import peftlab.train.device as device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    model, _ = tiny_llama
    fp32 = train(lora(model), lm_rows(), steps=1, **FAST).losses[0]
    model2, _ = peftlab.load_model("tiny-llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(lora(model2), lm_rows(), steps=2, bf16=True, **FAST)
    slow = [w for w in caught if "no native bfloat16" in str(w.message)]
    assert len(slow) == (0 if native else 1) and (native or slow[0].filename == __file__)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[0] == pytest.approx(fp32, abs=0.05)  # bf16 rounding, same model
    assert all(p.dtype == torch.float32 for p in adapter_state(model2).values())


def test_nf4_base_trains_and_still_learns_after_an_evaluation():
    pytest.importorskip("bitsandbytes")
    model, _ = peftlab.load_model("tiny-llama", quantization="nf4")
    model = lora(model)
    first = train(model, lm_rows(), steps=3, **FAST)
    evaluate(model, lm_rows(), max_batches=1)  # the AVX512-BF16 trap would strip autograd here
    before = adapter_state(model)
    second = train(model, lm_rows(), steps=3, **FAST)
    assert second.losses[-1] < first.losses[0]
    assert all(not torch.equal(v, before[n]) for n, v in adapter_state(model).items() if "lora_B" in n)


def test_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 3, 30) for s in range(30)]
    assert factors[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert 0 < factors[-1] < 0.01
    assert lr_factor(0, 0, 10) == 1.0  # no warmup: the first step uses the peak rate


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = _EpochOrder(10, seed=0)
    epoch0, epoch1 = order.rows(0, 10), order.rows(10, 10)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert order.rows(7, 6) == epoch0[7:] + epoch1[:3]  # batches may straddle epochs
    assert _EpochOrder(10, seed=0).rows(0, 10) == epoch0
    assert _EpochOrder(10, seed=1).rows(0, 10) != epoch0


def test_settings_are_frozen_and_recorded_in_the_order_train_takes_them(tmp_path):
    import dataclasses
    import inspect
    from types import SimpleNamespace

    from peftlab.train import TrainSettings

    names = [f.name for f in dataclasses.fields(TrainSettings)]
    params = [n for n in inspect.signature(train).parameters if n in names]
    assert names == params  # every setting is an argument of train(), in its order
    values = {n: inspect.signature(train).parameters[n].default for n in names}
    settings = TrainSettings(**{**values, "out_dir": tmp_path})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 3
    task = SimpleNamespace(name="qa", framing="generate")
    recorded = settings.as_dict(task)
    assert list(recorded) == names + ["task"]
    assert recorded["out_dir"] == str(tmp_path) and recorded["task"] == "qa (generate)"
    with pytest.raises(peftlab.PeftlabError, match="grad_accum=0"):
        dataclasses.replace(settings, grad_accum=0).check()


def test_bad_settings_and_untrainable_models_are_clear_errors(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(peftlab.PeftlabError, match="no trainable parameters"):
        for p in model.parameters():
            p.requires_grad_(False)
        train(model, lm_rows(), steps=1, **FAST)
    with pytest.raises(peftlab.PeftlabError, match="steps=0"):
        train(model, lm_rows(), steps=0, **FAST)


def test_class_ids_beyond_the_classifier_are_a_clear_error(tiny_bert):
    from datasets import Dataset

    model, _ = tiny_bert  # 2 outputs
    data = Dataset.from_list([{"input_ids": [101, 2204, 102], "labels": label} for label in (0, 3)])
    with pytest.raises(DataError, match="num_labels=4"):
        train(lora(model), data, steps=1, **FAST)


def test_peftlab_train_is_callable_even_after_importing_the_module():
    import importlib

    import peftlab.train  # binds the package attribute to the module

    importlib.import_module("peftlab.train")
    assert callable(peftlab.train)  # the module forwards calls to train()
    with pytest.raises(peftlab.PeftlabError, match="steps=0"):
        peftlab.train(torch.nn.Linear(2, 2), lm_rows(), steps=0)
