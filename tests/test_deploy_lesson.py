"""Lesson 17's library and checkers: deploy.unload gives a plain transformers model with the adapter
merged (equal to peft's merge_and_unload); merge_stored / retained_fraction measure what a stored
format keeps of a merged update; the lesson's exercises accept the right answers and explain wrong ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab import deploy, exercises
from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer


@pytest.fixture(scope="module")
def tiny():
    model, _ = peftlab.load_model("tiny-llama")
    return model.eval()


def _trained(model, method="lora", name="default", seed=0, **options):
    """A copy with one adapter whose weights are random (a fresh LoRA's B = 0 would hide every bug)."""
    model = peftlab.adapt(copy.deepcopy(model), method, adapter_name=name, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_unload_merges_into_plain_modules_with_the_same_outputs(tiny, tmp_path):
    model = _trained(tiny, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(tiny), atol=1e-3), "the adapter changes the outputs"
    plain = deploy.unload(model)
    assert plain is model and type(plain) is type(tiny)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert "peftlab" not in plain.__dict__ and "save_pretrained" not in plain.__dict__
    assert torch.allclose(_logits(plain), expected, atol=1e-5)
    assert set(plain.state_dict()) == set(tiny.state_dict())  # the base model's names, no adapter tensors

    plain.save_pretrained(tmp_path)  # transformers' own: the whole model, not an adapter
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(plain))


def test_unload_equals_peft_merge_and_unload(tiny, tmp_path):
    from peftlab.production.hf_peft import import_peft

    peft = import_peft()
    model = _trained(tiny, r=4, alpha=16, targets=("q_proj", "v_proj"))
    peftlab.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny), str(tmp_path / "adapter")).merge_and_unload()
    ours = deploy.unload(model).state_dict()
    their_weights = theirs.state_dict()
    assert ours.keys() == their_weights.keys()
    assert max((ours[k] - their_weights[k]).abs().max().item() for k in ours) < 1e-6
    assert type(deploy.unload(peft.PeftModel.from_pretrained(copy.deepcopy(tiny), str(tmp_path / "adapter")))) is type(tiny)


def test_unload_keeps_only_the_active_adapter_and_merge_false_gives_the_base(tiny):
    from peftlab import compose

    model = _trained(tiny, name="en", r=4, targets=("q_proj", "v_proj"))
    compose.add_adapter(model, "de", "lora", r=4, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters.de." in name:
                param.normal_(0, 0.1)
    compose.set_adapter(model, "de")
    with_de = _logits(model)
    assert torch.allclose(_logits(deploy.unload(copy.deepcopy(model))), with_de, atol=1e-5)
    base = deploy.unload(model, merge=False)
    assert torch.equal(_logits(base), _logits(tiny))
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_unload_refuses_what_cannot_be_merged_and_a_model_without_adapter(tiny):
    prefix = peftlab.adapt(copy.deepcopy(tiny), "prefix_tuning", num_virtual_tokens=4)
    with pytest.raises(ConfigError, match="cannot be merged.*merge=False"):
        deploy.unload(prefix)
    dropped = deploy.unload(prefix, merge=False)  # dropping it gives the base back
    assert torch.equal(_logits(dropped), _logits(tiny))
    with pytest.raises(ConfigError, match="no peftlab adapter"):
        deploy.unload(copy.deepcopy(tiny))


def test_float32_keeps_every_update_and_nf4_loses_one_below_its_step():
    g = torch.Generator().manual_seed(0)
    W = 0.05 * torch.randn(64, 128, generator=g)
    direction = torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g)
    direction /= direction.pow(2).mean().sqrt()
    kept = {}
    for fmt in deploy.FORMATS:
        step = deploy.grid_step(deploy.stored(W, fmt), fmt).pow(2).mean().sqrt()
        for size in (0.02, 5.0):
            delta = size * step * direction
            assert deploy.update_in_steps(W, delta, fmt) == pytest.approx(size, rel=1e-4)
            change = deploy.merge_stored(W, delta, fmt) - deploy.stored(W, fmt)
            kept[fmt, size] = deploy.retained_fraction(delta, change)
    for fmt in deploy.FORMATS:  # every format has a grid: far below its step the update is lost
        assert kept[fmt, 0.02] < 0.2 < 0.95 < kept[fmt, 5.0], (fmt, kept)
    assert kept["nf4", 0.02] < 0.05  # only the block maxima (1 entry in 64) move
    # one update of a fine-tuning's size (RMS 1e-4): float32 keeps it, bf16 part of it, NF4 almost none
    delta = 1e-4 * direction
    share = {fmt: deploy.retained_fraction(delta, deploy.merge_stored(W, delta, fmt) - deploy.stored(W, fmt))
             for fmt in deploy.FORMATS}
    assert share["fp32"] == pytest.approx(1.0, abs=1e-3)
    assert share["nf4"] < 0.05 < share["bf16"] < 0.95


def test_grid_steps_are_the_formats_spacing():
    w = torch.tensor([1.0, 3.0, -0.3125])  # values bf16 holds exactly
    assert deploy.grid_step(w, "bf16").tolist() == [2.0**-7, 2.0**-6, 2.0**-9]
    for value, step in zip(w.tolist(), deploy.grid_step(w, "bf16").tolist()):
        rounded = torch.tensor(value + 0.4 * step).to(torch.bfloat16).item()
        assert rounded == pytest.approx(value, abs=1e-6), "less than half a step rounds back"
    from peftlab.quant.nf4 import normal_float_code

    code = normal_float_code()
    block = 2.0 * code.repeat(4)  # 64 weights on NF4's levels, absmax 2
    step = deploy.grid_step(block, "nf4")
    assert step[0].item() == pytest.approx(2.0 * (code[1] - code[0]).item())  # an edge: one neighbour
    assert step[5].item() == pytest.approx(2.0 * (code[6] - code[4]).item() / 2)  # the mean of two gaps


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ConfigError, match="Did you mean 'nf4'"):
        deploy.stored(torch.ones(64), "nf5")
    with pytest.raises(ConfigError, match="same shape"):
        deploy.merge_stored(torch.ones(4, 64), torch.ones(64, 4), "nf4")
    with pytest.raises(ConfigError, match="all zeros"):
        deploy.retained_fraction(torch.zeros(3), torch.ones(3))


def test_merge_lora_checker_accepts_one_rounding_and_explains_two(capsys):
    def right(W, A, B, scaling):
        return (W.float() + scaling * (B.float() @ A.float())).to(W.dtype)

    def rounds_twice(W, A, B, scaling):  # the update rounded to W's dtype first
        return W + (scaling * B @ A).to(W.dtype)

    def float32_out(W, A, B, scaling):
        return W.float() + scaling * B @ A

    assert exercises.check("merge_lora", right)
    assert not exercises.check("merge_lora", rounds_twice)
    assert "differ" in capsys.readouterr().out
    assert not exercises.check("merge_lora", float32_out)
    assert not exercises.check("merge_lora", lambda W, A, B, scaling: W + scaling * A.T @ B.T)
    assert "raised" in capsys.readouterr().out


def test_merge_lora_cases_cover_both_dtypes():
    from peftlab.exercises.lesson17_deploying_and_serving import LESSON_EXERCISES

    exercise = {e.name: e for e in LESSON_EXERCISES}["merge_lora"]
    g = torch.Generator().manual_seed(0)
    assert {exercise.make_inputs(g)["W"].dtype for _ in range(5)} == {torch.float32, torch.bfloat16}


def test_retained_fraction_checker(capsys):
    def right(delta, change):
        delta, change = delta.double(), change.double()
        return (change * delta).sum() / (delta * delta).sum()

    assert exercises.check("retained_fraction", right)
    assert not exercises.check("retained_fraction", lambda delta, change: change.norm() / delta.norm())
    assert "differ" in capsys.readouterr().out
    reference = exercises.EXERCISES["retained_fraction"].reference
    delta = torch.randn(5, 7)
    assert reference(delta, delta).item() == pytest.approx(1.0)
    assert reference(delta, torch.zeros_like(delta)).item() == 0.0
    assert float(reference(delta, 0.5 * delta)) == pytest.approx(deploy.retained_fraction(delta, 0.5 * delta))


def test_unload_stores_a_qlora_merge_as_fp32_bf16_or_nf4(tiny):
    from peftlab.quant.nf4 import Linear4bitRef, quantize_model_nf4

    qbase = copy.deepcopy(tiny)
    quantize_model_nf4(qbase, double_quant=False)
    qlora = _trained(qbase, r=4, alpha=8, targets=("q_proj", "v_proj"))
    unmerged = _logits(qlora)
    name = "model.layers.0.self_attn.q_proj"
    layer = qlora.get_submodule(name)
    W, delta = layer.base_layer.weight, layer.delta_weight()
    with pytest.raises(ConfigError, match="4-bit"):  # the base's own format: re-quantising is never silent
        deploy.unload(copy.deepcopy(qlora))
    with pytest.raises(ConfigError, match="merge=False merges nothing"):
        deploy.unload(copy.deepcopy(qlora), merge=False, store="nf4")
    dequantized = deploy.unload(copy.deepcopy(qlora), merge=False, store="fp32")  # the NF4 base alone, in fp32
    assert torch.equal(dequantized.get_submodule(name).weight, W)
    assert not any(isinstance(m, Linear4bitRef) for m in dequantized.modules())

    fp32 = deploy.unload(copy.deepcopy(qlora), store="fp32")
    assert not any(isinstance(m, (Linear4bitRef, AdaptedLayer)) for m in fp32.modules())
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert torch.equal(fp32.get_submodule(name).weight, W + delta)
    assert torch.allclose(_logits(fp32), unmerged, atol=1e-5)

    bf16 = deploy.unload(copy.deepcopy(qlora), store="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.get_submodule(name).weight, (W + delta).to(torch.bfloat16))  # rounded once

    nf4 = deploy.unload(copy.deepcopy(qlora), store="nf4")
    merged = nf4.get_submodule(name)
    assert type(merged) is Linear4bitRef and type(nf4.get_submodule("model.layers.0.mlp.up_proj")) is Linear4bitRef
    assert torch.equal(merged.weight, deploy.merge_stored(W, delta, "nf4"))  # re-quantised, as peft's merge into 4-bit
    with torch.no_grad():
        assert (_logits(nf4) - unmerged).abs().max() > (_logits(fp32) - unmerged).abs().max()
