"""X-LoRA (peftlab/methods/xlora.py) against peft's XLoraModel with the same experts and router:
same logits and same router gradients (fp32, atol 1e-5) on the tiny Llama, across the options."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import compose
from peftlab.errors import ConfigError
from peftlab.methods import xlora

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _experts(model, names=("math", "code", "poem"), targets=("q_proj", "v_proj", "up_proj")):
    """Trained-looking LoRA experts: random B (a fresh LoRA's B is 0), different targets per expert."""
    gen = torch.Generator().manual_seed(7)
    for i, name in enumerate(names):
        peftlab.adapt(model, "lora", adapter_name=name, r=2 + i, alpha=4.0, targets=targets[: 2 + (i % 2)])
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".adapters.{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return names


def _pair(tiny_llama, tmp_path, **options):
    """(reference X-LoRA model, peft X-LoRA model) with the same experts and router weights."""
    from peftlab.production.hf_peft import import_peft

    peft = import_peft()
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    names = _experts(model)
    peftlab.adapt(model, "xlora", experts=names, **options)
    torch.manual_seed(0)
    with torch.no_grad():  # a router that prefers different experts for different tokens
        for param in xlora.router_of(model).parameters():
            param.normal_(0, 0.5)
    base.config.use_cache = False  # peft refuses X-LoRA with a cache
    theirs = peft.get_peft_model(base, xlora.to_peft_config(model, tmp_path))
    xlora.copy_router_to_peft(model, theirs)
    return model, theirs


def _compare(model, theirs, batch=2, seq=7):
    ids = torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    model.train(), theirs.train()
    ours_out = model(input_ids=ids, labels=labels)
    their_out = theirs(input_ids=ids, labels=labels)
    ours_out.loss.backward()
    their_out.loss.backward()
    diff = (ours_out.logits - their_out.logits).abs().max().item()
    torch.testing.assert_close(ours_out.logits, their_out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(xlora.last_scalings(model), theirs.base_model.internal_xlora_scalings,
                               atol=ATOL, rtol=0)
    grads = [(m.grad, t.grad) for m, t in zip(xlora.router_of(model).parameters(),
                                              theirs.base_model.internal_xlora_classifier.parameters())]
    assert all(m is not None and m.abs().sum() > 0 for m, _ in grads)
    for mine, other in grads:
        torch.testing.assert_close(mine, other, atol=ATOL, rtol=0)
    gdiff = max((m - t).abs().max().item() for m, t in grads)
    return diff, gdiff


OPTIONS = [
    {},
    {"layerwise_scalings": True, "top_k_lora": 2, "enable_softmax_topk": True},
    {"xlora_depth": 3, "xlora_size": 16, "xlora_dropout_p": 0.0, "softmax_temperature": 0.5},
    {"enable_softmax": False, "scaling_pass_value": 0.3, "global_scaling_weight": 0.7, "top_k_lora": 1},
]


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "layerwise-topk-softmax", "depth3", "no-softmax-pass"])
def test_matches_peft_outputs_and_router_gradients(tiny_llama, tmp_path, options):
    model, theirs = _pair(tiny_llama, tmp_path, **options)
    diff, gdiff = _compare(model, theirs)
    print(options, "max |logit diff|", diff, "max |router grad diff|", gdiff)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("xlora_router.adapters.default.") for n in trainable)  # experts frozen


def test_default_makes_fresh_trainable_experts(tiny_llama):
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    peftlab.adapt(model, "xlora")
    assert compose.list_adapters(model) == ["default_expert0", "default_expert1", "default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.default_expert1.lora_B" in n for n in trainable)
    assert any(n.startswith("xlora_router.") for n in trainable)
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)  # experts start at 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert xlora.last_scalings(model).shape == (2, 5, 4, 2)  # 2 layers x (q, v), 2 experts
    with compose.disabled(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="cannot be merged"):
        peftlab.merge(model)
    with pytest.raises(ConfigError, match="expert of another adapter"):
        compose.delete_adapter(model, "default_expert0")
    compose.delete_adapter(model, "default")
    assert not hasattr(model.xlora_router.adapters, "default") and "default" not in model.xlora_router.adapters


def test_bad_experts_are_refused(tiny_llama):
    model, _ = tiny_llama
    peftlab.adapt(model, "ia3")
    with pytest.raises(ConfigError, match=r"not LoRA adapters.*default \(ia3\)"):
        peftlab.adapt(model, "xlora", adapter_name="mix", experts=("default", "nope"))
