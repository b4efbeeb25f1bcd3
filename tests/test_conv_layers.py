"""LoRA, LoHa, LoKr, IA3, OFT and BOFT on nn.Conv1d / nn.Conv2d / nn.Conv3d, proven equal to Hugging Face peft.

The cases follow peft's own ``tests/test_custom_models.py`` entries for convolutions ("Conv1d",
"Conv2d", "Conv2d 1x1", "Conv2d Groups", "Conv2d Groups2", "Conv3d", "Conv3d 1x1", "Conv2d 1 OFT",
"Conv2d 1 BOFT", with and without a linear layer beside the convolution), on small models of our
own, with peft's defaults. Each case:

- same weights -> same outputs and gradients as peft's own layer (``peft.get_peft_model`` on a deep
  copy, weights copied through peftlab's bridge), fp32, and the same trainable count as peft's;
- merged == unmerged, unmerge gives the base weight back, ΔW has the conv weight's shape, disabled
  == base (grouped LoRA refuses to merge, as peft does);
- trainable parameters == the method's closed form (``layer_parameter_count`` / ``parameter_count``);
- ``peftlab.save_adapter`` -> ``peft.PeftModel.from_pretrained``, and ``save_pretrained`` of a peft
  model -> ``peftlab.load_adapter``, give the same outputs.

Then the refusals: methods and layer settings peftlab does not compute as peft does must fail at
adapt time with a ConfigError that names the layer type or the setting.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab.api import records
from peftlab.errors import ConfigError, PeftlabError
from peftlab.inject import adapted_layers, find_targets
from peftlab.methods import METHODS, layer_parameter_count
from peftlab.production import hf_peft

torch.set_num_threads(1)
ATOL = 1e-6


class ConvNet(nn.Module):
    """One convolution, a ReLU and a linear head: ``conv`` then ``lin0``, as peft's toy models."""

    def __init__(self, conv: nn.Module, example: tuple[int, ...]) -> None:
        super().__init__()
        self.example = example  # one input's shape, (C_in, *spatial)
        self.conv = conv
        with torch.no_grad():
            features = conv(torch.zeros(1, *example)).numel()
        self.lin0 = nn.Linear(features, 8)  # wide enough for rank 8 (peftlab checks r <= min(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv(x)).flatten(1))


# name -> (convolution, one input's shape); seeded below so every build has the same weights
MODELS = {
    "Conv1d": (lambda: nn.Conv1d(4, 12, 3, padding=1), (4, 9)),
    "Conv1dGroups": (lambda: nn.Conv1d(8, 16, 3, groups=2), (8, 9)),
    "Conv1dStrided": (lambda: nn.Conv1d(4, 12, 3, stride=2, padding=2, dilation=2), (4, 11)),
    "Conv2d": (lambda: nn.Conv2d(5, 10, 3), (5, 7, 7)),
    "Conv2d1x1": (lambda: nn.Conv2d(8, 16, 1), (8, 5, 5)),
    "Conv2dGroups": (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 5, 5)),
    "Conv2dGroups2": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=4), (16, 5, 5)),
    "Conv2dStrided": (lambda: nn.Conv2d(6, 12, (3, 2), stride=(2, 1), padding=(1, 0)), (6, 8, 6)),
    "Conv3d": (lambda: nn.Conv3d(5, 10, 3), (5, 4, 5, 5)),
    "Conv3d1x1": (lambda: nn.Conv3d(8, 16, 1), (8, 3, 4, 4)),
    "Conv2d1x1Strided": (lambda: nn.Conv2d(6, 12, 1, stride=2, padding=1), (6, 7, 7)),
    "Conv2d1x1Groups": (lambda: nn.Conv2d(8, 16, 1, groups=2), (8, 5, 5)),
    "Conv2dPadded": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1), (4, 7, 7)),
    "Conv2dDilated": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2), (4, 7, 7)),
    "Conv2dUneven": (lambda: nn.Conv2d(4, 8, 3, stride=(2, 1), padding=1), (4, 7, 7)),
}


def build(name: str) -> ConvNet:
    torch.manual_seed(0)
    make, example = MODELS[name]
    return ConvNet(make(), example)


def inputs(model: ConvNet, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, *model.example, generator=torch.Generator().manual_seed(seed))


# (case id, model, method, hyperparameters in peftlab's names; peft's names are the same here
# except targets -> target_modules)
CASES = [
    ("Conv1d LoRA", "Conv1d", "lora", {"targets": ("conv",)}),
    ("Conv2d 1 LoRA", "Conv2d", "lora", {"targets": ("conv",)}),
    ("Conv2d 2 LoRA", "Conv2d", "lora", {"targets": ("conv", "lin0")}),
    ("Conv2d strided LoRA", "Conv2dStrided", "lora", {"targets": ("conv",), "r": 4, "alpha": 16.0}),
    ("Conv2d Groups LoRA", "Conv2dGroups", "lora", {"targets": ("conv",)}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", "lora", {"targets": ("conv",)}),
    ("Conv3d 1 LoRA", "Conv3d", "lora", {"targets": ("conv",)}),
    ("Conv3d 2 LoRA", "Conv3d", "lora", {"targets": ("conv", "lin0")}),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", "lora", {"targets": ("conv",), "use_rslora": True}),
    ("Conv2d 1 IA3", "Conv2d", "ia3", {"targets": ("conv",), "feedforward_modules": ()}),
    ("Conv2d 2 IA3", "Conv2d", "ia3", {"targets": ("conv",), "feedforward_modules": ("conv",)}),
    ("Conv2d 3 IA3", "Conv2d", "ia3", {"targets": ("conv", "lin0"), "feedforward_modules": ()}),
    ("Conv2d 4 IA3", "Conv2d", "ia3", {"targets": ("conv", "lin0"), "feedforward_modules": ("conv",)}),
    ("Conv2d 5 IA3", "Conv2d", "ia3", {"targets": ("conv", "lin0"), "feedforward_modules": ("conv", "lin0")}),
    ("Conv2d Groups IA3", "Conv2dGroups", "ia3", {"targets": ("conv",), "feedforward_modules": ("conv",)}),
    ("Conv2d Groups2 IA3", "Conv2dGroups2", "ia3", {"targets": ("conv",), "feedforward_modules": ()}),
    ("Conv3d 1 IA3", "Conv3d", "ia3", {"targets": ("conv",), "feedforward_modules": ()}),
    ("Conv3d 2 IA3", "Conv3d", "ia3", {"targets": ("conv",), "feedforward_modules": ("conv",)}),
    ("Conv3d 4 IA3", "Conv3d", "ia3", {"targets": ("conv", "lin0"), "feedforward_modules": ("conv",)}),
    ("Conv1d LOHA 1", "Conv1d", "loha", {"targets": ("conv",)}),
    ("Conv1d LOHA 2", "Conv1d", "loha", {"targets": ("conv",), "r": 2}),
    ("Conv1d Groups LOHA", "Conv1dGroups", "loha", {"targets": ("conv",), "r": 4}),
    ("Conv1d dilated LOHA", "Conv1dStrided", "loha", {"targets": ("conv",), "r": 2, "alpha": 4.0}),
    ("Conv2d 1 LOHA", "Conv2d", "loha", {"targets": ("conv",)}),
    ("Conv2d 2 LOHA", "Conv2d", "loha", {"targets": ("conv", "lin0")}),
    ("Conv2d 1x1 LOHA", "Conv2d1x1", "loha", {"targets": ("conv",)}),
    ("Conv2d Groups LOHA", "Conv2dGroups", "loha", {"targets": ("conv",)}),
    ("Conv2d Groups2 LOHA", "Conv2dGroups2", "loha", {"targets": ("conv",), "r": 4}),
    ("Conv1d LOKR 1", "Conv1d", "lokr", {"targets": ("conv",)}),
    ("Conv1d LOKR 2", "Conv1d", "lokr", {"targets": ("conv",), "r": 2}),
    ("Conv1d Groups LOKR", "Conv1dGroups", "lokr", {"targets": ("conv",), "r": 4}),
    ("Conv1d dilated LOKR", "Conv1dStrided", "lokr", {"targets": ("conv",), "r": 1}),
    ("Conv2d 1 LOKR", "Conv2d", "lokr", {"targets": ("conv",)}),
    ("Conv2d 2 LOKR", "Conv2d", "lokr", {"targets": ("conv", "lin0")}),
    ("Conv2d low-rank LOKR", "Conv2dGroups", "lokr", {"targets": ("conv",), "r": 1}),
    ("Conv2d 1x1 LOKR", "Conv2d1x1", "lokr", {"targets": ("conv",)}),
    ("Conv2d Groups LOKR", "Conv2dGroups", "lokr", {"targets": ("conv",)}),
    ("Conv2d Groups2 LOKR", "Conv2dGroups2", "lokr", {"targets": ("conv",)}),
    ("Conv2d decompose LOKR", "Conv2dGroups", "lokr", {"targets": ("conv",), "r": 1, "decompose_both": True,
                                                       "decompose_factor": 4}),
    # OFT: 1x1 kernels here; k > 1 follows peft's forward, which does not merge (and LoHa / LoKr with
    # use_effective_conv2d): tests/test_cp_conv_and_oft_layers.py
    ("Conv2d 1x1 OFT", "Conv2d1x1", "oft", {"targets": ("conv",), "block_size": 4}),
    ("Conv2d 1x1 r OFT", "Conv2d1x1", "oft", {"targets": ("conv",), "r": 2, "use_cayley_neumann": False}),
    ("Conv2d 1x1 2 OFT", "Conv2d1x1", "oft", {"targets": ("conv", "lin0"), "block_size": 4}),
    ("Conv2d 1x1 strided OFT", "Conv2d1x1Strided", "oft", {"targets": ("conv",), "block_size": 3,
                                                           "block_share": True}),
    ("Conv2d 1x1 COFT", "Conv2d1x1", "oft", {"targets": ("conv",), "block_size": 4, "coft": True, "eps": 1e-2}),
    # BOFT: the rotation turns the flattened (C_in·k·k) patch axis of the weight
    ("Conv2d 1 BOFT", "Conv2d", "boft", {"targets": ("conv",), "block_size": 9}),
    ("Conv2d 2 BOFT", "Conv2d", "boft", {"targets": ("conv", "lin0"), "block_num": 5}),
    ("Conv2d 1x1 BOFT", "Conv2d1x1", "boft", {"targets": ("conv",), "block_size": 4}),
    ("Conv2d padded BOFT", "Conv2dPadded", "boft", {"targets": ("conv",), "block_size": 6}),
    ("Conv2d 1x1 strided BOFT", "Conv2d1x1Strided", "boft", {"targets": ("conv",), "block_num": 2}),
]
PARAMS = [pytest.param(model, method, hp, id=name) for name, model, method, hp in CASES]


def adapt(model_name: str, method: str, hp: dict) -> tuple[ConvNet, nn.Module]:
    """(base, the base adapted by peftlab's reference backend, with random adapter weights)."""
    base = build(model_name)
    model = peftlab.adapt(copy.deepcopy(base), method, **hp)
    randomise(model)
    return base, model


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Every trainable tensor (the adapter's) to seeded noise, so zero-initialised factors count."""
    g = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=g) * scale)


def peft_config(method: str, hp: dict, **extra):
    """peft's own config for a case, built from peft's classes (peft's defaults elsewhere)."""
    from peft import BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    kwargs = {("target_modules" if k == "targets" else k): (list(v) if isinstance(v, tuple) else v)
              for k, v in hp.items()}
    renames = {"lora": {"alpha": "lora_alpha"}, "oft": {"block_size": "oft_block_size"},
               "boft": {"block_size": "boft_block_size", "block_num": "boft_block_num",
                        "n_butterfly_factor": "boft_n_butterfly_factor"}}.get(method, {})
    kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
    if method == "oft" and "r" in kwargs:
        kwargs["oft_block_size"] = 0  # peft takes r or oft_block_size (default 32), not both
    if method == "boft" and "boft_block_num" in kwargs:
        kwargs["boft_block_size"] = 0  # likewise boft_block_num or boft_block_size (default 4)
    config = {"lora": LoraConfig, "ia3": IA3Config, "loha": LoHaConfig, "lokr": LoKrConfig,
              "oft": OFTConfig, "boft": BOFTConfig}[method]
    return config(**kwargs, **extra)


def peft_twin(base: ConvNet, model: nn.Module, method: str, hp: dict):
    """peft's model of the same base with exactly the reference model's adapter weights."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that grouped LoRA convolutions do not merge
        theirs = get_peft_model(copy.deepcopy(base), peft_config(method, hp))
    hf_peft.copy_reference_to_peft(model, theirs)
    return theirs


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# parity with peft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_outputs_and_gradients_equal_peft(model_name, method, hp):
    base, ours = adapt(model_name, method, hp)
    theirs = peft_twin(base, ours, method, hp)
    assert trainable(ours) == trainable(theirs)
    x = inputs(base)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=0)
    assert not torch.allclose(out_ours, base(x), atol=1e-3), "the randomised adapter does nothing"

    (out_ours.square().sum()).backward()
    (out_theirs.square().sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=ATOL, rtol=1e-5)
    their_params = dict(theirs.named_parameters())
    for ours_name, their_name in hf_peft.reference_to_peft_names(ours).items():
        mine, theirs_grad = ours.get_parameter(ours_name).grad, their_params[their_name].grad
        scale = theirs_grad.abs().max().item() + 1.0
        torch.testing.assert_close(mine, theirs_grad, atol=ATOL * scale, rtol=1e-5, msg=ours_name)


@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_merge_unmerge_and_disable(model_name, method, hp):
    base, model = adapt(model_name, method, hp)
    x = inputs(base)
    reference, unmerged = base(x), model(x)
    layer = adapted_layers(model)["conv"]
    adapter = layer.adapters["default"]
    weight = layer.base_layer.weight.clone()
    if method == "lora" and layer.base_layer.groups > 1:  # peft: "Merging is not supported"
        with pytest.raises(PeftlabError, match=r"cannot be merged.*groups=\d"):
            peftlab.merge(model)
        assert not layer.merged and torch.equal(layer.base_layer.weight, weight)
    else:
        assert adapter.delta_weight(layer.base_layer).shape == weight.shape
        peftlab.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        peftlab.set_disabled(model, True)  # disabling a merged model takes the merge out
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
        peftlab.set_disabled(model, False)
        peftlab.unmerge(model)
        torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    # after a merge and an unmerge W0 is back up to float32 rounding
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    peftlab.set_disabled(model, True)
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_trainable_parameters_equal_the_closed_form(model_name, method, hp):
    base = build(model_name)
    model = peftlab.adapt(copy.deepcopy(base), method, **hp)
    spec, config = METHODS[method], records(model)["default"].config
    if spec.parameter_count is not None:  # IA3: C_out per output-scaled conv, C_in per feed-forward one
        expected = spec.parameter_count(copy.deepcopy(base), config)
    else:
        names = find_targets(base, config.targets, accept=lambda m: True)
        expected = sum(layer_parameter_count(spec, base.get_submodule(n), config) for n in names)
    assert trainable(model) == expected


def test_closed_forms_by_hand():
    """The conv closed forms against numbers worked out on paper (peft's layouts)."""
    conv = nn.Conv2d(16, 32, 3, padding=1, groups=2)  # K = 9, C_in/g = 8
    count = lambda method, **hp: layer_parameter_count(METHODS[method], conv, METHODS[method].config(**hp))  # noqa: E731
    assert count("lora", r=8) == 8 * 16 * 9 + 32 * 8 // 2  # A (8, 16, 3, 3) + B (32, 4, 1, 1)
    assert count("loha", r=4) == 2 * 4 * (8 * 9 + 32)  # two pairs (32, 4), (4, 72)
    # C_out = 32 = 4·8, C_in/g = 8 = 2·4: W1 (4, 2); r=8 >= max(8, 4)/2, so W2 is full (8, 4, 3, 3)
    assert count("lokr", r=8) == 4 * 2 + 8 * 4 * 9
    assert count("lokr", r=1) == 4 * 2 + 1 * (8 + 4 * 9)  # W2 = (8, 1) @ (1, 4·9)


# --------------------------------------------------------------------------------------------
# saving both ways
# --------------------------------------------------------------------------------------------
def check_saved_by_peftlab_loads_in_peft(base: nn.Module, model: nn.Module, x: torch.Tensor, folder) -> None:
    """peftlab's file loads in peft with the same output, and back in peftlab bit for bit."""
    import warnings

    from peft import PeftModel

    folder = peftlab.save_adapter(model, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        loaded = peftlab.load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(theirs(x), model(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_saved_by_peftlab_loads_in_peft(model_name, method, hp, tmp_path):
    base, model = adapt(model_name, method, hp)
    check_saved_by_peftlab_loads_in_peft(base, model, inputs(base), tmp_path / "adapter")


def check_saved_by_peft_loads_in_peftlab(base: nn.Module, theirs: nn.Module, x: torch.Tensor, folder,
                                         method: str) -> None:
    """A peft model's file loads in peftlab as the same method, with the same output."""
    import warnings

    theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(folder))
        ours = peftlab.load_adapter(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)
    assert records(ours)["default"].method == method


def check_a_step_trains_only(model: nn.Module, x: torch.Tensor, target: torch.Tensor, expected: set[str]) -> None:
    """Three SGD steps on a cross-entropy: the loss falls and only the tensors ``expected`` change."""
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), target)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert changed == expected
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_saved_by_peft_loads_in_peftlab(model_name, method, hp, tmp_path):
    import warnings

    from peft import get_peft_model

    base = build(model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), peft_config(method, hp))
    randomise(theirs, seed=5)
    check_saved_by_peft_loads_in_peftlab(base, theirs, inputs(base), tmp_path / "peft", method)


# --------------------------------------------------------------------------------------------
# the spectra hooks see ΔW as the matrix (C_out, C_in/g · K)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "method", "hp"), [
    ("Conv2d", "lora", {"targets": ("conv",)}), ("Conv2dGroups", "lora", {"targets": ("conv",)}),
    ("Conv2d", "loha", {"targets": ("conv",)}), ("Conv1d", "lokr", {"targets": ("conv",)}),
    ("Conv2d", "lokr", {"targets": ("conv",)}), ("Conv2dGroups", "lokr", {"targets": ("conv",), "r": 1})])
def test_factors_and_singular_values_are_those_of_the_weight_matrix(model_name, method, hp):
    _, model = adapt(model_name, method, hp)
    layer = adapted_layers(model)["conv"]
    adapter, conv = layer.adapters["default"], layer.base_layer
    if hasattr(adapter, "factors"):
        left, right = adapter.factors()
        dense = left @ right  # (C_out, C_in·K): LoRA's A reads every input channel
        if conv.groups == 1:
            torch.testing.assert_close(dense, adapter.delta_weight(conv).flatten(1), atol=1e-5, rtol=1e-5)
        else:  # the grouped forward is the dense kernel's convolution
            x = torch.randn(2, conv.in_channels, 5, 5)
            update = torch.nn.functional.conv2d(x, dense.view(conv.out_channels, conv.in_channels, 3, 3),
                                                padding=1) * 1.0
            torch.testing.assert_close(adapter(x, conv, conv(x)) - conv(x), update, atol=1e-4, rtol=1e-4)
    if hasattr(adapter, "singular_values"):
        matrix = adapter.delta_weight(conv).flatten(1).double()
        expected = torch.linalg.svdvals(matrix)
        torch.testing.assert_close(adapter.singular_values().double(), expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# refusals: clear errors at adapt time, and the model left as it was
# --------------------------------------------------------------------------------------------
REFUSALS = [
    ("Conv2dDilated", "dora", {"targets": ("conv",)}, r"'conv'.*dilation=\(2, 2\).*Expected dilation=1"),
    ("Conv1d", "oft", {"targets": ("conv",)}, r"'conv' is a Conv1d.*no nn\.Conv1d / nn\.Conv3d"),
    ("Conv3d", "oft", {"targets": ("conv",)}, r"'conv' is a Conv3d.*no nn\.Conv1d / nn\.Conv3d"),
    ("Conv1d", "boft", {"targets": ("conv",)}, r"'conv' is a Conv1d.*no nn\.Conv1d / nn\.Conv3d"),
    ("Conv3d", "boft", {"targets": ("conv",)}, r"'conv' is a Conv3d.*no nn\.Conv1d / nn\.Conv3d"),
    ("Conv2dGroups", "boft", {"targets": ("conv",), "block_size": 4}, r"groups=2.*Expected groups=1"),
    ("Conv2dDilated", "oft", {"targets": ("conv",), "block_size": 4}, r"dilation=\(2, 2\).*Expected dilation=1"),
    ("Conv2dDilated", "boft", {"targets": ("conv",), "block_size": 4}, r"dilation=\(2, 2\).*Expected dilation=1"),
    ("Conv2dStrided", "boft", {"targets": ("conv",), "block_size": 2},
     r"kernel_size=\(3, 2\), stride=\(2, 1\), padding=\(1, 0\).*Expected a square kernel"),
    ("Conv2dUneven", "boft", {"targets": ("conv",), "block_size": 4}, r"stride=\(2, 1\) is not.*Expected a square kernel"),
    ("Conv2d", "boft", {"targets": ("conv",)}, r"block_size=4 .*d_in=45.*Expected block_size in \[1, 3, 5, 9, 15, 45\]"),
    ("Conv2d1x1", "oft", {"targets": ("conv",)},
     r"block_size=32 does not fit a layer with d_in=8.*Expected block_size in \[2, 4, 8\]"),
    ("Conv2d", "vera", {"targets": ("conv",)}, r"'conv' is a Conv2d"),
    ("Conv3d", "adalora", {"targets": ("conv",), "total_step": 10}, r"'conv' is a Conv3d.*an nn\.Conv2d"),
    ("Conv2d", "loftq", {"targets": ("conv",)}, r"'conv' is a Conv2d"),
    ("Conv2d", "bottleneck", {"targets": ("conv",)}, r"'conv' is a Conv2d"),
    ("Conv3d", "loha", {"targets": ("conv",)}, r"'conv' is a Conv3d.*no nn\.Conv3d"),
    ("Conv3d", "lokr", {"targets": ("conv",)}, r"'conv' is a Conv3d.*no nn\.Conv3d"),
    ("Conv1d", "ia3", {"targets": ("conv",), "feedforward_modules": ()}, r"'conv' is a Conv1d.*no nn\.Conv1d"),
    ("Conv1dStrided", "lora", {"targets": ("conv",), "r": 4}, r"'conv'.*dilation=\(2,\).*Expected dilation=1"),
    ("Conv2dGroups2", "lora", {"targets": ("conv",), "r": 6}, r"r=6 is not a multiple of the layer's groups=4.*try r=4"),
    ("Conv2d", "lora", {"targets": ("conv",), "init": "loftq"}, r"LoftQ initialises linear layers only"),
]


@pytest.mark.parametrize(("model_name", "method", "hp", "match"), REFUSALS,
                         ids=[f"{m}-{method}-{'-'.join(f'{k}={v}' for k, v in hp.items() if k != 'targets')}"
                              for m, method, hp, _ in REFUSALS])
def test_unsupported_conv_cases_are_refused_clearly(model_name, method, hp, match):
    model = build(model_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match) as err:
        peftlab.adapt(model, method, **hp)
    assert "Expected" in str(err.value) and "ry" in str(err.value)  # what was expected, what to try
    assert not adapted_layers(model), "a refused adapt must leave the model alone"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_rank_above_the_kernel_matrix_is_a_warning():
    """ΔW as a matrix is C_out x (C_in·K) = 10 x 45: r=16 > 10 is redundant, not invalid (peft allows it)."""
    with pytest.warns(peftlab.PeftlabWarning, match=r"r=16 is above min\(d_out, d_in\) = 10 for a 10 x 45 layer"):
        model = peftlab.adapt(build("Conv2d"), "lora", targets=("conv",), r=16)
    assert adapted_layers(model)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "boft"])
def test_padding_other_than_zeros_is_refused(method, padding_mode):
    """peft's adapter path pads with zeros while the base pads its own way: merging would then
    change the output, so peftlab refuses instead of computing something else."""
    torch.manual_seed(0)
    model = ConvNet(nn.Conv2d(5, 10, 3, padding=1, padding_mode=padding_mode), (5, 6, 6))
    with pytest.raises(ConfigError, match=rf"padding_mode='{padding_mode}'.*Expected padding_mode='zeros'"):
        peftlab.adapt(model, method, targets=("conv",))


def test_ia3_on_a_reflect_padded_conv_is_exact():
    """IA3 scales channels, which commutes with any padding: merging stays exact there."""
    torch.manual_seed(0)
    base = ConvNet(nn.Conv2d(5, 10, 3, padding=1, padding_mode="reflect"), (5, 6, 6))
    for feedforward in ((), ("conv",)):
        model = peftlab.adapt(copy.deepcopy(base), "ia3", targets=("conv",), feedforward_modules=feedforward)
        randomise(model)
        x = inputs(base)
        unmerged = model(x)
        peftlab.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_oft_on_a_reflect_padded_1x1_conv_is_exact():
    """OFT on a 1x1 kernel turns each pixel's channels, which commutes with any padding."""
    torch.manual_seed(0)
    base = ConvNet(nn.Conv2d(8, 10, 1, padding=1, padding_mode="reflect"), (8, 5, 5))
    model = peftlab.adapt(copy.deepcopy(base), "oft", targets=("conv",), block_size=4)
    randomise(model)
    x = inputs(base)
    unmerged = model(x)
    peftlab.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_boft_butterfly_factors_on_a_conv_equal_peft(monkeypatch):
    """n_butterfly_factor=2 on a 3x3 conv: peft builds more than one factor only with its CUDA
    kernel, so a torch.block_diag stand-in for it (as tests/test_methods_orthogonal.py) runs peft's
    own multi-factor code on CPU."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", object())
    monkeypatch.setattr(boft_layer.FastBlockDiag, "apply",
                        staticmethod(lambda blocks: torch.stack([torch.block_diag(*level) for level in blocks])))
    hp = {"targets": ("conv",), "block_size": 6, "n_butterfly_factor": 2}  # C_in·k·k = 36: 6 blocks, paired once
    base, ours = adapt("Conv2dPadded", "boft", hp)
    theirs = peft_twin(base, ours, "boft", hp)
    assert trainable(ours) == trainable(theirs) == layer_parameter_count(
        METHODS["boft"], base.conv, records(ours)["default"].config)
    x = inputs(base)
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)
    unmerged = ours(x)
    peftlab.merge(ours)
    torch.testing.assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-5)


def test_a_step_trains_only_the_conv_adapter():
    base = build("Conv2d")
    model = peftlab.adapt(copy.deepcopy(base), "lora", targets=("conv",))
    check_a_step_trains_only(model, inputs(base), torch.tensor([0, 5]),
                             {"conv.adapters.default.lora_A", "conv.adapters.default.lora_B"})


@pytest.mark.parametrize(("model_name", "method", "hp"),
                         [p for p in PARAMS if p.id in ("Conv2d 2 LoRA", "Conv3d 1 LoRA", "Conv2d Groups IA3",
                                                        "Conv1d LOHA 1", "Conv2d 1 LOKR")])
def test_peft_backend_adapts_convolutions(model_name, method, hp):
    """backend="peft" builds peft's own model on the same conv targets, equal to the reference."""
    base, ours = adapt(model_name, method, hp)
    theirs = peftlab.adapt(copy.deepcopy(base), method, backend="peft", **hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    x = inputs(base)
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)
