"""LoRA on nn.MultiheadAttention and LoRA with a bias on B (lora_bias=True), proven equal to peft 0.21.2.

The cases follow peft's own ``tests/test_custom_models.py`` entries ("MHA 1 LoRA", "MHA 2 LoRA",
"Vanilla MLP 1 LoRA with lora_b bias", "Conv2d 1 LoRA with lora_b bias", ...) on small models of
our own. Each case, as in tests/test_conv_layers.py:

- same weights -> same outputs and gradients as peft's own layers (``peft.get_peft_model`` on a deep
  copy, weights copied through peftlab's bridge), fp32, and the same trainable count as peft's;
- merged == unmerged, unmerge gives the base tensors back, disabled == base (a lora_bias adapter
  on a layer without a bias, or on a grouped conv, refuses to merge, as peft does);
- trainable parameters == the closed form (``layer_parameter_count``);
- ``peftlab.save_adapter`` -> ``peft.PeftModel.from_pretrained`` gives the same outputs, and a peft
  ``save_pretrained`` -> ``peftlab.load_adapter`` gives exactly peft's outputs (0.0 difference).

Then the equation of MultiheadAttentionLoRA written out by hand (including peft 0.21.2's doubled
out_proj update), peft's merge_and_unload, and the refusals.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.api import records
from peftlab.errors import ConfigError, PeftlabError
from peftlab.inject import adapted_layers
from peftlab.methods import METHODS, layer_parameter_count
from peftlab.methods.lora import PEFT_OUT_PROJ_COPIES
from peftlab.production import hf_peft
from tests.test_conv_layers import randomise  # every trainable tensor, B and b_B included, to seeded noise

torch.set_num_threads(1)
ATOL = 1e-6


class AttentionNet(nn.Module):
    """nn.MultiheadAttention, then a linear head (peft's "MHA" toy model). ``masked`` runs it
    batch-first with a causal mask and need_weights=False: arguments beyond the query reach it."""

    def __init__(self, bias: bool = True, masked: bool = False) -> None:
        super().__init__()
        self.masked = masked
        self.mha = nn.MultiheadAttention(16, 2, bias=bias, batch_first=masked)
        self.lin0 = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, N, 16), or (N, T, 16) when masked
        if not self.masked:
            return self.lin0(self.mha(x, x, x)[0])
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), diagonal=1)
        return self.lin0(self.mha(x, x, x, attn_mask=causal, need_weights=False)[0])


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 12), nn.Linear(12, 6, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class GPT2Style(nn.Module):
    """transformers' Conv1D (weight stored (d_in, d_out)), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc, self.lin0 = Conv1D(12, 10), nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.c_fc(x)))


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module, example: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            features = conv(torch.zeros(1, *example)).numel()
        self.lin0 = nn.Linear(features, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv(x)).flatten(1))


# name -> (model, one batch of inputs); seeded below so every build has the same weights
MODELS = {
    "Attention": (AttentionNet, (5, 3, 16)),
    "AttentionMasked": (lambda: AttentionNet(masked=True), (3, 5, 16)),
    "AttentionNoBias": (lambda: AttentionNet(bias=False), (5, 3, 16)),
    "MLP": (MLP, (4, 10)),
    "MLPNoBias": (lambda: MLP(bias=False), (4, 10)),
    "GPT2Conv1D": (GPT2Style, (4, 10)),
    "Conv2d": (lambda: ConvNet(nn.Conv2d(5, 10, 3), (5, 5, 5)), (2, 5, 5, 5)),
    "Conv3d": (lambda: ConvNet(nn.Conv3d(4, 8, 3), (4, 4, 4, 4)), (2, 4, 4, 4, 4)),
    "Conv1dGroups": (lambda: ConvNet(nn.Conv1d(8, 16, 3, groups=2), (8, 9)), (2, 8, 9)),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def inputs(name: str, seed: int = 3) -> torch.Tensor:
    return torch.randn(*MODELS[name][1], generator=torch.Generator().manual_seed(seed))


# (case id, model, hyperparameters in peftlab's names)
CASES = [
    ("MHA 1 LoRA", "Attention", {"targets": ("mha",), "r": 4, "alpha": 8.0}),
    ("MHA 2 LoRA", "Attention", {"targets": ("mha", "lin0"), "r": 4}),
    ("MHA lora_bias rsLoRA", "Attention", {"targets": ("mha",), "r": 4, "alpha": 6.0, "lora_bias": True,
                                          "use_rslora": True}),
    ("MHA masked batch-first", "AttentionMasked", {"targets": ("mha",), "r": 2, "lora_bias": True}),
    ("MHA without biases", "AttentionNoBias", {"targets": ("mha",), "r": 4}),
    ("Linear lora_bias", "MLP", {"targets": ("lin0", "lin1"), "r": 4, "alpha": 32.0, "lora_bias": True}),
    ("Linear lora_bias, base without bias", "MLPNoBias", {"targets": ("lin1",), "r": 4, "lora_bias": True}),
    ("Conv1D lora_bias", "GPT2Conv1D", {"targets": ("c_fc",), "r": 4, "lora_bias": True}),
    ("Conv2d lora_bias", "Conv2d", {"targets": ("conv",), "r": 4, "alpha": 32.0, "lora_bias": True}),
    ("Conv3d lora_bias", "Conv3d", {"targets": ("conv", "lin0"), "r": 4, "lora_bias": True}),
    ("Conv1d groups lora_bias", "Conv1dGroups", {"targets": ("conv",), "r": 4, "lora_bias": True}),
]
PARAMS = [pytest.param(model, hp, id=name) for name, model, hp in CASES]


def adapt(model_name: str, hp: dict) -> tuple[nn.Module, nn.Module]:
    """(base, the base adapted by peftlab's reference LoRA, with random adapter weights)."""
    base = build(model_name)
    model = peftlab.adapt(copy.deepcopy(base), "lora", **hp)
    randomise(model)
    return base, model


def peft_model(base: nn.Module, hp: dict):
    """peft's own LoRA on a copy of ``base``, from peft's own config class."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(target_modules=list(hp["targets"]), r=hp["r"], lora_alpha=hp.get("alpha", 8.0),
                        lora_bias=hp.get("lora_bias", False), use_rslora=hp.get("use_rslora", False),
                        fan_in_fan_out=isinstance(base, GPT2Style))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: a lora_bias layer without a bias will not merge
        return get_peft_model(copy.deepcopy(base), config)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# parity with peft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "hp"), PARAMS)
def test_outputs_and_gradients_equal_peft(model_name, hp):
    base, ours = adapt(model_name, hp)
    theirs = peft_model(base, hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    assert trainable(ours) == trainable(theirs)
    x = inputs(model_name)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=0)
    assert not torch.allclose(out_ours, base(x), atol=1e-3), "the randomised adapter does nothing"

    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=ATOL, rtol=1e-5)
    their_params = dict(theirs.named_parameters())
    for ours_name, their_name in hf_peft.reference_to_peft_names(ours).items():
        mine, their_grad = ours.get_parameter(ours_name).grad, their_params[their_name].grad
        if their_grad is None:  # peft's MHA adds the lora_B biases outside autograd
            assert mine is None, ours_name
            continue
        scale = their_grad.abs().max().item() + 1.0
        torch.testing.assert_close(mine, their_grad, atol=ATOL * scale, rtol=1e-5, msg=ours_name)


@pytest.mark.parametrize(("model_name", "hp"), PARAMS)
def test_merge_unmerge_and_disable(model_name, hp):
    base, model = adapt(model_name, hp)
    x = inputs(model_name)
    reference, unmerged = base(x), model(x)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    layers = adapted_layers(model)
    refusing = [n for n, layer in layers.items() if not layer.adapters["default"].mergeable]
    if refusing:  # no base bias to add b_B to, or a grouped conv: peft refuses to merge too
        with pytest.raises(PeftlabError, match=r"cannot be merged.*(has none|groups=2)"):
            peftlab.merge(model)
        assert not any(layer.merged for layer in layers.values())
    else:
        peftlab.merge(model)
        # W0 + ΔW rounds differently from W0 x + ΔW x; with N(0, 0.25) factors the outputs reach ~2
        # and one kernel (AVX2, one thread) gives 3.7e-5: a wrong merge is off by O(1)
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=1e-4)
        peftlab.set_disabled(model, True)  # disabling a merged model takes the merge out
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
        peftlab.set_disabled(model, False)
        peftlab.unmerge(model)
    for name, layer in layers.items():  # W0 and b0 back, up to float32 rounding
        for key, value in layer.base_layer.state_dict().items():
            torch.testing.assert_close(value, before[f"{name}.{key}"], atol=1e-6, rtol=0, msg=f"{name}.{key}")
    torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=1e-4)
    peftlab.set_disabled(model, True)
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model_name", "hp"), PARAMS)
def test_trainable_parameters_equal_the_closed_form(model_name, hp):
    base = build(model_name)
    model = peftlab.adapt(copy.deepcopy(base), "lora", **hp)
    spec, config = METHODS["lora"], records(model)["default"].config
    expected = sum(layer_parameter_count(spec, base.get_submodule(n), config) for n in hp["targets"])
    assert trainable(model) == expected


def test_closed_forms_by_hand():
    spec = METHODS["lora"]
    count = lambda layer, **hp: layer_parameter_count(spec, layer, spec.config(**hp))  # noqa: E731
    mha = nn.MultiheadAttention(16, 2)  # in_proj 16 -> 48, out_proj 16 -> 16
    assert count(mha, r=4) == 4 * (16 + 48) + 4 * (16 + 16) == 6 * 4 * 16
    assert count(mha, r=4, lora_bias=True) == 6 * 4 * 16 + 48 + 16  # b_B of in_proj and of out_proj
    assert count(nn.Linear(10, 12), r=4, lora_bias=True) == 4 * (10 + 12) + 12
    assert count(nn.Conv2d(16, 32, 3, groups=2), r=4, lora_bias=True) == 4 * 16 * 9 + 32 * 4 // 2 + 32


# --------------------------------------------------------------------------------------------
# saving both ways
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "hp"), PARAMS)
def test_saved_by_peftlab_loads_in_peft(model_name, hp, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    base, model = adapt(model_name, hp)
    x = inputs(model_name)
    folder = peftlab.save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():  # both in eval without gradients: nn.MultiheadAttention's fast path in both
        torch.testing.assert_close(theirs(x), model.eval()(x), atol=ATOL, rtol=0)
    peft_folder = tmp_path / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft 0.21.2 mistakes a 1-D lora_B bias for a ZeRO-3 shard
        theirs.save_pretrained(str(peft_folder))  # peft writes the very same tensor names
    names = lambda where: set(load_file(where / "adapter_model.safetensors"))  # noqa: E731
    assert names(peft_folder) == names(folder)
    loaded = peftlab.load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize(("model_name", "hp"), PARAMS)
def test_saved_by_peft_loads_in_peftlab_exactly(model_name, hp, tmp_path):
    base = build(model_name)
    theirs = peft_model(base, hp)
    randomise(theirs, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as above: peft's warning about 1-D lora_B biases
        theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = inputs(model_name)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() == 0.0
    assert records(ours)["default"].config.lora_bias is hp.get("lora_bias", False)


# --------------------------------------------------------------------------------------------
# MultiheadAttentionLoRA's equation, written out, and peft's merge
# --------------------------------------------------------------------------------------------
def test_attention_update_is_the_docstring_equation():
    """h = MHA(x; W_in + s B_in A_in, b_in, W_out + 2 s B_out A_out, b_out + s b_B,out), computed
    here with torch's functional attention; in_proj's b_B changes nothing (as in peft 0.21.2)."""
    base, model = adapt("Attention", {"targets": ("mha",), "r": 4, "alpha": 6.0, "lora_bias": True})
    adapter, mha = adapted_layers(model)["mha"].adapters["default"], base.mha
    s = 6.0 / 4
    w_in = mha.in_proj_weight + s * adapter.in_proj.lora_B @ adapter.in_proj.lora_A  # (48, 16)
    w_out = mha.out_proj.weight + PEFT_OUT_PROJ_COPIES * s * adapter.out_proj.lora_B @ adapter.out_proj.lora_A
    b_out = mha.out_proj.bias + s * adapter.out_proj.lora_B_bias
    x = inputs("Attention")
    h, _ = F.multi_head_attention_forward(x, x, x, 16, 2, w_in, mha.in_proj_bias, None, None, False, 0.0,
                                          w_out, b_out, training=False)
    torch.testing.assert_close(model(x), base.lin0(h), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        adapter.in_proj.lora_B_bias.add_(1.0)  # peft saves it but never adds it
    torch.testing.assert_close(model(x), base.lin0(h), atol=1e-5, rtol=1e-5)


def test_attention_merge_matches_peft_merge_and_unload():
    hp = {"targets": ("mha",), "r": 4, "lora_bias": True}
    base, model = adapt("Attention", hp)
    theirs = peft_model(base, hp)
    hf_peft.copy_reference_to_peft(model, theirs)
    merged_theirs = theirs.merge_and_unload()
    peftlab.merge(model)
    ours = adapted_layers(model)["mha"].base_layer
    for key, value in merged_theirs.mha.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_lora_bias_default_targets_and_the_fused_backend():
    """peftlab.adapt(model, "lora", lora_bias=True) on every linear layer; the fused backend runs
    lora_bias layers through the reference forward (its kernels have no b_B)."""
    base = build("MLP")
    ours = peftlab.adapt(copy.deepcopy(base), "lora", r=4, lora_bias=True)
    randomise(ours)
    fused = peftlab.adapt(copy.deepcopy(base), "lora", r=4, lora_bias=True, backend="fused")
    fused.load_state_dict(ours.state_dict())
    x = inputs("MLP")
    assert set(adapted_layers(ours)) == {"lin0", "lin1"}
    torch.testing.assert_close(fused(x), ours(x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# refusals: clear errors, the model left as it was
# --------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)


REFUSALS = [
    (CrossAttention, {"targets": ("mha",)}, r"kdim=8, vdim=8.*Expected kdim = vdim = embed_dim"),
    (lambda: AttentionNet(bias=False), {"targets": ("mha",), "lora_bias": True},
     r"bias=False is not supported.*Expected a layer with bias=True"),
    (AttentionNet, {"targets": ("mha",), "init": "loftq"}, r"LoftQ initialises linear layers only"),
    (lambda: nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4)), {"targets": ("0",), "lora_bias": True},
     r"'0'.*lora_bias=True is not supported on an nn.Embedding"),
    (MLP, {"lora_bias": True, "init": "gaussian"}, r"lora_bias=True with init='gaussian'.*Expected init='kaiming'"),
    (MLP, {"lora_bias": "yes"}, r"lora_bias='yes' is invalid. Expected True or False"),
]


@pytest.mark.parametrize(("make", "hp", "match"), REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_unsupported_cases_are_refused_clearly(make, hp, match):
    torch.manual_seed(0)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match) as err:
        peftlab.adapt(model, "lora", **hp)
    assert "Expected" in str(err.value) and "ry" in str(err.value)  # what was expected, what to try
    assert not adapted_layers(model), "a refused adapt must leave the model alone"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_active_adapters_on_attention_are_refused():
    _, model = adapt("Attention", {"targets": ("mha",), "r": 4})
    peftlab.add_adapter(model, "other", "lora", targets=("mha",), r=2)
    adapted_layers(model)["mha"].active = ["default", "other"]  # as peft, one at a time on MHA
    with pytest.raises(ConfigError, match=r"runs one adapter at a time.*set_adapter"):
        model(inputs("Attention"))
