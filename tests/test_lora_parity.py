"""peftlab's reference LoRA and Hugging Face peft's LoRA are the same function.

With the same adapter weights (moved by the bridge in peftlab/production/hf_peft.py) both
backends give the same logits and the same gradients in fp32, train along the same loss curve,
and agree on parameter counts, merging, disabling, rsLoRA, alpha, dropout, embeddings and GPT-2's
Conv1D. lora_B is randomised first: at init B = 0, so a parity test there would prove little.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab.api import records
from peftlab.inject import AdaptedLayer, adapted_layers, layer_dims
from peftlab.production.hf_peft import copy_peft_to_reference, copy_reference_to_peft, reference_to_peft_names

ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter parameter (and trainable copy) random values, so the update is not 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _pair(base: nn.Module, **hp) -> tuple[nn.Module, nn.Module]:
    """(reference model, peft model) built from copies of ``base``, with identical, random
    adapter weights."""
    base = base.eval()
    ref = peftlab.adapt(copy.deepcopy(base), "lora", **hp)
    pm = peftlab.adapt(copy.deepcopy(base), "lora", backend="peft", **hp)
    _randomise(ref)
    copy_reference_to_peft(ref, pm)
    return ref, pm


def _batch(model: nn.Module, seed: int = 0, batch: int = 2, length: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 1000)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    if type(model).__name__.endswith("ForSequenceClassification"):
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def _grads(ref: nn.Module, pm: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    ref_params, peft_params = dict(ref.named_parameters()), dict(pm.named_parameters())
    return [
        (ours, ref_params[ours].grad, peft_params[theirs].grad)
        for ours, theirs in reference_to_peft_names(ref).items()
    ]


def _assert_parity(ref: nn.Module, pm: nn.Module, batch: dict) -> None:
    # both backends train exactly the same tensors
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == set(reference_to_peft_names(ref).values())
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == set(reference_to_peft_names(ref))

    out_ref, out_peft = ref(**batch), pm(**batch)
    torch.testing.assert_close(out_ref.logits, out_peft.logits, atol=ATOL, rtol=0)
    out_ref.loss.backward()
    out_peft.loss.backward()
    checked = 0
    for name, g_ref, g_peft in _grads(ref, pm):
        assert g_ref is not None and g_peft is not None, name
        torch.testing.assert_close(g_ref, g_peft, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        checked += g_ref.abs().sum() > 0
    assert checked > 0  # gradients are not all zero: the comparison means something


def _base_logits(base: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return base.eval()(input_ids=batch["input_ids"]).logits


def _untied_llama() -> nn.Module:
    """tiny-llama with its own LM head: merging LoRA into a *tied* embedding would change the
    head too (see test_merging_into_a_tied_embedding_keeps_outputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


# --------------------------------------------------------------------------------------------
# same weights -> same logits and gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default-targets", "all-linear"])
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bert"])
def test_same_weights_same_logits_and_gradients(which, targets, request):
    base = request.getfixturevalue(which)[0]
    hp = {"r": 4, "alpha": 8} | ({"targets": targets} if targets else {})
    ref, pm = _pair(base, **hp)
    batch = _batch(base)
    assert not torch.allclose(ref(**batch).logits, _base_logits(base, batch), atol=1e-3)  # not a no-op
    _assert_parity(ref, pm, batch)
    if which == "tiny_bert":  # the classifier head trains fully (modules_to_save) on both sides
        assert records(ref)["default"].config.modules_to_save == ("classifier",)
        assert any(".classifier.modules_to_save.default." in n for n, p in pm.named_parameters() if p.requires_grad)
        assert ref.classifier.copies["default"].weight.grad is not None


def test_bridge_back_from_peft(tiny_llama):
    """copy_peft_to_reference: weights that peft holds, run by the reference, same logits."""
    base = tiny_llama[0]
    ref, pm = _pair(base, r=4, targets="all-linear")
    _randomise(pm, seed=1)  # peft now differs from ref ...
    copy_peft_to_reference(pm, ref)  # ... until the bridge copies it back
    batch = _batch(base)
    torch.testing.assert_close(ref(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_smollm2_same_logits_and_gradients(smollm2):
    base = smollm2[0]
    ref, pm = _pair(base, r=8, alpha=16, targets="all-linear")
    _assert_parity(ref, pm, _batch(base, batch=1, length=8))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _train(model: nn.Module, params: list[nn.Parameter], batches: list[dict]) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_same_seeded_training_same_loss_curve(tiny_llama):
    base = tiny_llama[0]
    ref, pm = _pair(base, r=4, alpha=8, targets="all-linear")
    names = reference_to_peft_names(ref)
    batches = [_batch(base, seed=s) for s in range(5)]
    ref_params, peft_params = dict(ref.named_parameters()), dict(pm.named_parameters())
    losses_ref = _train(ref, [ref_params[n] for n in names], batches)
    losses_peft = _train(pm, [peft_params[n] for n in names.values()], batches)
    assert losses_ref == pytest.approx(losses_peft, abs=ATOL, rel=0)
    assert losses_ref[-1] < losses_ref[0]  # it trained, so the curves are worth comparing
    for ours, theirs in names.items():  # and they end at the same weights
        torch.testing.assert_close(ref_params[ours], peft_params[theirs], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# merge, disable, parameter counts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama-all-linear", "llama-embedding", "gpt2-conv1d"])
def test_merged_equals_unmerged_and_disabled_equals_base(case, tiny_llama):
    if case == "gpt2-conv1d":
        base, hp = _tiny_gpt2(), {"targets": "all-linear"}
    elif case == "llama-embedding":
        base, hp = _untied_llama(), {"targets": ("embed_tokens", "q_proj")}
    else:
        base, hp = tiny_llama[0], {"targets": "all-linear"}
    ref, pm = _pair(base, r=4, alpha=8, **hp)
    batch = _batch(base)
    with torch.no_grad():
        unmerged = ref(**batch).logits
        peftlab.merge(ref)
        torch.testing.assert_close(ref(**batch).logits, unmerged, atol=ATOL, rtol=0)
        # the merged base weights are the ones peft computes when it merges
        peftlab.merge(pm)
        peft_params = dict(pm.named_parameters())
        for name, layer in adapted_layers(ref).items():
            torch.testing.assert_close(
                layer.base_layer.weight, peft_params[f"base_model.model.{name}.base_layer.weight"], atol=ATOL, rtol=0
            )
        peftlab.unmerge(ref)
        peftlab.unmerge(pm)
        torch.testing.assert_close(ref(**batch).logits, unmerged, atol=ATOL, rtol=0)

        expected_base = _base_logits(base, batch)
        assert not torch.allclose(unmerged, expected_base, atol=1e-3)
        peftlab.set_disabled(ref, True)
        peftlab.set_disabled(pm, True)
        torch.testing.assert_close(ref(**batch).logits, expected_base, atol=ATOL, rtol=0)
        torch.testing.assert_close(pm(**batch).logits, expected_base, atol=ATOL, rtol=0)
        peftlab.set_disabled(ref, False)
        torch.testing.assert_close(ref(**batch).logits, unmerged, atol=ATOL, rtol=0)


def test_merging_into_a_tied_embedding_is_refused_and_keeps_outputs(tiny_llama):
    base = tiny_llama[0]
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    ref = peftlab.adapt(copy.deepcopy(base), "lora", r=4, targets=("embed_tokens",))
    _randomise(ref)
    batch = _batch(base)
    with torch.no_grad():
        unmerged = ref(**batch).logits
        with pytest.raises(peftlab.PeftlabError, match="tied"):
            peftlab.merge(ref)  # merging would silently change the tied output head too
        torch.testing.assert_close(ref(**batch).logits, unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "which, hp",
    [
        ("tiny_llama", {"r": 4, "targets": "all-linear"}),
        ("tiny_llama", {"r": 8, "targets": ("embed_tokens", "v_proj")}),
        ("tiny_bert", {"r": 2}),  # default targets + the classifier as modules_to_save
    ],
    ids=["llama-all-linear", "llama-embedding", "bert-classifier"],
)
def test_trainable_count_is_closed_form_and_matches_peft(which, hp, request):
    base = request.getfixturevalue(which)[0]
    ref, pm = _pair(base, **hp)
    expected = 0
    for name in adapted_layers(ref):
        d_in, d_out = layer_dims(base.get_submodule(name))  # shapes of the untouched base layer
        expected += hp["r"] * (d_in + d_out)
    for name in records(ref)["default"].config.modules_to_save:
        expected += sum(p.numel() for p in base.get_submodule(name).parameters())
    assert len(adapted_layers(ref)) > 0
    assert peftlab.count_parameters(ref).trainable == expected
    assert pm.get_nb_trainable_parameters()[0] == expected
    assert peftlab.count_parameters(pm).trainable == expected
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == expected


# --------------------------------------------------------------------------------------------
# options: rsLoRA, alpha, dropout; layer types: embedding, Conv1D
# --------------------------------------------------------------------------------------------
def _one_layer_update(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution at the first adapted layer: layer(x) - base_layer(x)."""
    layer: AdaptedLayer = next(iter(adapted_layers(model).values()))
    with torch.no_grad():
        return layer(x) - layer.base_layer(x)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora alpha/sqrt(r)"])
def test_alpha_and_rslora_scaling(tiny_llama, use_rslora):
    base = tiny_llama[0]
    ref, pm = _pair(base, r=4, alpha=12, use_rslora=use_rslora, targets=("q_proj",))
    _assert_parity(ref, pm, _batch(base))  # same scaling rule as peft

    layer = next(iter(adapted_layers(ref).values()))
    adapter = layer.adapters["default"]
    scaling = 12 / (math.sqrt(4) if use_rslora else 4)
    assert adapter.scaling == pytest.approx(scaling)
    x = torch.randn(3, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = scaling * (x @ adapter.lora_A.T @ adapter.lora_B.T)  # (alpha/r) B A x, written out
    torch.testing.assert_close(_one_layer_update(ref, x), expected, atol=ATOL, rtol=1e-5)


def test_doubling_alpha_doubles_the_update(tiny_llama):
    base = tiny_llama[0]
    x = torch.randn(3, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    updates = []
    for alpha in (4.0, 8.0):
        ref = peftlab.adapt(copy.deepcopy(base), "lora", r=4, alpha=alpha, targets=("q_proj",))
        _randomise(ref)  # same seed: same A and B for both alphas
        updates.append(_one_layer_update(ref, x))
    torch.testing.assert_close(updates[1], 2 * updates[0], atol=ATOL, rtol=1e-5)


def test_dropout_only_in_train_mode_and_same_masks_as_peft(tiny_llama):
    base = tiny_llama[0]
    ref, pm = _pair(base, r=4, dropout=0.5, targets=("q_proj", "v_proj"))
    batch = {"input_ids": _batch(base)["input_ids"]}
    with torch.no_grad():
        ref.eval()
        pm.eval()
        eval_out = ref(**batch).logits
        torch.testing.assert_close(ref(**batch).logits, eval_out, atol=0, rtol=0)  # deterministic
        torch.testing.assert_close(pm(**batch).logits, eval_out, atol=ATOL, rtol=0)

        ref.train()
        pm.train()
        torch.manual_seed(1)
        train_ref = ref(**batch).logits
        assert not torch.allclose(train_ref, eval_out, atol=1e-4)  # dropout acts in train mode
        assert not torch.allclose(ref(**batch).logits, train_ref, atol=1e-4)  # fresh mask per call
        torch.manual_seed(1)  # same RNG stream: peft draws the same masks, in the same order
        torch.testing.assert_close(pm(**batch).logits, train_ref, atol=ATOL, rtol=0)

        peftlab.set_disabled(ref, True)  # the base path never drops, even in train mode
        torch.testing.assert_close(ref(**batch).logits, _base_logits(copy.deepcopy(base), batch), atol=ATOL, rtol=0)


def test_lora_on_embedding_matches_peft(tiny_llama):
    base = tiny_llama[0]
    ref, pm = _pair(base, r=4, alpha=8, targets=("embed_tokens",))
    layer = ref.get_submodule("model.embed_tokens")
    assert isinstance(layer, AdaptedLayer) and isinstance(layer.base_layer, nn.Embedding)
    assert "lora_embedding_A" in reference_to_peft_names(ref)["model.embed_tokens.adapters.default.lora_A"]
    _assert_parity(ref, pm, _batch(base))


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default-c_attn", "all-linear"])
def test_lora_on_gpt2_conv1d_matches_peft(targets):
    base = _tiny_gpt2()
    hp = {"r": 4, "alpha": 8} | ({"targets": targets} if targets else {})
    ref, pm = _pair(base, **hp)
    kinds = {type(layer.base_layer).__name__ for layer in adapted_layers(ref).values()}
    assert kinds == {"Conv1D"}
    _assert_parity(ref, pm, _batch(base))
