"""peftlab.doctor: each silent failure is built on purpose and found with its numbers; a healthy
setup gets a clean bill; the doctor leaves the model as it was. Tiny seeded Llama, CPU."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(6)]


def lora(**kwargs):
    model, tokenizer = load_model("tiny-llama")
    return peftlab.adapt(model, "lora", **{"r": 8, "alpha": 16, **kwargs}), tokenizer


def checks(report) -> set[str]:
    return {f.check for f in report.findings}


def test_a_healthy_setup_gets_a_clean_bill():
    model, tokenizer = lora()
    report = peftlab.doctor(model, QA, tokenizer=tokenizer, max_length=128, lr=2e-4)
    assert report.ok, str(report)
    assert {"trainable", "targets", "alpha", "gradients", "merge-4bit", "lr"} <= set(report.checked)
    assert "clean bill" in repr(report) and "clean bill" in report._repr_html_()


def test_gradient_checkpointing_without_input_grads_is_found():
    model, _ = lora()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # what transformers < 4.35 and custom loops left out
    (finding,) = peftlab.doctor(model).of("gradients")
    assert finding.severity == "error" and finding.numbers["with_gradient"] == 0
    assert finding.numbers["trainable_tensors"] == 8  # q_proj, v_proj x 2 layers x (A, B)
    assert "enable_input_require_grads" in finding.fix
    model.enable_input_require_grads()  # the fix: the same checkpointing now trains
    assert not peftlab.doctor(model).of("gradients")


def test_disabled_adapters_get_no_gradient():
    model, _ = lora()
    peftlab.set_disabled(model, True)
    (finding,) = peftlab.doctor(model).of("gradients")
    assert finding.numbers == {"trainable_tensors": 8, "with_gradient": 0}


def test_target_entries_that_match_nothing_are_found():
    model, _ = lora(targets=("q_proj", "query"))
    (finding,) = peftlab.doctor(model).of("targets")
    assert finding.severity == "warning" and "'query'" in finding.evidence
    assert finding.numbers == {"dead_entries": 1, "adapted": 2}
    plain, _ = load_model("tiny-llama")
    (none,) = peftlab.doctor(plain, targets=("query", "value")).of("targets")
    assert none.severity == "error" and none.numbers["adapted"] == 0


def test_targets_reaching_only_part_of_the_model_are_found():
    model, _ = lora(targets=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    found = {f.evidence.split(" layers")[0]: f.numbers for f in peftlab.doctor(model).of("targets")}
    assert found == {"1 of 2 'q_proj'": {"adapted": 1, "of": 2}, "1 of 2 'v_proj'": {"adapted": 1, "of": 2}}


def test_an_alpha_that_damps_the_update_is_found():
    model, _ = lora(r=64, alpha=1)
    (finding,) = peftlab.doctor(model).of("alpha")
    assert finding.numbers["scaling"] == pytest.approx(1 / 64) and "64x weaker" in finding.evidence
    model, _ = lora(r=64, alpha=0.5, use_rslora=True)  # alpha / sqrt(r) = 1/16
    assert peftlab.doctor(model).of("alpha")[0].numbers["scaling"] == pytest.approx(1 / 16)
    model, _ = lora(r=64, alpha=1, use_rslora=True)  # 1/8: above the line
    assert not peftlab.doctor(model).of("alpha")


def test_base_weights_left_trainable_are_found():
    model, _ = lora()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    (finding,) = peftlab.doctor(model, probe=False).of("trainable")
    assert finding.numbers["stray_tensors"] == 1 and "layers.1.mlp.up_proj.weight" in finding.evidence


def test_a_peft_model_loaded_frozen_is_found(tmp_path):
    from peft import PeftModel

    model, _ = load_model("tiny-llama")
    peftlab.save_adapter(peftlab.adapt(model, "lora", r=4, backend="peft"), tmp_path / "a")
    loaded = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(tmp_path / "a"))  # is_trainable=False
    (finding,) = peftlab.doctor(loaded).of("trainable")
    assert finding.severity == "error" and finding.numbers["trainable"] == 0 and "is_trainable=True" in finding.fix
    trainable = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(tmp_path / "a"), is_trainable=True)
    assert peftlab.doctor(trainable, lr=2e-4).ok


def test_merging_into_a_4bit_base_that_rounds_the_update_away_is_found():
    from peftlab.quant.nf4 import quantize_model_nf4

    model, _ = load_model("tiny-llama")
    quantize_model_nf4(model)
    model = peftlab.adapt(model, "lora", r=8, alpha=16)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter's size: |ΔW| ~ 1e-4, far below the 4-bit code spacing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-4)
    (finding,) = peftlab.doctor(model, probe=False).of("merge-4bit")
    assert finding.numbers["lost"] > 0.9 and finding.numbers["layers"] == 4
    fp, _ = lora()  # the same update on a 16-bit base merges exactly: no finding
    assert not peftlab.doctor(fp, probe=False).of("merge-4bit")


def test_a_learning_rate_far_from_the_usual_range_is_found():
    model, _ = lora()
    (low,) = peftlab.doctor(model, lr=1e-7, probe=False).of("lr")
    assert low.numbers["typical"] == 2e-4 and "2000x below" in low.evidence
    (high,) = peftlab.doctor(model, lr=3e-2, probe=False).of("lr")
    assert "above" in high.evidence
    prompt, _ = load_model("tiny-llama")
    prompt = peftlab.adapt(prompt, "prompt_tuning")
    assert not peftlab.doctor(prompt, lr=3e-2, probe=False).of("lr")  # soft prompts train at high lr


def test_a_chat_template_that_truncates_every_answer_is_found():
    model, tokenizer = lora()
    (finding,) = peftlab.doctor(model, QA, tokenizer=tokenizer, max_length=24, probe=False).of("truncation")
    assert finding.severity == "error" and finding.numbers["lost_rows"] == len(QA)
    assert finding.numbers["template_tokens"] > 20  # SmolLM2's default system prompt
    assert finding.numbers["needed"] > 24
    fixed = peftlab.doctor(model, QA, tokenizer=tokenizer, max_length=finding.numbers["needed"], probe=False)
    assert not fixed.of("truncation")


def test_labels_all_masked_are_found():
    model, tokenizer = lora()
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100] * 4} for _ in range(3)]
    rows.append({"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]})
    (finding,) = peftlab.doctor(model, rows, probe=False).of("labels")
    assert finding.numbers == {"masked_rows": 3, "rows": 4} and finding.severity == "warning"
    (all_masked,) = peftlab.doctor(model, rows[:3], probe=False).of("labels")
    assert all_masked.severity == "error"


def test_the_doctor_leaves_the_model_as_it_was():
    model, _ = lora()
    model.eval()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 3.0)
    rng = torch.get_rng_state()
    peftlab.doctor(model)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.all(p.grad == 3.0) for p in model.parameters() if p.requires_grad)


def test_the_report_reads_as_text_and_html():
    model, _ = lora(r=64, alpha=1)
    report = peftlab.doctor(model, lr=1e-7, probe=False)
    text, page = str(report), report._repr_html_()
    assert "2 finding(s)" in text and "evidence:" in text and "fix:" in text
    assert page.count("<tr>") == 3 and "alpha" in page


def test_the_lab_shows_the_findings_before_training():
    from peftlab.widgets import Lab

    lab = Lab(task=None, model="tiny-llama", steps=1, batch_size=2, max_length=64, spectrum_every=1,
              redraw_every_s=0.0)
    shown = []
    show = lab.show
    lab.show = lambda text, kind="info": (shown.append((text, kind)), show(text, kind))
    lab.lr_w.value = 1e-7
    assert lab.on_train() and lab.wait(120)
    before = next((text, kind) for text, kind in shown if text.startswith("Training lora"))
    assert before[1] == "warning" and "[warning] lr: " in before[0] and "fix: Start from lr=0.0002" in before[0]


def test_peftlab_doctor_is_callable_after_its_submodules_are_imported():
    import importlib

    importlib.import_module("peftlab.doctor.report")  # binds peftlab.doctor to the package
    model, _ = lora(r=64, alpha=1)
    assert peftlab.doctor(model, probe=False).of("alpha")


def test_peftlabs_own_task_defaults_are_not_flagged():
    """The bundled tasks' defaults (short runs at 2e-3..5e-3, alpha = 2r) are healthy settings."""
    for task in peftlab.list_tasks():
        d = task.defaults
        model, _ = lora(r=d.r, alpha=d.alpha)
        report = peftlab.doctor(model, lr=d.lr, probe=False)
        assert not report.of("lr") and not report.of("alpha"), (task.name, task.framing, str(report))
