"""DoRA on nn.Embedding and nn.Conv1d/2d/3d, AdaLoRA on nn.Conv2d, proven equal to Hugging Face peft.

peft 0.21.2 puts DoRA (``LoraConfig(use_dora=True)``) on embeddings and on every convolution, and
AdaLoRA (its ``SVDConv2d``) on nn.Conv2d. Each case below, on a small seeded model of our own:

- same weights (copied through peftlab's bridge) -> same outputs and gradients as peft's own layer,
  fp32, and the same trainable count as peft's, which is also the method's closed form;
- a file saved by peft loads in peftlab, and one saved by peftlab loads in peft, with equal outputs;
- merged == unmerged, unmerge gives W0 back, disabled == base (a grouped DoRA conv refuses to
  merge, as peft does);
- AdaLoRA's budget prunes the same singular values of a conv as peft's.

Then the refusals: what peft cannot run (AdaLoRA on Conv1d/Conv3d/embeddings, or on a grouped
Conv2d, where its forward fails), or runs differently from its merge, fails at adapt time with a
ConfigError that says what was wrong, what was expected and what to try.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.api import records
from peftlab.errors import ConfigError, PeftlabError
from peftlab.inject import adapted_layers, find_targets
from peftlab.methods import METHODS, adalora, layer_parameter_count
from peftlab.methods.dora import dora_stats
from peftlab.production import hf_peft
from tests.test_conv_layers import (check_a_step_trains_only, check_saved_by_peft_loads_in_peftlab,
                                    check_saved_by_peftlab_loads_in_peft)

ATOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


class Net(nn.Module):
    """One layer under test (``emb`` or ``conv``), a ReLU and a linear head ``lin0``."""

    def __init__(self, layer: nn.Module, example: tuple[int, ...]) -> None:
        super().__init__()
        self.example = example  # one input's shape: (T,) token ids, or (C_in, *spatial)
        self.kind = "emb" if isinstance(layer, nn.Embedding) else "conv"
        setattr(self, self.kind, layer)
        with torch.no_grad():
            features = self.body(torch.zeros(1, *example, dtype=self.dtype)).numel()
        self.lin0 = nn.Linear(features, 8)

    @property
    def dtype(self) -> torch.dtype:
        return torch.long if self.kind == "emb" else torch.float32

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(getattr(self, self.kind)(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.body(x))


# name -> (layer, one input's shape); seeded in build() so every build has the same weights
MODELS = {
    "Embedding": (lambda: nn.Embedding(40, 12), (6,)),
    "EmbeddingPadded": (lambda: nn.Embedding(40, 12, padding_idx=0), (6,)),
    "Conv1d": (lambda: nn.Conv1d(4, 12, 3, padding=1), (4, 9)),
    "Conv2d": (lambda: nn.Conv2d(5, 10, 3), (5, 7, 7)),
    "Conv2d1x1": (lambda: nn.Conv2d(8, 16, 1), (8, 5, 5)),
    "Conv2dStrided": (lambda: nn.Conv2d(6, 12, (3, 2), stride=(2, 1), padding=(1, 0)), (6, 8, 6)),
    "Conv2dDilated": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2), (4, 9, 9)),
    "Conv2dGroups": (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 5, 5)),
    "Conv2dReflect": (lambda: nn.Conv2d(5, 10, 3, padding=1, padding_mode="reflect"), (5, 6, 6)),
    "Conv3d": (lambda: nn.Conv3d(5, 10, 3), (5, 4, 5, 5)),
    "EmbeddingMaxNorm": (lambda: nn.Embedding(40, 12, max_norm=1.0), (6,)),
}


def build(name: str) -> Net:
    torch.manual_seed(0)
    make, example = MODELS[name]
    return Net(make(), example)


def inputs(model: Net, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model.kind == "emb":  # token ids, padding id 0 among them
        ids = torch.randint(0, model.emb.num_embeddings, (2, *model.example), generator=g)
        ids[:, 0] = 0
        return ids
    return torch.randn(2, *model.example, generator=g)


# (case id, model, method, hyperparameters in peftlab's names)
CASES = [
    ("Embedding DoRA", "Embedding", "dora", {"targets": ("emb",)}),
    ("Embedding padded DoRA", "EmbeddingPadded", "dora", {"targets": ("emb",), "r": 4, "alpha": 16.0}),
    ("Embedding + linear DoRA", "Embedding", "dora", {"targets": ("emb", "lin0"), "use_rslora": True}),
    ("Conv1d DoRA", "Conv1d", "dora", {"targets": ("conv",)}),
    ("Conv2d DoRA", "Conv2d", "dora", {"targets": ("conv",)}),
    ("Conv2d + linear DoRA", "Conv2d", "dora", {"targets": ("conv", "lin0"), "init": "gaussian"}),
    ("Conv2d 1x1 DoRA", "Conv2d1x1", "dora", {"targets": ("conv",), "r": 4}),
    ("Conv2d strided DoRA", "Conv2dStrided", "dora", {"targets": ("conv",), "r": 4, "alpha": 16.0,
                                                      "use_rslora": True}),
    ("Conv2d groups DoRA", "Conv2dGroups", "dora", {"targets": ("conv",)}),
    ("Conv3d DoRA", "Conv3d", "dora", {"targets": ("conv",)}),
    ("Conv2d AdaLoRA", "Conv2d", "adalora", {"targets": ("conv",), "total_step": 10}),
    ("Conv2d + linear AdaLoRA", "Conv2d", "adalora", {"targets": ("conv", "lin0"), "total_step": 10,
                                                      "init_r": 4, "target_r": 2, "alpha": 16.0}),
    ("Conv2d 1x1 AdaLoRA", "Conv2d1x1", "adalora", {"targets": ("conv",), "total_step": 10}),
    ("Conv2d dilated AdaLoRA", "Conv2dDilated", "adalora", {"targets": ("conv",), "total_step": 10,
                                                            "init_r": 6, "target_r": 3}),
]
PARAMS = [pytest.param(model, method, hp, id=name) for name, model, method, hp in CASES]


def peft_config(method: str, hp: dict, **extra):
    """peft's own config for a case, from peft's classes (peft's defaults elsewhere)."""
    from peft import AdaLoraConfig, LoraConfig

    renames = {"targets": "target_modules", "alpha": "lora_alpha", "dropout": "lora_dropout"}
    kwargs = {renames.get(k, k): (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()}
    if method == "dora":
        if "init" in kwargs:
            kwargs["init_lora_weights"] = {"kaiming": True, "gaussian": "gaussian"}[kwargs.pop("init")]
        return LoraConfig(use_dora=True, **kwargs, **extra)
    return AdaLoraConfig(**kwargs, **extra)


def get_peft(base: Net, method: str, hp: dict, **extra):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that grouped convolutions do not merge
        return get_peft_model(copy.deepcopy(base), peft_config(method, hp, **extra))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> None:
    """Every trainable tensor (the adapter's) to seeded noise, so that zero-initialised B and Λ
    count, and the magnitudes differ from the norms."""
    g = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)


def adapt(model_name: str, method: str, hp: dict) -> tuple[Net, nn.Module]:
    """(base, the base adapted by peftlab's reference backend, with random adapter weights)."""
    base = build(model_name)
    model = peftlab.adapt(copy.deepcopy(base), method, **hp)
    randomise(model)
    return base, model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def closed_form(base: Net, method: str, config) -> int:
    names = find_targets(base, config.targets, accept=lambda m: True)
    return sum(layer_parameter_count(METHODS[method], base.get_submodule(n), config) for n in names)


# --------------------------------------------------------------------------------------------
# parity with peft: outputs, gradients, trainable counts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_outputs_and_gradients_equal_peft(model_name, method, hp):
    base, ours = adapt(model_name, method, hp)
    theirs = get_peft(base, method, hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    assert trainable(ours) == trainable(theirs) == closed_form(base, method, records(ours)["default"].config)
    x = inputs(base)
    floating = x.is_floating_point()
    x_ours, x_theirs = (x.clone().requires_grad_(), x.clone().requires_grad_()) if floating else (x, x)
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=0)
    assert not torch.allclose(out_ours, base(x), atol=1e-3), "the randomised adapter does nothing"

    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    if floating:
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=ATOL, rtol=1e-5)
    their_params = dict(theirs.named_parameters())
    for ours_name, their_name in hf_peft.reference_to_peft_names(ours).items():
        mine, theirs_grad = ours.get_parameter(ours_name).grad, their_params[their_name].grad
        scale = theirs_grad.abs().max().item() + 1.0
        torch.testing.assert_close(mine, theirs_grad, atol=ATOL * scale, rtol=1e-5, msg=ours_name)
    if model_name == "EmbeddingPadded":  # the padding id's column of A gets no gradient, as in peft
        assert ours.emb.adapters["default"].lora_A.grad[:, 0].abs().max() == 0


@pytest.mark.parametrize("model_name", ["Embedding", "Conv2d", "Conv2dGroups"])
def test_dropout_in_training_equals_peft(model_name):
    """With dropout on, in training mode, both recompute W0 dropout(x) and draw the same mask."""
    hp = {"targets": (build(model_name).kind,), "dropout": 0.3}
    base, ours = adapt(model_name, "dora", hp)
    theirs = get_peft(base, "dora", hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    ours.train(), theirs.train()
    x = inputs(base)
    torch.manual_seed(7)
    out_ours = ours(x)
    torch.manual_seed(7)
    out_theirs = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=0)
    out_ours.sum().backward(), out_theirs.sum().backward()
    their_params = dict(theirs.named_parameters())
    for ours_name, their_name in hf_peft.reference_to_peft_names(ours).items():
        torch.testing.assert_close(ours.get_parameter(ours_name).grad, their_params[their_name].grad,
                                   atol=1e-5, rtol=1e-5, msg=ours_name)


def test_closed_forms_by_hand():
    """The new layers' closed forms against numbers worked out on paper (peft's layouts)."""
    count = lambda method, layer, **hp: layer_parameter_count(METHODS[method], layer, METHODS[method].config(**hp))  # noqa: E731
    grouped = nn.Conv2d(16, 32, 3, padding=1, groups=2)  # K = 9
    # A (8, 16, 3, 3), B (32, 4, 1, 1), m (1, 32, 1, 1)
    assert count("dora", grouped, r=8) == 8 * 16 * 9 + 32 * 4 + 32
    assert count("dora", nn.Conv1d(4, 12, 3), r=2) == 2 * 4 * 3 + 12 * 2 + 12
    # A (r, vocab), B (dim, r), m (dim,): one magnitude per embedding dimension
    assert count("dora", nn.Embedding(40, 12), r=4) == 4 * (40 + 12) + 12
    # Q (12, 5·3·3), P (10, 12), Λ (12, 1)
    assert count("adalora", nn.Conv2d(5, 10, 3), total_step=4) == 12 * 45 + 10 * 12 + 12


# --------------------------------------------------------------------------------------------
# saving both ways
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_saved_by_peft_loads_in_peftlab(model_name, method, hp, tmp_path):
    base = build(model_name)
    theirs = get_peft(base, method, hp)
    randomise(theirs, seed=5)
    with torch.no_grad():
        check_saved_by_peft_loads_in_peftlab(base, theirs, inputs(base), tmp_path / "peft", method)


@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_saved_by_peftlab_loads_in_peft(model_name, method, hp, tmp_path):
    base, model = adapt(model_name, method, hp)
    with torch.no_grad():
        check_saved_by_peftlab_loads_in_peft(base, model.eval(), inputs(base), tmp_path / "adapter")


# --------------------------------------------------------------------------------------------
# merging: generic, through delta_weight
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "method", "hp"), PARAMS)
def test_merge_unmerge_and_disable(model_name, method, hp):
    base, model = adapt(model_name, method, hp)
    model.eval()
    x = inputs(base)
    with torch.no_grad():
        reference, unmerged = base(x), model(x)
    layer = adapted_layers(model)[base.kind]
    weight = layer.base_layer.weight.clone()
    if getattr(layer.base_layer, "groups", 1) > 1:  # peft: "Merging is not supported"
        with pytest.raises(PeftlabError, match=r"cannot be merged.*groups=2.*peft refuses too"):
            peftlab.merge(model)
        assert not layer.merged and torch.equal(layer.base_layer.weight, weight)
    else:
        assert layer.adapters["default"].delta_weight(layer.base_layer).shape == weight.shape
        peftlab.merge(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        peftlab.unmerge(model)
        torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    peftlab.set_disabled(model, True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)


def test_merged_weight_equals_peft_merge():
    """peft's own merge_and_unload gives the weight that peftlab's merge gives."""
    for model_name, target in (("Embedding", "emb"), ("Conv2d", "conv"), ("Conv3d", "conv")):
        hp = {"targets": (target,)}
        base, ours = adapt(model_name, "dora", hp)
        theirs = get_peft(base, "dora", hp)
        hf_peft.copy_reference_to_peft(ours, theirs)
        merged_theirs = theirs.merge_and_unload()
        peftlab.merge(ours)
        torch.testing.assert_close(adapted_layers(ours)[target].base_layer.weight,
                                   getattr(merged_theirs, target).weight, atol=1e-5, rtol=1e-5)


def test_dora_stats_on_new_layers():
    """ΔM and ΔD per layer for embeddings and ungrouped convs; a grouped conv has no W' and is left out."""
    _, model = adapt("Conv2d", "dora", {"targets": ("conv", "lin0")})
    stats = dora_stats(model)
    assert set(stats) == {"conv", "lin0"} and all(v["direction_change"] > 0 for v in stats.values())
    _, model = adapt("Embedding", "dora", {"targets": ("emb",)})
    assert dora_stats(model)["emb"]["magnitude_change"] > 0
    _, model = adapt("Conv2dGroups", "dora", {"targets": ("conv",)})
    with pytest.raises(ConfigError, match="no DoRA adapter"):
        dora_stats(model)


@pytest.mark.parametrize(("model_name", "method", "hp"), [
    ("Conv2d", "dora", {"targets": ("conv",)}), ("Conv3d", "dora", {"targets": ("conv",)}),
    ("Conv2d", "adalora", {"targets": ("conv",), "total_step": 4})])
def test_spectra_read_a_conv_update_as_the_weight_matrix(model_name, method, hp):
    """The spectra see ΔW as the matrix (C_out, C_in·K), as for every other conv adapter."""
    from peftlab.spectra import spectrum

    _, model = adapt(model_name, method, hp)
    layer = adapted_layers(model)["conv"]
    matrix = layer.adapters["default"].delta_weight(layer.base_layer).detach().flatten(1)  # (C_out, C_in·K)
    expected = torch.linalg.svdvals(matrix)
    got = spectrum(model)["conv"]
    k = min(len(got), len(expected))  # AdaLoRA's factors give init_r values, beyond the rank all 0
    torch.testing.assert_close(got[:k], expected[:k], atol=1e-4, rtol=1e-4)
    assert all(rest.abs().sum() < 1e-4 for rest in (got[k:], expected[k:]))


def test_a_step_trains_only_the_conv_dora_adapter():
    base = build("Conv2d")
    model = peftlab.adapt(copy.deepcopy(base), "dora", targets=("conv",))
    assert torch.equal(model(inputs(base)), base(inputs(base))), "B = 0: DoRA starts at the base model"
    check_a_step_trains_only(model, inputs(base), torch.tensor([0, 5]),
                             {f"conv.adapters.default.{p}" for p in ("lora_A", "lora_B", "magnitude")})


# --------------------------------------------------------------------------------------------
# AdaLoRA's budget on a conv: the same triplets pruned as peft prunes
# --------------------------------------------------------------------------------------------
def test_adalora_conv_allocation_equals_peft():
    hp = {"targets": ("conv", "lin0"), "total_step": 6, "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}
    base, ours = adapt("Conv2d", "adalora", hp)
    theirs = get_peft(base, "adalora", hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    names = hf_peft.reference_to_peft_names(ours)
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    opt_ours = torch.optim.SGD([ours_params[n] for n in names], lr=1e-3)  # small: the random
    opt_theirs = torch.optim.SGD([their_params[n] for n in names.values()], lr=1e-3)  # start is far off
    x, target = inputs(base), torch.tensor([1, 6])
    pruned = 0
    for step in range(hp["total_step"]):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
        adalora.update_and_allocate(ours, step)
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad(), opt_theirs.zero_grad()
        if theirs.peft_config["default"].rank_pattern is not None:
            assert adalora.rank_pattern(ours) == theirs.peft_config["default"].rank_pattern, f"step {step}"
            pruned += 1
        for mine, their_name in names.items():
            torch.testing.assert_close(ours_params[mine], their_params[their_name], atol=1e-5, rtol=0)
    assert pruned >= 3
    ranks = adalora.rank_allocation(ours)
    assert sum(ranks.values()) == 2 * 2 and len(set(ranks.values())) > 1  # target_r · 2 layers, moved


# --------------------------------------------------------------------------------------------
# refusals: clear errors at adapt time, and the model left as it was
# --------------------------------------------------------------------------------------------
REFUSALS = [
    ("Conv2dDilated", "dora", {"targets": ("conv",)}, r"'conv'.*dilation=\(2, 2\).*Expected dilation=1"),
    ("Conv2dGroups", "dora", {"targets": ("conv",), "r": 3}, r"r=3 is not a multiple of the layer's groups=2.*try r=2"),
    ("Conv2dReflect", "dora", {"targets": ("conv",)}, r"padding_mode='reflect'.*Expected padding_mode='zeros'"),
    ("EmbeddingMaxNorm", "dora", {"targets": ("emb",)}, r"'emb'.*max_norm=1\.0.*in place.*Expected max_norm=None"),
    ("Conv1d", "adalora", {"targets": ("conv",), "total_step": 4}, r"'conv' is a Conv1d.*no nn\.Conv1d / nn\.Conv3d; method 'lora'"),
    ("Conv3d", "adalora", {"targets": ("conv",), "total_step": 4}, r"'conv' is a Conv3d.*an nn\.Conv2d"),
    ("Embedding", "adalora", {"targets": ("emb",), "total_step": 4}, r"'emb' is a Embedding.*no embedding"),
    ("Conv2dGroups", "adalora", {"targets": ("conv",), "total_step": 4},
     r"'conv'.*groups=2.*144 columns.*\(32, 8, 3, 3\).*Expected groups=1; try method 'lora'"),
    ("Conv2dReflect", "adalora", {"targets": ("conv",), "total_step": 4}, r"AdaLoRA.*padding_mode='reflect'"),
]


@pytest.mark.parametrize(("model_name", "method", "hp", "match"), REFUSALS,
                         ids=[f"{m}-{method}" + (f"-r{hp['r']}" if "r" in hp else "") for m, method, hp, _ in REFUSALS])
def test_unsupported_cases_are_refused_clearly(model_name, method, hp, match):
    model = build(model_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match) as err:
        peftlab.adapt(model, method, **hp)
    assert "Expected" in str(err.value) and "ry" in str(err.value)  # what was expected, what to try
    assert not adapted_layers(model), "a refused adapt must leave the model alone"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("model_name", "target", "where"), [
    ("Conv1d", "conv", "build"), ("Conv3d", "conv", "build"), ("Embedding", "emb", "build"),
    ("Conv2dGroups", "conv", "forward")])
def test_peft_cannot_run_what_peftlab_refuses_for_adalora(model_name, target, where):
    """The AdaLoRA refusals above are peft's own limits: it refuses these layers while building
    (ValueError), or builds a grouped Conv2d whose forward cannot reshape P Λ Q (RuntimeError)."""
    base = build(model_name)
    hp = {"targets": (target,), "total_step": 4}
    if where == "build":
        with pytest.raises(ValueError, match="is not supported"):
            get_peft(base, "adalora", hp)
    else:
        theirs = get_peft(base, "adalora", hp)
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            theirs(inputs(base))
