"""LoRA on bare parameters (peft's ``target_parameters``): the 3-D expert weights of
mixture-of-experts models, equal to peft 0.21.2 in outputs, gradients, files and merges."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.errors import ConfigError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _tiny_moe(kind: str):
    """A seeded 2-layer Mixtral (experts stored (E, d_out, d_in)) or GPT-OSS ((E, d_in, d_out),
    is_transposed) with 4 experts, 2 per token."""
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                  num_experts_per_tok=2)
    if kind == "gpt_oss":
        config = transformers.GptOssConfig(**common, layer_types=["full_attention"] * 2)
    else:
        config = transformers.MixtralConfig(**common)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _randomise(model, name="default"):
    """B = 0 at init would hide the packing of A and B: give every adapter tensor values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


IDS = torch.tensor([[5, 17, 99, 3, 64, 12, 7, 120]])


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_equal_to_peft_both_ways_with_gradients(kind, tmp_path):
    base = _tiny_moe(kind)
    mine = _randomise(peftlab.adapt(copy.deepcopy(base), "lora", r=2, alpha=4, target_parameters=EXPERTS))
    count = peftlab.count_parameters(mine).trainable
    # per layer and parameter, r·E (d_in + d_out): gate_up 32 -> 32, down 16 -> 32, over 4 experts
    assert count == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (16 + 32))
    peftlab.save_adapter(mine, tmp_path / "mine")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine", is_trainable=True)
    out_mine, out_theirs = mine(IDS, labels=IDS), theirs(IDS, labels=IDS)
    torch.testing.assert_close(out_mine.logits, out_theirs.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(out_mine.logits, base(IDS).logits, atol=1e-3)  # the adapter does something
    out_mine.loss.backward()
    out_theirs.loss.backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(grads_theirs) == 8  # 2 layers x 2 parameters x (A, B)
    from peftlab.production.hf_peft import reference_to_peft_names

    for ours, name in reference_to_peft_names(mine).items():
        torch.testing.assert_close(mine.get_parameter(ours).grad, grads_theirs[name], rtol=1e-4, atol=1e-6)

    theirs.save_pretrained(tmp_path / "theirs")
    again = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, out_theirs.logits, rtol=0, atol=1e-5)


def test_merge_unmerge_and_disable(tmp_path):
    base = _tiny_moe("mixtral")
    model = _randomise(peftlab.adapt(copy.deepcopy(base), "lora", r=2, target_parameters=EXPERTS))
    experts = model.model.layers[0].mlp.experts.base_layer
    before = experts.gate_up_proj.detach().clone()
    with torch.no_grad():
        peftlab.set_disabled(model)
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)  # the base, exactly
        peftlab.set_disabled(model, False)
        adapted = model(IDS).logits
        peftlab.merge(model)
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=1e-5)
        assert not torch.equal(experts.gate_up_proj, before)
        peftlab.unmerge(model)
        torch.testing.assert_close(experts.gate_up_proj, before, rtol=0, atol=1e-6)  # P + ΔP - ΔP, rounded
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=1e-5)


def test_only_parameters_are_targeted_when_no_modules_are_named():
    model = peftlab.adapt(_tiny_moe("mixtral"), "lora", target_parameters=["layers.1.mlp.experts.down_proj"])
    adapted = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapted and all(n.startswith("model.layers.1.mlp.experts.") for n in adapted)


@pytest.mark.parametrize("kwargs, words", [
    ({"target_parameters": ["mlp.experts.nothing"]}, "matched no parameter"),
    ({"target_parameters": ["input_layernorm.weight"]}, "Expected a 2-D"),
    ({"target_parameters": list(EXPERTS), "dropout": 0.1}, "takes no dropout"),
])
def test_bad_parameter_targets_are_clear_errors(kwargs, words):
    model = _tiny_moe("mixtral")
    with pytest.raises(ConfigError, match=words):
        peftlab.adapt(model, "lora", **kwargs)
    assert not any(p.requires_grad is False for p in model.parameters())  # left as it was


def test_a_second_adapter_on_the_same_parameters_runs_alone_when_active():
    """Adding a second adapter finds the parameters under the first one's wrapper; switching to it
    gives what a model with that adapter alone gives."""
    from peftlab import compose

    base = _tiny_moe("mixtral")
    both = peftlab.adapt(copy.deepcopy(base), "lora", r=2, alpha=4, target_parameters=EXPERTS, adapter_name="en")
    compose.add_adapter(both, "de", "lora", r=2, alpha=4, target_parameters=EXPERTS)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # both adapters' tensors (only the active one's are trainable)
        for name, param in both.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    alone = peftlab.adapt(copy.deepcopy(base), "lora", r=2, alpha=4, target_parameters=EXPERTS, adapter_name="de")
    with torch.no_grad():
        for name, param in alone.named_parameters():
            if ".adapters.de." in name:
                param.copy_(both.get_parameter(name))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    compose.set_adapter(both, "de")
    torch.testing.assert_close(both(input_ids=ids).logits, alone(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(both(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
