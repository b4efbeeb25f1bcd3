"""Several adapters on one model (peftlab/compose.py): switching, deleting, mixed batches and
weighted merging, each compared with peft 0.21.2 given the same adapter weights."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import compose
from peftlab.errors import ConfigError, UnknownNameError
from peftlab.inject import AdaptedLayer

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_adapter(model, adapter_name, seed):
    """Give an adapter non-zero B (a fresh LoRA is the identity), so adapters really differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".adapters.{adapter_name}." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _two_adapters(tiny_llama, r_b=4):
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    peftlab.adapt(model, "lora", r=4, alpha=8.0, targets=TARGETS, adapter_name="en")
    compose.add_adapter(model, "de", "lora", r=r_b, alpha=4.0, targets=("q_proj", "v_proj"))
    randomise_adapter(model, "en", 1)
    randomise_adapter(model, "de", 2)
    return model, base


def _peft_copy(model, base, names=("en", "de")):
    from peftlab.api import records
    from peftlab.methods import get_method
    from peftlab.production.hf_peft import copy_reference_to_peft, import_peft, to_peft_config

    peft = import_peft()
    recs = records(model)
    configs = {n: to_peft_config(get_method("lora"), recs[n].config, base) for n in names}  # before wrapping
    first, *rest = names
    pm = peft.get_peft_model(base, configs[first], adapter_name=first)
    for name in rest:
        pm.add_adapter(name, configs[name])
    for name in names:
        copy_reference_to_peft(model, pm, name)
    return pm


def test_add_set_disable_delete(tiny_llama):
    model, base = _two_adapters(tiny_llama)
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    assert compose.active_adapter(model) == "en" and compose.list_adapters(model) == ["en", "de"]
    out_a = model(input_ids=ids).logits
    compose.set_adapter(model, "de")
    out_b = model(input_ids=ids).logits
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.de." in n for n in trainable)
    with compose.disabled(model):
        out_off = model(input_ids=ids).logits
    torch.testing.assert_close(out_off, base(input_ids=ids).logits)
    assert (out_a - out_b).abs().max() > 1e-3 and (out_b - out_off).abs().max() > 1e-3
    with pytest.raises(UnknownNameError, match="Expected one of: en, de"):
        compose.set_adapter(model, "c")

    compose.delete_adapter(model, "de")
    assert compose.list_adapters(model) == ["en"] and compose.active_adapter(model) == "en"
    assert not any(".adapters.de." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, out_a)
    compose.delete_adapter(model, "en")
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())  # unwrapped again
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(model(input_ids=ids).logits, out_off)
    with pytest.raises(UnknownNameError, match="none"):
        compose.delete_adapter(model, "en")


def test_mixed_batch_matches_peft(tiny_llama):
    model, base = _two_adapters(tiny_llama)
    pm = _peft_copy(model, base).eval()  # peft refuses adapter_names in training mode
    ids = torch.randint(0, 200, (4, 6), generator=torch.Generator().manual_seed(0))
    names = ["en", "__base__", "de", "en"]
    ours = model(input_ids=ids, adapter_names=names).logits
    theirs = pm(input_ids=ids, adapter_names=names).logits
    print("mixed batch max diff", (ours - theirs).abs().max().item())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # each row equals the same example run with that adapter alone, and the layers forget the names
    compose.set_adapter(model, "de")
    torch.testing.assert_close(ours[2], model(input_ids=ids[2:3]).logits[0], atol=1e-5, rtol=0)
    assert all(m.example_adapters is None for m in model.modules() if isinstance(m, AdaptedLayer))
    with pytest.raises(ConfigError, match="2 entries but the batch has 4"):
        model(input_ids=ids, adapter_names=["en", "de"])
    with pytest.raises(UnknownNameError, match="Did you mean 'en'"):
        model(input_ids=ids, adapter_names=["enn"] * 4)
    assert all(m.example_adapters is None for m in model.modules() if isinstance(m, AdaptedLayer))


CASES = [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
         ("ties", {"density": 0.5}), ("ties_svd", {"density": 0.6, "majority_sign_method": "frequency"}),
         ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.7}),
         ("dare_linear_svd", {"density": 0.5}), ("magnitude_prune", {"density": 0.4})]


@pytest.mark.parametrize("kind,options", CASES, ids=[f"{k}{'+' if o.get('svd_rank') else ''}" for k, o in CASES])
def test_weighted_adapter_matches_peft(tiny_llama, kind, options, monkeypatch):
    model, base = _two_adapters(tiny_llama)
    pm = _peft_copy(model, base)
    weights = [0.7, -0.4]
    # DARE's masks come from torch.bernoulli on the global generator. Creating the new adapter
    # draws from it too, differently in peft (its nn.Linear init runs before its LoRA init), so
    # the masks get a generator of their own, reseeded for each library: equal masks then prove
    # that both draw them in the same order (layers in model order; A's, then B's).
    bernoulli, masks = torch.bernoulli, torch.Generator()
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: bernoulli(p, generator=masks))
    masks.manual_seed(123)
    compose.add_weighted_adapter(model, ["en", "de"], weights, "mix", kind, **options)
    masks.manual_seed(123)
    pm.add_weighted_adapter(["en", "de"], weights, "mix", combination_type=kind, **options)
    assert compose.active_adapter(model) == "en"  # the new adapter does not become active
    worst = 0.0
    for name, layer in peftlab.inject.adapted_layers(model).items():
        theirs = pm.base_model.model.get_submodule(name)
        if "mix" not in layer.adapters:
            assert "mix" not in theirs.lora_A
            continue
        torch.testing.assert_close(layer.delta_weight("mix"), theirs.get_delta_weight("mix"), atol=1e-5, rtol=0)
        worst = max(worst, (layer.delta_weight("mix") - theirs.get_delta_weight("mix")).abs().max().item())
    compose.set_adapter(model, "mix")
    pm.set_adapter("mix")
    ids = torch.randint(0, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=0)
    print(kind, "max |ΔW diff|", worst)


def test_cat_is_exact_weighted_sum(tiny_llama):
    model, _ = _two_adapters(tiny_llama)
    compose.add_weighted_adapter(model, ["en", "de"], [0.5, 2.0], "mix", "cat")
    layer = model.model.layers[0].self_attn.q_proj
    expected = 0.5 * layer.delta_weight("en") + 2.0 * layer.delta_weight("de")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-6, rtol=0)
    down = model.model.layers[0].mlp.down_proj  # only adapter a is there
    torch.testing.assert_close(down.delta_weight("mix"), 0.5 * down.delta_weight("en"), atol=1e-6, rtol=0)


def test_weighted_adapter_errors(tiny_llama):
    model, _ = _two_adapters(tiny_llama, r_b=2)
    with pytest.raises(ConfigError, match="ranks must be equal"):
        compose.add_weighted_adapter(model, ["en", "de"], [1, 1], "mix", "linear")
    with pytest.raises(ConfigError, match="needs density"):
        compose.add_weighted_adapter(model, ["en", "de"], [1, 1], "mix", "ties_svd")
    with pytest.raises(ConfigError, match="Did you mean 'ties'"):
        compose.add_weighted_adapter(model, ["en", "de"], [1, 1], "mix", "tie")
    with pytest.raises(UnknownNameError, match="Expected one of: en, de"):
        compose.add_weighted_adapter(model, ["en", "z"], [1, 1], "mix", "cat")
    assert compose.list_adapters(model) == ["en", "de"]


def test_mixed_batch_on_fused_backend(tiny_llama):
    """The fused kernels step aside for a mixed batch: rows match the reference layers."""
    from peftlab.production import fused

    model, _ = _two_adapters(tiny_llama)
    ids = torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["de", "__base__", "en"]
    reference = model(input_ids=ids, adapter_names=names).logits
    fused.fuse(model)
    torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits, reference, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# weighted merging beyond linear layers: convolutions, nn.MultiheadAttention, lora_bias
# --------------------------------------------------------------------------------------------
class Layers(torch.nn.Module):
    """One layer of each kind a weighted merge combines, for toy adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.lin = torch.nn.Linear(6, 6)
        self.mha = torch.nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _toy_pair(targets, r_b=2, **hp):
    torch.manual_seed(0)
    base = Layers()
    model = peftlab.adapt(copy.deepcopy(base), "lora", r=2, alpha=4.0, targets=targets, adapter_name="en", **hp)
    compose.add_adapter(model, "de", "lora", r=r_b, alpha=3.0, targets=targets, **hp)
    randomise_adapter(model, "en", 1)
    randomise_adapter(model, "de", 2)
    return model, base


def _update(model, name, adapter):
    """What ``adapter`` adds to layer ``name``'s output (conv, linear) or weights (attention)."""
    layer = model.get_submodule(name)
    adapter = layer.adapters[adapter]
    if name == "mha":
        base = layer.base_layer
        new = adapter.updated_weights(base)
        return torch.cat([new["in_proj_weight"] - base.in_proj_weight, (new["out_proj.weight"] - base.out_proj.weight)])
    x = torch.randn((2, 6) if name == "lin" else (2, 4, 5, 5), generator=torch.Generator().manual_seed(7))
    base_out = layer.base_layer(x)
    return adapter(x, layer.base_layer, base_out) - base_out


@pytest.mark.parametrize("name", ["conv", "grouped", "lin", "mha"])
def test_cat_is_the_exact_weighted_sum_on_every_layer_kind(name):
    """cat on a convolution (grouped too: A's rows are interleaved per group of B), on an
    nn.MultiheadAttention (its in_proj and out_proj pairs each) and on a linear layer with lora_bias
    (the bias combines as Σ w_i s_i b_i): exactly 0.5 ΔW_en - 1.5 ΔW_de."""
    model, _ = _toy_pair((name,), r_b=4 if name != "mha" else 2, lora_bias=name == "lin")
    compose.add_weighted_adapter(model, ["en", "de"], [0.5, -1.5], "mix", "cat")
    expected = 0.5 * _update(model, name, "en") - 1.5 * _update(model, name, "de")
    torch.testing.assert_close(_update(model, name, "mix"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["conv", "lin", "mha"])
def test_svd_at_full_rank_is_the_exact_weighted_sum(name):
    model, _ = _toy_pair((name,), lora_bias=name == "lin")
    compose.add_weighted_adapter(model, ["en", "de"], [0.7, 0.3], "mix", "svd", svd_rank=4)
    expected = 0.7 * _update(model, name, "en") + 0.3 * _update(model, name, "de")
    torch.testing.assert_close(_update(model, name, "mix"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("targets", "kind"), [(("conv",), "linear"), (("conv",), "cat"), (("grouped",), "linear"),
                                               (("mha",), "linear"), (("mha",), "cat")])
def test_weighted_merge_on_conv_and_attention_matches_peft(targets, kind):
    """Where peft 0.21.2 computes these (its svd types fail on convolutions and attention, its cat
    on a grouped convolution mixes the groups' rows), its combined adapter is peftlab's."""
    model, base = _toy_pair(targets)
    pm = _peft_copy(model, base)
    compose.add_weighted_adapter(model, ["en", "de"], [0.6, 0.9], "mix", kind)
    pm.add_weighted_adapter(["en", "de"], [0.6, 0.9], "mix", combination_type=kind)
    compose.set_adapter(model, "mix")
    pm.set_adapter("mix")
    name = targets[0]
    if name == "mha":
        x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
        ours, theirs = model.mha(x, x, x)[0], pm.base_model.model.mha(x, x, x)[0]
    else:
        x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
        ours, theirs = model.get_submodule(name)(x), pm.base_model.model.get_submodule(name)(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_weighted_merge_refuses_what_it_cannot_combine(tiny_llama):
    model, _ = _toy_pair(("grouped",))
    with pytest.raises(ConfigError, match=r"'grouped' is a convolution with groups=2.*block-diagonal.*try 'cat'"):
        compose.add_weighted_adapter(model, ["en", "de"], [1, 1], "mix", "svd")
    assert compose.list_adapters(model) == ["en", "de"]
    llama, _ = tiny_llama
    peftlab.adapt(llama, "lora", r=2, targets=("q_proj",), adapter_name="en")
    compose.add_adapter(llama, "tok", "lora", r=2, targets=("q_proj",), trainable_token_indices=(1, 2))
    with pytest.raises(ConfigError, match=r"'tok' trains embedding rows.*would lose them.*Expected"):
        compose.add_weighted_adapter(llama, ["en", "tok"], [1, 1], "mix", "cat")
    assert compose.list_adapters(llama) == ["en", "tok"]


def test_weighted_merge_refuses_expert_parameters():
    from tests.test_parameter_lora import EXPERTS, _tiny_moe

    model = peftlab.adapt(_tiny_moe("mixtral"), "lora", r=2, target_parameters=EXPERTS, adapter_name="en")
    compose.add_adapter(model, "de", "lora", r=2, target_parameters=EXPERTS)
    with pytest.raises(ConfigError, match=r"'en' adapts parameters.*peft refuses it too.*try merging"):
        compose.add_weighted_adapter(model, ["en", "de"], [1, 1], "mix", "cat")


def test_the_forward_never_changes_weights(tiny_llama):
    """Disabling unmerges in set_disabled, the explicit call; a layer disabled by hand while merged
    refuses to run rather than unmerge itself in the forward."""
    model, base = _two_adapters(tiny_llama)
    ids = torch.randint(0, 200, (1, 5), generator=torch.Generator().manual_seed(0))
    peftlab.merge(model)
    layer = model.model.layers[0].self_attn.q_proj
    merged_weight = layer.base_layer.weight.clone()
    layer.disabled = True
    with pytest.raises(ConfigError, match=r"disabled but adapters \['en'\] are merged.*set_disabled"):
        model(input_ids=ids)
    assert torch.equal(layer.base_layer.weight, merged_weight)
    layer.disabled = False
    peftlab.set_disabled(model, True)
    assert not layer.merged
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)
