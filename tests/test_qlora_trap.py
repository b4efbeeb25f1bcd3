"""The AVX512-BF16 repack trap of bitsandbytes on CPU (see peftlab.models.disable_cpu_weight_repack).

On CPUs with AVX512-BF16, an eval-mode no-grad forward of a bitsandbytes ``Linear4bit`` (as
``generate()`` does) repacks its weights and silently removes autograd support: afterwards no
gradient reaches the LoRA layers and training stops learning. peftlab's NF4 loading switches the
repack off; these tests prove train -> generate -> train still learns, and (on CPUs that have the
instruction set) that the same sequence fails without the workaround, so the first test means
something.
"""

from __future__ import annotations

import pytest
import torch

import peftlab

bnb = pytest.importorskip("bitsandbytes")


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def _rows(tokenizer):
    from datasets import Dataset

    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tokenizer(text)["input_ids"][:24]
    return Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4)


def _generate(model, tokenizer) -> None:
    model.eval()
    prompt = tokenizer("The quick brown", return_tensors="pt")
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=3, do_sample=False)


def _input_grad_is_right(layer) -> bool:
    """Does the 4-bit base layer still pass the gradient dL/dx = dy W on to its input?"""
    import bitsandbytes.functional as F

    layer.train()
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    dy = torch.randn(2, 3, layer.out_features)
    layer(x).backward(dy)
    if x.grad is None:
        return False
    w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return torch.allclose(x.grad, dy @ w, atol=1e-4)


def test_train_generate_train_still_learns_on_nf4():
    model, tokenizer = peftlab.load_model("tiny-llama", quantization="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    model = peftlab.adapt(model, "lora", r=4, targets="all-linear")
    first = peftlab.train(model, _rows(tokenizer), steps=3, lr=1e-2, batch_size=4, progress=False)
    _generate(model, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    second = peftlab.train(model, _rows(tokenizer), steps=3, lr=1e-2, batch_size=4, progress=False)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert second.losses[-1] < first.losses[0]
    assert all(_input_grad_is_right(m) for m in layers)  # the base still backpropagates exactly


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the trap only exists on CPUs with AVX512-BF16")
def test_without_the_workaround_generation_breaks_backprop():
    model, tokenizer = peftlab.load_model("tiny-llama", quantization="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # undo peftlab's fix
    assert all(_input_grad_is_right(m) for m in layers)  # fine before any generation
    _generate(model, tokenizer)
    assert not any(_input_grad_is_right(m) for m in layers)  # repacked: gradients silently lost
