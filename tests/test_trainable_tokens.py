"""LoRA with trainable tokens (peft's ``trainable_token_indices``): a few embedding rows train
with the adapter, equal to peft 0.21.2 both ways, on a model whose LM head is tied to them."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.errors import ConfigError

peft = pytest.importorskip("peft")

IDS = [3, 17, 256]  # three token ids of tiny-llama's 49,152


def _trained(model, steps: int = 2):
    """A few optimiser steps on random ids, so T moves away from the rows it copied."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.5)
    ids = torch.tensor([[3, 17, 256, 5, 3, 17, 9, 256]])
    for _ in range(steps):
        optimiser.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimiser.step()
    return model


def test_only_the_chosen_rows_train_and_the_tied_head_reads_them(tiny_llama):
    model, _ = tiny_llama
    embedding_before = model.model.embed_tokens.weight.detach().clone()
    lora_only = peftlab.count_parameters(peftlab.adapt(copy.deepcopy(model), "lora")).trainable
    peftlab.adapt(model, "lora", trainable_token_indices=IDS)
    assert peftlab.count_parameters(model).trainable == lora_only + len(IDS) * 64  # k · d more
    _trained(model)
    layer = model.model.embed_tokens
    rows = layer.adapters["default"].trainable_tokens_delta
    assert not torch.equal(rows, embedding_before[IDS])  # T trained
    assert torch.equal(layer.base_layer.weight, embedding_before)  # E itself is frozen
    adapted = layer.adapters["default"].adapted_weight(layer.base_layer)
    others = [i for i in range(len(adapted)) if i not in IDS]
    assert torch.equal(adapted[others], embedding_before[others]) and torch.equal(adapted[IDS], rows)
    # the tied LM head multiplies by the same E': logits = h E'^T
    hidden = torch.randn(1, 2, 64)
    torch.testing.assert_close(model.lm_head(hidden), hidden @ adapted.T, rtol=0, atol=1e-6)


def test_equal_to_peft_both_ways(tiny_llama, tmp_path):
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    mine = _trained(peftlab.adapt(model, "lora", trainable_token_indices=IDS))
    ids = torch.tensor([[1, 3, 17, 256, 40, 256]])
    with torch.no_grad():
        want = mine(ids).logits
    peftlab.save_adapter(mine, tmp_path / "mine")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    again = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=1e-5)
        peftlab.set_disabled(again)
        torch.testing.assert_close(again(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_merge_on_an_untied_embedding_and_refusal_on_a_tied_one(tiny_llama):
    model, _ = tiny_llama
    ids = torch.tensor([[3, 17, 256, 9]])
    tied = _trained(peftlab.adapt(copy.deepcopy(model), "lora", trainable_token_indices=IDS))
    with pytest.raises(ConfigError, match="tied"):
        peftlab.merge(tied)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    untied = _trained(peftlab.adapt(model, "lora", trainable_token_indices=IDS))
    with torch.no_grad():
        before = untied(ids).logits
        peftlab.merge(untied)
        torch.testing.assert_close(untied(ids).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens, words", [
    ([3, 3], "distinct token ids in \\[0, 49152\\)"),
    ([49152], "distinct token ids in \\[0, 49152\\)"),
    ({"q_proj": [1]}, "matches 2 modules"),
    ({"model.layers.0.self_attn.q_proj": [1]}, "Expected an nn.Embedding"),
])
def test_bad_token_indices_are_clear_errors(tiny_llama, tokens, words):
    model, _ = tiny_llama
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match=words):
        peftlab.adapt(model, "lora", trainable_token_indices=tokens)
    assert not peftlab.api.records(model)  # nothing of the failed call is left
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_an_embedding_that_is_also_a_target_is_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="both a target of the method and in trainable_token_indices"):
        peftlab.adapt(model, "lora", targets=("embed_tokens", "q_proj"), trainable_token_indices=IDS)


@pytest.mark.parametrize("method, extra", [("lora", {}), ("dora", {}), ("lora", {"trainable_token_indices": [3, 9]})])
def test_a_scaled_embedding_scales_the_update_as_peft(method, extra, tmp_path):
    """Gemma's embedding multiplies its rows by √d_model in its forward: the adapter's lookup
    must be scaled the same (peft does), or the update is √d times too small."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    base = transformers.Gemma3ForCausalLM(config).eval()
    assert float(base.model.embed_tokens.embed_scale) != 1.0
    targets = ("q_proj",) if extra else ("embed_tokens", "q_proj")
    mine = peftlab.adapt(copy.deepcopy(base), method, targets=targets, **extra)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mine.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    ids = torch.tensor([[1, 3, 9, 20, 9]])
    peftlab.save_adapter(mine, tmp_path / "mine")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine").eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(mine(ids).logits, base(ids).logits, atol=1e-3)
