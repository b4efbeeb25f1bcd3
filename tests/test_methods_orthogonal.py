"""OFT and BOFT: the from-scratch references are proven equal to peft 0.21.2.

Same weights -> same outputs and same gradients (fp32, atol 1e-5) through the weight bridge in
both directions, the same saved tensor names, the same merged weights; plus the orthogonal
methods' own promises (R orthogonal, neuron angles kept, identity at init) and their errors.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers
from peftlab.methods import METHODS, get_method
from peftlab.methods.boft import BOFT, BOFTConfig, butterfly_permutation
from peftlab.methods.oft import OFT, OFTConfig
from peftlab.metrics import count_parameters
from peftlab.production import hf_peft

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # peft warns about its missing CUDA extension, not our concern
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def cuda_butterfly(monkeypatch):
    """peft builds more than one butterfly factor only with its CUDA extension (on CPU it silently
    falls back to n_butterfly_factor=1). Stand in for that kernel, which lays (N, D, b, b) blocks
    out as N block-diagonal matrices, with torch.block_diag, so peft's own multi-factor code runs."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", object())
    monkeypatch.setattr(
        boft_layer.FastBlockDiag, "apply",
        staticmethod(lambda blocks: torch.stack([torch.block_diag(*level) for level in blocks])),
    )


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable parameter away from its init (Q = 0 would give R = I)."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(0.1 * torch.randn(param.shape, generator=gen))


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, loss) for a causal LM (next-token loss) or a classifier (labels from ids)."""
    if "CausalLM" in type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__:
        out = model(input_ids=ids, labels=ids)
    else:
        out = model(input_ids=ids, labels=ids[:, 0] % 2)
    return out.logits, out.loss


def assert_same(reference, theirs, ids, atol: float = ATOL) -> tuple[float, float]:
    """Outputs and adapter gradients agree; returns (max |Δ output|, max |Δ gradient|)."""
    for model in (reference, theirs):
        model.zero_grad()
    (ours_out, ours_loss), (their_out, their_loss) = loss_of(reference, ids), loss_of(theirs, ids)
    ours_loss.backward()
    their_loss.backward()
    out_diff = (ours_out - their_out).abs().max().item()
    params = dict(theirs.named_parameters())
    grad_diff = max(
        (reference.get_parameter(ours).grad - params[name].grad).abs().max().item()
        for ours, name in hf_peft.reference_to_peft_names(reference).items()
    )
    assert out_diff < atol and grad_diff < atol, (out_diff, grad_diff)
    return out_diff, grad_diff


def build_pair(model, method: str, **hp):
    reference = peftlab.adapt(copy.deepcopy(model), method, **hp)
    theirs = peftlab.adapt(copy.deepcopy(model), method, backend="peft", **hp)
    return reference, theirs


CASES = [  # (fixture, method, hyperparameters, needs peft's multi-factor butterfly)
    ("tiny_llama", "oft", {}, False),
    ("tiny_llama", "oft", {"use_cayley_neumann": False, "r": 4, "targets": "all-linear"}, False),
    ("tiny_llama", "oft", {"coft": True, "eps": 1e-2}, False),
    ("tiny_llama", "oft", {"block_share": True, "num_cayley_neumann_terms": 7}, False),
    ("tiny_bert", "oft", {}, False),
    ("tiny_llama", "boft", {}, False),
    ("tiny_bert", "boft", {"block_num": 16}, False),
    ("tiny_llama", "boft", {"n_butterfly_factor": 2}, True),
    ("tiny_llama", "boft", {"n_butterfly_factor": 3, "block_size": 2, "targets": ("o_proj", "down_proj")}, True),
]


@pytest.mark.parametrize("arch, method, hp, butterfly", CASES)
def test_same_outputs_and_gradients_as_peft(request, arch, method, hp, butterfly):
    if butterfly:
        request.getfixturevalue("cuda_butterfly")
    model, _ = request.getfixturevalue(arch)
    reference, theirs = build_pair(model, method, **hp)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))

    # peftlab -> peft
    randomise(reference, seed=1)
    hf_peft.copy_reference_to_peft(reference, theirs)
    assert_same(reference, theirs, ids)

    # peft -> peftlab, with other weights
    randomise(theirs, seed=2)
    hf_peft.copy_peft_to_reference(theirs, reference)
    assert_same(reference, theirs, ids)

    # the saved tensors: same names, and loading peft's state dict gives the same weights
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(theirs)
    assert set(hf_peft.reference_state_dict(reference)) == set(saved)
    randomise(reference, seed=3)
    hf_peft.load_reference_state_dict(reference, saved)
    for name, tensor in hf_peft.reference_state_dict(reference).items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_identity_at_init_and_merge_matches_peft(tiny_llama, method):
    model, _ = tiny_llama
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    base_logits = model(input_ids=ids).logits
    reference, theirs = build_pair(model, method, targets="all-linear")
    assert torch.allclose(reference(input_ids=ids).logits, base_logits, atol=1e-6)

    randomise(reference, seed=4)
    hf_peft.copy_reference_to_peft(reference, theirs)
    layer_name = "model.layers.0.mlp.down_proj"
    base_weight = reference.get_submodule(layer_name).base_layer.weight.detach().clone()
    unmerged = reference(input_ids=ids).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)  # the adapter does something

    peftlab.merge(reference)
    theirs.merge_adapter()
    assert torch.allclose(reference(input_ids=ids).logits, unmerged, atol=ATOL)
    merged_theirs = theirs.get_submodule("base_model.model." + layer_name).base_layer.weight
    assert torch.allclose(reference.get_submodule(layer_name).base_layer.weight, merged_theirs, atol=1e-6)

    peftlab.unmerge(reference)
    assert torch.allclose(reference.get_submodule(layer_name).base_layer.weight, base_weight, atol=1e-6)
    assert torch.allclose(reference(input_ids=ids).logits, unmerged, atol=ATOL)


def test_exact_cayley_rotation_is_orthogonal_and_keeps_neuron_angles(tiny_llama):
    model, _ = tiny_llama
    peftlab.adapt(model, "oft", use_cayley_neumann=False, block_size=16)
    randomise(model, seed=5)
    layer = model.model.layers[0].self_attn.q_proj
    R = layer.adapters["default"].rotation()
    assert torch.allclose(R @ R.T, torch.eye(64), atol=1e-5)
    assert torch.count_nonzero(R[:16, 16:]) == 0  # block-diagonal: blocks of 16 do not mix
    W0 = layer.base_layer.weight
    W = W0 + layer.delta_weight()
    # OFT's promise: the pairwise angles (and norms) of the neurons, rows of W, are unchanged
    assert torch.allclose(W @ W.T, W0 @ W0.T, atol=1e-4)
    assert not torch.allclose(W, W0, atol=1e-3)


def test_butterfly_levels_mix_further_blocks():
    # level 1 (the second factor) with b = 4: half-blocks h0 h1 h2 h3 -> h0 h2 h1 h3
    assert butterfly_permutation(8, 4, 1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert butterfly_permutation(8, 4, 0).tolist() == list(range(8))
    cfg = BOFTConfig(block_size=4, n_butterfly_factor=3)
    adapter = BOFT(torch.nn.Linear(16, 3), cfg)
    randomise(adapter, seed=6)
    R = adapter.rotation()
    assert torch.allclose(R @ R.T, torch.eye(16), atol=1e-5)
    assert torch.count_nonzero(R.abs() > 1e-8) == 16 * 16  # three factors of 4x4 blocks: dense


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_conv1d_base_behaves_like_the_same_linear(method):
    from transformers.pytorch_utils import Conv1D  # GPT-2's layer: weight stored (d_in, d_out)

    from peftlab.inject import AdaptedLayer

    conv = Conv1D(24, 16)
    linear = torch.nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    adapter, config = {"oft": (OFT, OFTConfig(block_size=8)), "boft": (BOFT, BOFTConfig(block_size=8))}[method]
    x, outputs = torch.randn(3, 16), []
    for base in (conv, linear):
        layer = AdaptedLayer(base)
        layer.adapters["default"] = adapter(base, config)
        layer.active = ["default"]
        randomise(layer.adapters["default"], seed=12)
        unmerged = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), unmerged, atol=1e-6)
        outputs.append(unmerged)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)


@pytest.mark.parametrize("method, hp", [
    ("oft", {}), ("oft", {"block_share": True}), ("oft", {"r": 8, "targets": "all-linear"}),
    ("boft", {}), ("boft", {"n_butterfly_factor": 2, "block_size": 8, "targets": "all-linear"}),
])
def test_trainable_parameters_follow_the_formula(tiny_llama, cuda_butterfly, method, hp):
    model, _ = tiny_llama
    reference, theirs = build_pair(model, method, **hp)
    config = peftlab.api.records(reference)["default"].config
    expected = sum(
        METHODS[method].params_per_layer(*peftlab.inject.layer_dims(layer.base_layer), config)
        for layer in peftlab.inject.adapted_layers(reference).values()
    )
    assert count_parameters(reference).trainable == expected
    assert theirs.get_nb_trainable_parameters()[0] == expected


def test_configs_translate_both_ways():
    spec = get_method("oft")
    for config in (OFTConfig(r=4, dropout=0.1, targets=("q_proj",), modules_to_save=()),
                   OFTConfig(block_size=8, coft=True, eps=1e-3, targets="all-linear", modules_to_save=())):
        theirs = hf_peft.to_peft_config(spec, config)
        assert (theirs.r, theirs.oft_block_size, theirs.module_dropout) == (config.r, config.block_size, config.dropout)
        assert hf_peft.from_peft_config(theirs)[1] == config
    config = BOFTConfig(block_num=8, n_butterfly_factor=2, dropout=0.1, targets=("q_proj", "v_proj"),
                        modules_to_save=())
    theirs = hf_peft.to_peft_config(get_method("boft"), config)
    assert (theirs.boft_block_size, theirs.boft_block_num, theirs.boft_n_butterfly_factor) == (0, 8, 2)
    assert hf_peft.from_peft_config(theirs) == ("boft", config)
    assert (OFTConfig().block_size, OFTConfig().r) == (32, 0)  # peft's defaults
    assert (BOFTConfig().block_size, BOFTConfig().block_num) == (4, 0)


def test_errors_say_what_fits(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="not both|one of them"):
        OFTConfig(r=4, block_size=16)
    with pytest.raises(ConfigError, match="one of them"):
        BOFTConfig(block_num=4, block_size=16)
    with pytest.raises(ConfigError, match=r"d_in=64.*\[2, 4, 8, 16, 32, 64\]"):
        peftlab.adapt(copy.deepcopy(model), "oft", block_size=48)
    with pytest.raises(ConfigError, match=r"\[2, 4, 8\]"):  # 4 levels: 8 | 64 / b, b even
        peftlab.adapt(copy.deepcopy(model), "boft", block_size=16, n_butterfly_factor=4)
    with pytest.raises(ConfigError, match="linear layers"):
        peftlab.adapt(copy.deepcopy(model), "boft", targets=("embed_tokens",))


def test_dropout_sets_blocks_to_identity_in_training_only(tiny_llama):
    model, _ = tiny_llama
    peftlab.adapt(model, "oft", block_size=8, dropout=0.5)
    randomise(model, seed=7)
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    eye = torch.eye(8)
    adapter.train()
    assert sum(torch.equal(block, eye) for block in adapter.blocks()) == 4  # int(0.5 · 8) blocks
    adapter.eval()
    assert sum(torch.equal(block, eye) for block in adapter.blocks()) == 0


def test_boft_dropout_draws_like_peft(tiny_llama):
    model, _ = tiny_llama
    reference, theirs = build_pair(model, "boft", dropout=0.5)
    randomise(reference, seed=8)
    hf_peft.copy_reference_to_peft(reference, theirs)
    reference.train(), theirs.train()
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (reference, theirs):
        torch.manual_seed(11)  # same random draws: which level, which blocks
        outs.append(m(input_ids=ids).logits)
    reference.eval()
    assert torch.allclose(outs[0], outs[1], atol=ATOL)
    assert not torch.allclose(outs[0], reference(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_4bit_base_matches_peft_and_refuses_merge(method):
    from peftlab.models import load_model

    model, _ = load_model("tiny-llama", quantization="nf4")
    reference, theirs = build_pair(model, method)
    randomise(reference, seed=9)
    hf_peft.copy_reference_to_peft(reference, theirs)
    assert_same(reference, theirs, torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ConfigError, match="4-bit"):
        peftlab.merge(reference)


@pytest.mark.slow
def test_smollm2_same_as_peft(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Orthogonal finetuning keeps the angles between neurons.", return_tensors="pt").input_ids
    for method in ("oft", "boft"):
        reference, theirs = build_pair(model, method)
        randomise(reference, seed=10)
        hf_peft.copy_reference_to_peft(reference, theirs)
        # float32, 30 layers: the base layer runs on rotated inputs in both, so they round alike
        out_diff, grad_diff = assert_same(reference, theirs, ids)
        print(f"{method}: max |Δ logits| {out_diff:.2g}, max |Δ grad| {grad_diff:.2g}")
        del reference, theirs


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_layer_forward_and_stacked_forward_agree(tiny_llama, method):
    """Run first, OFT/BOFT call the base layer on rotated inputs (layer_forward); stacked after
    another adapter they add the same change to its output (forward)."""
    model, _ = tiny_llama
    model = peftlab.adapt(model, method, targets=("o_proj",))
    randomise(model, seed=4)
    layer = next(iter(adapted_layers(model).values()))
    adapter = layer.adapters["default"]
    x = torch.randn(2, 5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        direct = layer(x)
        stacked = adapter(x, layer.base_layer, layer.base_layer(x))
        merged = F.linear(x, layer.base_layer.weight + adapter.delta_weight(layer.base_layer), layer.base_layer.bias)
    assert torch.allclose(direct, stacked, atol=1e-5)
    assert torch.allclose(direct, merged, atol=1e-5)
    assert not torch.allclose(direct, layer.base_layer(x), atol=1e-3)
