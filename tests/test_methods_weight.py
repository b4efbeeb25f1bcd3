"""DoRA, LoHa, LoKr and VeRA: the from-scratch references proven equal to Hugging Face peft.

Same weights -> same outputs and gradients (fp32, atol 1e-5) on tiny Llama and BERT models, in
eval and in training mode (dropout, rank dropout, module dropout drawing the same random numbers),
the weight bridge both ways, peft's on-disk tensor names, merge/unmerge, closed-form parameter
counts, the cheap spectra (factors, singular values), DoRA's detached norm and its ΔM/ΔD
statistics, and a 4-bit NF4 base.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers, dense_weight, layer_dims
from peftlab.methods import ATTENTION_QV, get_method
from peftlab.models import _tiny_bert, _tiny_llama
from peftlab.production import hf_peft

ATOL = 1e-5
NEW_METHODS = ("dora", "loha", "lokr", "vera")

# (model builder, method, hyperparameters): every method's defaults on both architectures, then
# the options that change shapes, scaling or the shared projection.
CASES = [(build, m, {}) for build in (_tiny_llama, _tiny_bert) for m in NEW_METHODS] + [
    (_tiny_llama, "dora", {"r": 4, "alpha": 16.0, "use_rslora": True, "init": "gaussian", "targets": "all-linear"}),
    (_tiny_llama, "loha", {"r": 2, "alpha": 4.0, "targets": ("q_proj", "down_proj")}),
    (_tiny_llama, "lokr", {"r": 2, "decompose_both": True, "targets": "all-linear"}),
    (_tiny_llama, "lokr", {"r": 1, "alpha": 2.0, "decompose_factor": 4, "targets": ("k_proj", "up_proj")}),
    (_tiny_llama, "vera", {"r": 16, "d_initial": 0.5, "projection_prng_key": 7, "save_projection": False,
                           "targets": "all-linear"}),
] + [(build, "adalora", {"init_r": 4, "target_r": 2, "total_step": 10}) for build in (_tiny_llama, _tiny_bert)]


def case_id(case) -> str:
    build, method, hp = case
    return f"{build.__name__.removeprefix('_')}-{method}-" + ("-".join(f"{k}={v}" for k, v in hp.items()) or "defaults")


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter parameter away from its init (zero factors included), seeded, by
    noise of about a tenth of its typical size."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".adapters." in name:
            param.add_(torch.randn(param.shape, generator=g) * 0.1 * (param.abs().mean() + 0.1))


def batch(model: nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (2, 7), generator=g)
    if model.config.model_type == "bert":  # sequence classification: one label per sequence
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "labels": ids}


def pair(build, method: str, hp: dict):
    """(reference model with random adapter weights, peft model given the same weights)."""
    ours = peftlab.adapt(build(), method, **hp)
    randomise(ours)
    theirs = peftlab.adapt(build(), method, backend="peft", **hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    return ours.eval(), theirs.eval()


def max_grad_diff(ours: nn.Module, theirs: nn.Module) -> float:
    their_params = dict(theirs.named_parameters())
    diffs = []
    for mine, name in hf_peft.reference_to_peft_names(ours).items():
        a, b = ours.get_parameter(mine).grad, their_params[name].grad
        assert (a is None) == (b is None), mine  # module dropout skips a layer in both or neither
        if a is not None:
            diffs.append((a - b).abs().max().item())
    return max(diffs)


# --------------------------------------------------------------------------------------------
# Parity with peft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_outputs_gradients_names_and_merge_as_peft(case):
    build, method, hp = case
    ours, theirs = pair(build, method, hp)
    inputs = batch(ours)

    a, b = ours(**inputs), theirs(**inputs)
    assert (a.logits - b.logits).abs().max().item() < ATOL
    a.loss.backward()
    b.loss.backward()
    assert max_grad_diff(ours, theirs) < ATOL

    # on-disk names and values are peft's, VeRA's shared projections included (or not)
    from peft.utils import get_peft_model_state_dict

    their_state, our_state = get_peft_model_state_dict(theirs), hf_peft.reference_state_dict(ours)
    assert set(our_state) == set(their_state)
    assert all(torch.equal(our_state[k], their_state[k]) for k in our_state)
    if method == "vera":
        assert ("base_model.vera_A" in our_state) == hp.get("save_projection", True)

    # the bridge the other way: new peft weights -> reference -> same outputs
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.mul_(1.5).add_(0.01)
    hf_peft.copy_peft_to_reference(theirs, ours)
    with torch.no_grad():
        before = ours(**inputs).logits
        assert (before - theirs(**inputs).logits).abs().max().item() < ATOL

        # merge: same merged weights as peft, same outputs, and unmerge gives W0 back
        originals = {n: l.base_layer.weight.clone() for n, l in adapted_layers(ours).items()}
        peftlab.merge(ours)
        theirs.merge_adapter()
        assert (ours(**inputs).logits - before).abs().max().item() < ATOL
        for name, layer in adapted_layers(ours).items():
            merged_theirs = theirs.base_model.model.get_submodule(name).get_base_layer().weight
            assert (layer.base_layer.weight - merged_theirs).abs().max().item() < ATOL
        peftlab.unmerge(ours)
        for name, layer in adapted_layers(ours).items():
            assert (layer.base_layer.weight - originals[name]).abs().max().item() < 1e-6


@pytest.mark.parametrize("method,hp", [("dora", {}), ("vera", {"r": 16}), ("vera", {"r": 16, "save_projection": False})])
def test_saved_adapter_loads_in_peft_and_back(tmp_path, method, hp):
    """peftlab.save_adapter writes peft's format: peft loads it, and so does peftlab (the two
    methods with special keys: DoRA's lora_magnitude_vector, VeRA's shared base_model.vera_A/B)."""
    import peft

    ours = peftlab.adapt(_tiny_llama(), method, **hp)
    randomise(ours)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_tiny_llama(), tmp_path).eval()
    back = peftlab.load_adapter(_tiny_llama(), tmp_path)
    assert peftlab.api.records(back)["default"].method == method
    inputs = batch(ours)
    with torch.no_grad():
        expected = ours(**inputs).logits
        assert (theirs(**inputs).logits - expected).abs().max().item() < ATOL
        assert (back(**inputs).logits - expected).abs().max().item() < ATOL


TRAINING_CASES = [
    ("dora", {"dropout": 0.3}),
    ("loha", {"rank_dropout": 0.3, "module_dropout": 0.3}),
    ("lokr", {"rank_dropout": 0.3, "module_dropout": 0.3}),  # LoKr: no rescaling by default
    ("vera", {"r": 16, "dropout": 0.3}),
]


@pytest.mark.parametrize("method,hp", TRAINING_CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_training_mode_dropouts_match_peft(method, hp):
    """Same seed -> the same dropout masks, rows dropped and modules skipped as peft, so dropout
    sits in the same place (BERT's own dropout runs too)."""
    ours, theirs = pair(_tiny_bert, method, hp)
    ours.train()
    theirs.train()
    inputs = batch(ours)
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(123)
        out = model(**inputs)
        out.loss.backward()
        losses.append(out.loss)
    assert abs(losses[0].item() - losses[1].item()) < ATOL
    assert max_grad_diff(ours, theirs) < ATOL
    ours.eval()  # and the regularisers are off in eval mode: output is deterministic
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, ours(**inputs).logits)


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("build", [_tiny_llama, _tiny_bert], ids=["tiny_llama", "tiny_bert"])
def test_defaults_work_with_no_arguments_like_peft(method, build):
    """adapt(model, NAME) alone: peft's default targets for the architecture, output unchanged."""
    model = build()
    inputs = batch(model)
    with torch.no_grad():
        base = model(input_ids=inputs["input_ids"]).logits
    peftlab.adapt(model, method)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=inputs["input_ids"]).logits, base, atol=1e-6)
    adapted = {n.rsplit(".", 1)[-1] for n in adapted_layers(model)}
    assert adapted == set(ATTENTION_QV[model.config.model_type])

    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    spec = get_method(method)
    extra = {"use_dora": True} if method == "dora" else {}
    theirs = peft.get_peft_model(build(), PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type](**extra))
    their_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert their_layers == set(adapted_layers(model))


@pytest.mark.parametrize("method,hp", [
    ("dora", {"r": 4, "alpha": 16.0, "dropout": 0.1, "use_rslora": True, "init": "gaussian"}),
    ("loha", {"r": 4, "alpha": 2.0, "rank_dropout": 0.1, "module_dropout": 0.2}),
    ("lokr", {"r": 2, "alpha": 3.0, "rank_dropout_scale": True, "decompose_both": True, "decompose_factor": 4}),
    ("vera", {"r": 32, "dropout": 0.1, "d_initial": 0.2, "projection_prng_key": 5, "save_projection": False}),
])
def test_config_round_trip_through_peft(method, hp):
    spec = get_method(method)
    config = spec.config(targets=("q_proj", "v_proj"), modules_to_save=(), **hp)
    peft_config = hf_peft.to_peft_config(spec, config)
    assert hf_peft.from_peft_config(peft_config) == (method, config)
    assert hf_peft.from_peft_config(peft_config.to_dict()) == (method, config)
    # a plain LoRA config stays LoRA although DoRA shares peft's LORA type
    lora = get_method("lora").config(targets=("q_proj", "v_proj"), modules_to_save=())
    assert hf_peft.from_peft_config(hf_peft.to_peft_config(get_method("lora"), lora))[0] == "lora"


# --------------------------------------------------------------------------------------------
# Parameter counts, ΔW, spectra
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", [
    ("dora", {}), ("dora", {"r": 3, "targets": "all-linear"}),
    ("loha", {}), ("loha", {"r": 5, "targets": "all-linear"}),
    ("lokr", {}), ("lokr", {"r": 1, "targets": "all-linear"}),
    ("lokr", {"r": 2, "decompose_both": True, "decompose_factor": 8, "targets": "all-linear"}),
    ("vera", {}), ("vera", {"r": 8, "targets": "all-linear"}),
])
def test_trainable_parameters_equal_the_closed_form(method, hp):
    model = peftlab.adapt(_tiny_llama(), method, **hp)
    spec, config = get_method(method), peftlab.api.records(model)["default"].config
    total = 0
    for layer in adapted_layers(model).values():
        counted = sum(p.numel() for p in layer.adapters["default"].parameters())
        d_in, d_out = layer_dims(layer.base_layer)
        assert counted == spec.params_per_layer(d_in, d_out, config)
        total += counted
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method,hp", [("dora", {}), ("loha", {"r": 3}), ("lokr", {"r": 2, "decompose_both": True}),
                                       ("lokr", {}), ("vera", {"r": 16})])
def test_delta_weight_is_the_layer_update(method, hp):
    """F.linear(x, W0 + ΔW, b) equals the adapted layer's output, ΔW in the base weight's shape."""
    model = peftlab.adapt(_tiny_llama(), method, **hp)
    randomise(model)
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, layer.base_layer.in_features)
    with torch.no_grad():
        delta = layer.delta_weight()
        assert delta.shape == layer.base_layer.weight.shape
        expected = F.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias)
        assert (layer(x) - expected).abs().max().item() < 1e-5
        assert delta.abs().max().item() > 1e-4  # the randomised adapter does change the weight


def test_loha_factors_khatri_rao_and_rank_above_r():
    """ΔW = (W1a W1b) ⊙ (W2a W2b) = left @ right with inner dim r²; its rank exceeds r."""
    model = peftlab.adapt(_tiny_llama(), "loha", r=2)
    randomise(model)
    adapter = model.model.layers[1].self_attn.q_proj.adapters["default"]
    left, right = adapter.factors()
    assert left.shape == (64, 4) and right.shape == (4, 64)
    delta = adapter.delta_weight(None)
    assert (left @ right - delta).abs().max().item() < 1e-6
    assert torch.linalg.matrix_rank(delta).item() == 4  # r² = 4 > r = 2: beyond LoRA at equal r


def test_vera_factors_and_shared_projection():
    model = peftlab.adapt(_tiny_llama(), "vera", r=8, targets="all-linear")
    randomise(model)
    adapters = [layer.adapters["default"] for layer in adapted_layers(model).values()]
    shared = adapters[0].projection
    assert all(a.projection is shared for a in adapters)  # one object, not a copy per layer
    assert shared.vera_A.shape == (8, 128) and shared.vera_B.shape == (128, 8)  # largest d_in, d_out
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())
    for adapter in adapters:
        left, right = adapter.factors()
        assert (left @ right - adapter.delta_weight(None)).abs().max().item() < 1e-6
    # the seed decides the projection, as in peft
    again = peftlab.adapt(_tiny_llama(), "vera", r=8, targets="all-linear")
    other = peftlab.adapt(_tiny_llama(), "vera", r=8, targets="all-linear", projection_prng_key=1)
    first = lambda m: next(iter(adapted_layers(m).values())).adapters["default"].projection.vera_A  # noqa: E731
    assert torch.equal(first(again), shared.vera_A) and not torch.equal(first(other), shared.vera_A)


@pytest.mark.parametrize("hp", [{}, {"r": 1}, {"r": 2, "decompose_both": True}, {"decompose_factor": 4}])
def test_lokr_singular_values_from_the_factors(hp):
    model = peftlab.adapt(_tiny_llama(), "lokr", targets="all-linear", **hp)
    randomise(model)
    for layer in adapted_layers(model).values():
        adapter = layer.adapters["default"]
        expected = torch.linalg.svdvals(adapter.delta_weight(None).detach())
        assert torch.allclose(adapter.singular_values(), expected, atol=1e-5)


def test_lokr_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as theirs

    from peftlab.methods.lokr import factorization

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


# --------------------------------------------------------------------------------------------
# DoRA specifics
# --------------------------------------------------------------------------------------------
def test_dora_matches_the_paper_equation_with_the_norm_detached():
    """Gradients equal those of h = m ⊙ (W0 + s·BA) x / const(||W0 + s·BA||_c) written out
    directly, and differ from a version where the norm is not detached."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    base.requires_grad_(False)
    from peftlab.methods.dora import DoRA, DoRAConfig

    dora = DoRA(base, DoRAConfig(r=4, alpha=8.0))
    with torch.no_grad():
        dora.lora_B.normal_()
        dora.magnitude.mul_(1.3)
    x = torch.randn(5, 16)
    out = dora(x, base, base(x))
    out.pow(2).sum().backward()
    got = [p.grad.clone() for p in (dora.lora_A, dora.lora_B, dora.magnitude)]

    for detach in (True, False):
        A, B, m = (p.detach().clone().requires_grad_() for p in (dora.lora_A, dora.lora_B, dora.magnitude))
        V = base.weight + dora.scaling * B @ A
        norm = V.norm(dim=1, keepdim=True)
        h = F.linear(x, m.unsqueeze(1) * V / (norm.detach() if detach else norm), base.bias)
        if detach:
            assert (h - out).abs().max().item() < 1e-5
        h.pow(2).sum().backward()
        same = all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(got, (A, B, m)))
        assert same == detach


def test_dora_stats_track_magnitude_and_direction():
    model = peftlab.adapt(_tiny_llama(), "dora")
    from peftlab.methods.dora import dora_stats

    stats = dora_stats(model)
    assert set(stats) == set(adapted_layers(model))
    assert all(s["magnitude_change"] < 1e-6 and abs(s["direction_change"]) < 1e-6 for s in stats.values())
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.normal_(std=0.1)  # turns the direction only
    s = dora_stats(model)["model.layers.0.self_attn.q_proj"]
    assert s["magnitude_change"] < 1e-6 and s["direction_change"] > 1e-4
    with torch.no_grad():
        layer.adapters["default"].magnitude.add_(0.5)  # scales only
    s2 = dora_stats(model)["model.layers.0.self_attn.q_proj"]
    assert abs(s2["magnitude_change"] - 0.5) < 1e-5 and abs(s2["direction_change"] - s["direction_change"]) < 1e-6
    peftlab.merge(model)
    with pytest.raises(ConfigError, match="unmerge"):
        dora_stats(model)


def test_methods_refuse_embeddings_with_a_clear_error():
    for method in ("loha", "lokr", "vera"):  # peft has none of them on embeddings (DoRA: it does)
        with pytest.raises(ConfigError, match="linear"):
            peftlab.adapt(_tiny_llama(), method, targets=("embed_tokens",))


# --------------------------------------------------------------------------------------------
# 4-bit (NF4) base
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4_llama():
    from peftlab.models import load_model

    model, _ = load_model("tiny-llama", quantization="nf4")
    return model


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_nf4_base_matches_peft(nf4_llama, method):
    ours = peftlab.adapt(copy.deepcopy(nf4_llama), method)
    randomise(ours)
    theirs = peftlab.adapt(copy.deepcopy(nf4_llama), method, backend="peft")
    hf_peft.copy_reference_to_peft(ours, theirs)
    inputs = batch(ours)
    a, b = ours(**inputs), theirs(**inputs)
    assert (a.logits - b.logits).abs().max().item() < ATOL
    a.loss.backward()
    b.loss.backward()
    assert max_grad_diff(ours, theirs) < ATOL


@pytest.mark.parametrize("method", NEW_METHODS)
def test_nf4_base_reference_works_for_all(nf4_llama, method):
    """peft's LoHa and LoKr fail on a 4-bit base (they reshape to the packed weight's shape);
    the reference adds ΔW x beside the dequantised weight, and refuses to merge into 4 bits."""
    model = peftlab.adapt(copy.deepcopy(nf4_llama), method, r=4)
    randomise(model)
    layer = model.model.layers[0].self_attn.v_proj
    assert getattr(layer.base_layer.weight, "quant_state", None) is not None
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = F.linear(x, dense_weight(layer.base_layer) + layer.delta_weight(), layer.base_layer.bias)
        assert (layer(x) - expected).abs().max().item() < 1e-5
    loss = model(**batch(model)).loss
    loss.backward()
    grads = [p.grad for p in layer.adapters["default"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ConfigError, match="4-bit"):
        peftlab.merge(model)


# --------------------------------------------------------------------------------------------
# A real model
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method,hp", [("dora", {"r": 4}), ("loha", {"r": 4}), ("lokr", {"r": 4}), ("vera", {"r": 64}),
                                       ("adalora", {"init_r": 4, "target_r": 2, "total_step": 10})])
def test_smollm2_parity(smollm2, method, hp):
    model, _ = smollm2
    ours = peftlab.adapt(copy.deepcopy(model), method, **hp)
    randomise(ours)
    theirs = peftlab.adapt(copy.deepcopy(model), method, backend="peft", **hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    ids = torch.tensor([[1, 504, 3458, 282, 260, 4073, 30, 2]])
    a, b = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert (a.logits - b.logits).abs().max().item() < ATOL  # same operations in the same order
    a.loss.backward()
    b.loss.backward()
    assert max_grad_diff(ours, theirs) < ATOL
    del ours, theirs
