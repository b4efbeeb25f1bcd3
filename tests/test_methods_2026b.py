"""More of peft's newer families, from scratch, proven equal to peft 0.21.2: HiRA and C3A.

Same weights -> same outputs and same gradients (fp32, atol 1e-5) through the weight bridge in
both directions, on the tiny Llama and the tiny BERT; the same saved tensor names; PEFT-format
folders load both ways; the same merged weights; each method's own promise (HiRA: ΔW = W0 ⊙ B A,
a no-op at init; C3A: ΔW block-circulant); ``peftlab.adapt(model, NAME)`` with peft's defaults (or
the error where they cannot fit); clear errors for bad settings.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers
from peftlab.production import hf_peft
from tests.test_methods_2026 import ATOL, assert_same, build_pair, loss_of, randomise, trained_pairs

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[5, 17, 40, 300, 9, 77, 123, 5, 600], [40, 8, 17, 300, 2, 5, 99, 41, 12]])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # peft warns about layer types it does not know, not our concern
        warnings.simplefilter("ignore")
        yield


CASES = [  # (fixture, method, hyperparameters)
    ("tiny_llama", "hira", {}),
    ("tiny_llama", "hira", {"r": 3, "init_weights": "gaussian", "targets": "all-linear"}),
    ("tiny_bert", "hira", {"r": 4, "init_weights": False}),
    # C3A on one layer only: peft's hand-written backward gets the input's gradient wrong (see
    # test_c3a_input_gradient_is_exact_where_peft_s_is_not), so below one adapter it would differ
    ("tiny_llama", "c3a", {"block_size": 16, "targets": ("layers.1.self_attn.v_proj",)}),
    ("tiny_llama", "c3a", {"block_size": 8, "init_weights": "gaussian", "targets": ("layers.1.mlp.down_proj",)}),
    ("tiny_bert", "c3a", {"block_size": 32, "init_weights": True, "targets": ("layer.1.attention.self.value",)}),
]


@pytest.mark.parametrize("arch, method, hp", CASES)
def test_same_outputs_and_gradients_as_peft(request, arch, method, hp):
    from peft import get_peft_model_state_dict

    model, _ = request.getfixturevalue(arch)
    reference, theirs = build_pair(model, method, **hp)
    randomise(reference, seed=1)  # peftlab -> peft
    hf_peft.copy_reference_to_peft(reference, theirs)
    assert_same(reference, theirs, IDS)
    randomise(theirs, seed=2)  # peft -> peftlab, with other weights
    hf_peft.copy_peft_to_reference(theirs, reference)
    assert_same(reference, theirs, IDS)
    saved = get_peft_model_state_dict(theirs)  # peft's saved names, and its tensors load into ours
    assert set(hf_peft.reference_state_dict(reference)) == set(saved)
    randomise(reference, seed=3)
    hf_peft.load_reference_state_dict(reference, saved)
    for name, tensor in hf_peft.reference_state_dict(reference).items():
        assert torch.equal(tensor, saved[name]), name


# merging HiRA and C3A against peft: tests/test_methods_2026.py's MERGED cases


@pytest.mark.parametrize("method, hp", [("hira", {"r": 4}), ("c3a", {"block_size": 16})])
def test_peft_folders_load_both_ways(tiny_llama, tmp_path, method, hp):
    from peft import PeftModel

    model, _ = tiny_llama
    reference, theirs = build_pair(model, method, **hp)
    for source, seed in ((reference, 5), (theirs, 6)):
        randomise(source, seed=seed)
        source.eval()
    with torch.no_grad():
        ours_out, their_out = reference(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    assert (ours_out - their_out).abs().max().item() > 1e-3  # different weights, so the loads below mean something
    folder = peftlab.save_adapter(reference, tmp_path / "ours")  # peftlab -> peft
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        assert (loaded(input_ids=IDS).logits - ours_out).abs().max().item() < ATOL
    theirs.save_pretrained(tmp_path / "theirs")  # peft -> peftlab
    again = peftlab.load_adapter(copy.deepcopy(model), tmp_path / "theirs").eval()
    with torch.no_grad():
        assert (again(input_ids=IDS).logits - their_out).abs().max().item() < ATOL


def test_hira_update_is_the_weight_times_a_low_rank_product():
    from peftlab.methods.hira import HiRA, HiraConfig

    torch.manual_seed(0)
    base, x = torch.nn.Linear(16, 12), torch.randn(3, 16)
    adapter = HiRA(base, HiraConfig(r=2))
    assert torch.count_nonzero(adapter.delta_weight(base)) == 0  # B = 0: a no-op at init
    with torch.no_grad():
        adapter.hira_B.normal_()
    delta = base.weight * (adapter.hira_B @ adapter.hira_A)
    assert torch.allclose(adapter.delta_weight(base), delta)
    assert torch.allclose(adapter(x, base, base(x)), base(x) + x @ delta.T, atol=1e-6)
    # the Hadamard product lifts the rank: far above r = 2
    assert torch.linalg.matrix_rank(delta.detach()) > 2


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_adapt_with_defaults(request, arch):
    from peftlab.methods import get_method

    model, _ = request.getfixturevalue(arch)
    for method in ("hira",):
        torch.manual_seed(0)
        adapted = peftlab.adapt(copy.deepcopy(model), method)
        layers = adapted_layers(adapted)
        assert layers and all(n.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "query", "value") for n in layers)
        spec = get_method(method)
        expected = sum(spec.params_per_layer(l.base_layer.in_features, l.base_layer.out_features,
                                             spec.config()) for l in layers.values())
        adapters = sum(p.numel() for l in layers.values() for p in l.adapters["default"].parameters())
        assert adapters == expected  # (BERT's classifier head trains too, as in peft: modules_to_save)
        loss_of(adapted, IDS)[1].backward()
        assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)


def test_listed_with_formula_and_merging():
    rows = {row["name"]: row for row in peftlab.list_methods()}
    for method in ("hira",):
        assert "d_in" in rows[method]["trainable_parameters"] and rows[method]["mergeable"] is True
        assert rows[method]["in_peft"] is True


def test_bad_settings_are_refused_clearly(tiny_llama):
    model, _ = tiny_llama
    for method, hp, match in [("hira", {"r": 0}, "positive integer"), ("hira", {"init_weights": "pissa"}, "gaussian"),
                              ("hira", {"dropout": 1.5}, "dropout"),
                              ("c3a", {"block_size": 0}, "positive integer"),
                              ("c3a", {"init_weights": "zeros"}, "xavier"),
                              ("c3a", {"block_size": 24}, "d_in=64 and d_out=64.*try block_size=64")]:
        with pytest.raises(ConfigError, match=match):
            peftlab.adapt(copy.deepcopy(model), method, **hp)


def test_configs_translate_both_ways():
    from peftlab.methods import get_method

    for method, hp in [("hira", {"r": 6, "dropout": 0.1, "init_weights": "gaussian"}),
                       ("c3a", {"block_size": 8, "init_weights": "kaiming_uniform"})]:
        spec = get_method(method)
        config = spec.config(targets=("q_proj",), modules_to_save=(), **hp)
        theirs = hf_peft.to_peft_config(spec, config)
        assert str(theirs.peft_type).split(".")[-1] == spec.peft_type
        assert hf_peft.from_peft_config(theirs) == (method, config)


def test_c3a_update_is_block_circulant():
    from peftlab.methods.c3a import C3A, C3AConfig

    torch.manual_seed(0)
    base, x = torch.nn.Linear(8, 12), torch.randn(3, 8)
    adapter = C3A(base, C3AConfig(block_size=4, init_weights="gaussian"))
    delta = adapter.delta_weight(base)  # (12, 8): 3 x 2 blocks of 4 x 4
    for m in range(3):
        for n in range(2):
            block = delta[4 * m: 4 * m + 4, 4 * n: 4 * n + 4]
            for k in range(1, 4):  # each row is the one above it shifted one place: circulant
                assert torch.allclose(block[k], block[k - 1].roll(1), atol=1e-6)
    assert torch.allclose(adapter(x, base, base(x)), base(x) + x @ delta.T, atol=1e-5)
    assert torch.count_nonzero(C3A(base, C3AConfig(block_size=4, init_weights=True)).delta_weight(base)) == 0


def test_c3a_default_block_size_is_refused_on_tiny_models(tiny_llama, tiny_bert):
    """peft's block_size=256 cannot divide 64-wide layers: peftlab says so, and peft refuses it too."""
    from peft import get_peft_model

    from peftlab.methods import get_method

    spec = get_method("c3a")
    for model, _ in (tiny_llama, tiny_bert):
        with pytest.raises(ConfigError, match="block_size=256 does not divide"):
            peftlab.adapt(copy.deepcopy(model), "c3a")
        config = hf_peft.to_peft_config(spec, spec.config(targets=spec.targets_for(model)), None)
        with pytest.raises(ValueError):
            get_peft_model(copy.deepcopy(model), config)
        adapted = peftlab.adapt(copy.deepcopy(model), "c3a", block_size=16)  # the suggested size works
        loss_of(adapted, IDS)[1].backward()


def test_c3a_input_gradient_is_exact_where_peft_s_is_not():
    """peft 0.21.2's BlockCircularConvolution.backward returns the right kernel gradient but a wrong
    input gradient (it convolves with the kernel where the adjoint needs it flipped): gradcheck fails
    on it. peftlab lets autograd differentiate the FFTs, which gradcheck confirms; so on a model with
    C3A on several layers, the gradients of all but the last adapted layer differ from peft's."""
    from peft.tuners.c3a.utils import BlockCircularConvolution

    from peftlab.methods.c3a import block_circular_conv

    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block_circular_conv, (x, w))
    assert torch.allclose(block_circular_conv(x, w), BlockCircularConvolution.apply(x, w))
    g = torch.randn(3, 8, dtype=torch.float64)
    ours = torch.autograd.grad(block_circular_conv(x, w), (x, w), g)
    theirs = torch.autograd.grad(BlockCircularConvolution.apply(x, w), (x, w), g)
    assert torch.allclose(ours[1], theirs[1])  # the kernel's gradient agrees
    assert not torch.allclose(ours[0], theirs[0], atol=1e-3)  # the input's does not: peft's is wrong


@pytest.mark.parametrize("method, hp", [("hira", {"r": 2}), ("c3a", {"block_size": 8})])
def test_conv1d_base_behaves_like_the_same_linear(method, hp):
    """GPT-2's Conv1D stores W as (d_in, d_out): the same adapter weights give the same outputs and
    merge into the same weight as on the nn.Linear it equals."""
    from transformers.pytorch_utils import Conv1D

    from peftlab.inject import AdaptedLayer
    from peftlab.methods import METHODS
    from peftlab.methods.c3a import C3A
    from peftlab.methods.hira import HiRA

    torch.manual_seed(0)
    conv, linear = Conv1D(24, 16), torch.nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    config, x, outputs, weights = METHODS[method].config(targets=("x",), **hp), torch.randn(3, 16), [], None
    for base in (conv, linear):
        layer = AdaptedLayer(base)
        layer.adapters["default"] = {"hira": HiRA, "c3a": C3A}[method](base, config)
        layer.active = ["default"]
        if weights is None:
            randomise(layer.adapters["default"], seed=12)
            weights = layer.adapters["default"].state_dict()
        layer.adapters["default"].load_state_dict(weights)
        unmerged = layer(x)
        assert not torch.allclose(unmerged, base(x), atol=1e-4)
        layer.merge()
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        outputs.append(unmerged)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_hira_on_gpt2_conv1d_equals_peft():
    """peft's HiRA adapts GPT-2's Conv1D (fan_in_fan_out=True): the same weights, outputs and gradients."""
    from tests.support_matrix import ARCHS

    gpt2 = next(arch for arch in ARCHS if arch.name == "GPT-2").build()
    ids = torch.tensor([[5, 17, 40, 100, 9, 77], [40, 8, 17, 30, 2, 5]])
    reference, theirs = build_pair(gpt2, "hira", r=4, targets=("c_attn", "mlp.c_proj"))
    randomise(reference, seed=7)
    hf_peft.copy_reference_to_peft(reference, theirs)
    outputs = []
    for model in (reference, theirs):  # GPT2LMHeadModel: a causal LM that loss_of does not name
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs.append(out.logits)
    assert (outputs[0] - outputs[1]).abs().max().item() < ATOL
    pairs = trained_pairs(reference, theirs)
    assert len(pairs) == 2 * 2 * 2  # A and B on c_attn and mlp.c_proj of both blocks
    for ours, their in pairs:
        assert (ours.grad - their.grad).abs().max().item() < ATOL
