"""peft's newer method families, from scratch, proven equal to peft 0.21.2: HRA, RoAd, MiSS,
FourierFT, SHiRA, VB-LoRA, LN tuning and standalone trainable tokens.

Same weights -> same outputs and same gradients (fp32, atol 1e-5) through the weight bridge in
both directions, on the tiny Llama and the tiny BERT; the same saved tensor names, and peft's
saved tensors load into the reference; the same merged weights; each method's own promises
(H orthogonal, R's rotation form, MiSS's shared shard, FourierFT's and SHiRA's locations, VB-LoRA's
top-k file), ``peftlab.adapt(model, NAME)`` with defaults, and the errors where a default cannot fit.
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

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # peft warns about layer types it does not know (norms), not our concern
        warnings.simplefilter("ignore")
        yield


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable tensor away from its init (zero spectra, zero shards, R = I)."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(0.1 * torch.randn(param.shape, generator=gen))


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, loss) for a causal LM (next-token loss) or a classifier (labels from ids)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "CausalLM" in type(inner).__name__:
        out = model(input_ids=ids, labels=ids)
    else:
        out = model(input_ids=ids, labels=ids[:, 0] % 2)
    return out.logits, out.loss


def trained_pairs(reference, theirs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ours, theirs) for every trained tensor: per-layer ones and shared ones (VB-LoRA's bank)."""
    params = dict(theirs.named_parameters())
    pairs = [(reference.get_parameter(ours), params[name])
             for ours, name in hf_peft.reference_to_peft_names(reference).items()]
    pairs += [(tensor, theirs.get_parameter(name)) for name, tensor in hf_peft.shared_tensors(reference).items()
              if tensor.requires_grad]
    return pairs


def assert_same(reference, theirs, ids) -> None:
    """Outputs and the gradient of every trained tensor agree."""
    for model in (reference, theirs):
        model.zero_grad()
    (ours_out, ours_loss), (their_out, their_loss) = loss_of(reference, ids), loss_of(theirs, ids)
    ours_loss.backward()
    their_loss.backward()
    assert (ours_out - their_out).abs().max().item() < ATOL
    pairs = trained_pairs(reference, theirs)
    assert pairs
    for ours, their in pairs:
        assert (ours.grad - their.grad).abs().max().item() < ATOL


def build_pair(model, method: str, **hp):
    torch.manual_seed(0)
    reference = peftlab.adapt(copy.deepcopy(model), method, **hp)
    theirs = peftlab.adapt(copy.deepcopy(model), method, backend="peft", **hp)
    return reference, theirs


TOKENS = (5, 17, 40, 300)
CASES = [  # (fixture, method, hyperparameters)
    ("tiny_llama", "hra", {}),
    ("tiny_llama", "hra", {"r": 5, "apply_GS": True, "targets": "all-linear"}),
    ("tiny_bert", "hra", {"r": 4}),
    ("tiny_llama", "road", {"group_size": 16}),
    ("tiny_llama", "road", {"group_size": 8, "variant": "road_2", "targets": "all-linear"}),
    ("tiny_bert", "road", {"group_size": 32, "variant": "road_4"}),
    ("tiny_llama", "miss", {}),
    ("tiny_llama", "miss", {"r": 24, "targets": "all-linear"}),  # d_in not a multiple of r: padded
    ("tiny_llama", "miss", {"r": 16, "init_weights": "bat"}),
    ("tiny_bert", "miss", {"r": 8, "init_weights": "mini", "mini_r": 4}),
    ("tiny_llama", "fourierft", {}),
    ("tiny_llama", "fourierft", {"n_frequency_pattern": {"v_proj": 50, r"layers\.1\.self_attn\.q_proj": 70}}),
    ("tiny_bert", "fourierft", {"n_frequency": 200, "scaling": 10.0, "random_loc_seed": 3, "init_weights": True}),
    ("tiny_llama", "shira", {"r": 4}),
    ("tiny_bert", "shira", {"r": 2, "random_seed": 11, "init_weights": False}),
    ("tiny_llama", "vblora", {"num_vectors": 32, "vector_length": 16}),
    ("tiny_bert", "vblora", {"num_vectors": 16, "vector_length": 32, "topk": 3, "r": 2}),
    ("tiny_llama", "ln_tuning", {}),
    ("tiny_bert", "ln_tuning", {}),
    ("tiny_llama", "trainable_tokens", {"token_indices": TOKENS}),  # tied head: it reads the same rows
    ("tiny_bert", "trainable_tokens", {"token_indices": TOKENS, "init_weights": False}),
]


@pytest.mark.parametrize("arch, method, hp", CASES)
def test_same_outputs_and_gradients_as_peft(request, arch, method, hp):
    model, _ = request.getfixturevalue(arch)
    reference, theirs = build_pair(model, method, **hp)
    ids = torch.tensor([[5, 17, 40, 300, 9, 77, 123, 5, 600], [40, 8, 17, 300, 2, 5, 99, 41, 12]])

    # peftlab -> peft
    randomise(reference, seed=1)
    hf_peft.copy_reference_to_peft(reference, theirs)
    assert_same(reference, theirs, ids)

    # peft -> peftlab, with other weights
    randomise(theirs, seed=2)
    hf_peft.copy_peft_to_reference(theirs, reference)
    assert_same(reference, theirs, ids)

    # the saved tensors: peft's names, and loading peft's state dict gives its weights
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(theirs)
    ours = hf_peft.reference_state_dict(reference)
    assert set(ours) == set(saved)  # trainable tokens: the tied head's rows too, the same tensor twice
    randomise(reference, seed=3)
    hf_peft.load_reference_state_dict(reference, saved)
    for name, tensor in hf_peft.reference_state_dict(reference).items():
        assert torch.equal(tensor, saved[name]), name


MERGED = [("hra", {"r": 4}), ("road", {"group_size": 16}), ("miss", {"r": 16}),
          ("miss", {"r": 16, "init_weights": "bat"}), ("fourierft", {"n_frequency": 64}), ("shira", {"r": 2}),
          ("vblora", {"num_vectors": 32, "vector_length": 16}), ("ln_tuning", {}),
          ("hira", {"r": 4}), ("c3a", {"block_size": 16})]


@pytest.mark.parametrize("method, hp", MERGED)
def test_merged_weights_match_peft(tiny_bert, method, hp):
    model, _ = tiny_bert
    reference, theirs = build_pair(model, method, **hp)
    randomise(reference, seed=4)
    hf_peft.copy_reference_to_peft(reference, theirs)
    ids = torch.tensor([[101, 7, 99, 2000, 102]])
    unmerged = loss_of(reference, ids)[0]
    name = next(iter(adapted_layers(reference)))
    base_weight = reference.get_submodule(name).base_layer.weight.detach().clone()
    peftlab.merge(reference)
    theirs.merge_adapter()
    ours_w = reference.get_submodule(name).base_layer.weight
    their_w = theirs.get_submodule("base_model.model." + name).get_base_layer().weight
    assert torch.allclose(ours_w, their_w, atol=1e-6)
    assert not torch.allclose(ours_w, base_weight, atol=1e-4)
    assert torch.allclose(loss_of(reference, ids)[0], unmerged, atol=ATOL)
    peftlab.unmerge(reference)
    assert torch.allclose(reference.get_submodule(name).base_layer.weight, base_weight, atol=1e-6)


def test_hra_reflections_are_orthogonal_and_start_at_identity(tiny_llama):
    model, _ = tiny_llama
    adapter = peftlab.adapt(model, "hra").model.layers[0].self_attn.q_proj.adapters["default"]
    assert torch.allclose(adapter.householder(), torch.eye(64), atol=1e-6)  # equal pairs cancel
    randomise(adapter, seed=5)
    H = adapter.householder()
    assert torch.allclose(H @ H.T, torch.eye(64), atol=1e-5)
    # the update W0 H - W0 = W0 (H - I) has rank at most r = 8
    assert torch.linalg.matrix_rank(H - torch.eye(64), atol=1e-4) <= 8


def test_road_rotates_pairs_of_outputs():
    from peftlab.methods.road import RoAd, RoadConfig

    adapter = RoAd(torch.nn.Linear(3, 8), RoadConfig(group_size=4))
    with torch.no_grad():
        adapter.road_theta.copy_(torch.tensor([0.3, -1.0, 0.5, 2.0]))
        adapter.road_alpha.copy_(torch.tensor([2.0, 1.0, 0.5, 3.0]))
    h = torch.randn(8)
    y = adapter.rotate(h)
    # group 1 (features 0..3): 0 pairs with 2, 1 with 3; θ, α of the pair: road_1 shares them
    for i, j, theta, alpha in ((0, 2, 0.3, 2.0), (1, 3, -1.0, 1.0), (4, 6, 0.5, 0.5), (5, 7, 2.0, 3.0)):
        c, s = alpha * torch.cos(torch.tensor(theta)), alpha * torch.sin(torch.tensor(theta))
        assert torch.allclose(y[i], c * h[i] - s * h[j], atol=1e-6)
        assert torch.allclose(y[j], s * h[i] + c * h[j], atol=1e-6)
    assert torch.allclose(adapter.rotation() @ h, y, atol=1e-6)


def test_miss_shares_one_shard_across_input_blocks():
    from peftlab.methods.miss import MiSS, MissConfig

    base = torch.nn.Linear(10, 3, bias=False)
    adapter = MiSS(base, MissConfig(r=4))
    with torch.no_grad():
        adapter.miss_block.copy_(torch.randn(4, 3))
    delta = adapter.delta_weight(base)  # (3, 10): [Dᵀ Dᵀ Dᵀ[:, :2]]
    D = adapter.miss_block.T
    assert torch.equal(delta[:, :4], D) and torch.equal(delta[:, 4:8], D) and torch.equal(delta[:, 8:], D[:, :2])
    x = torch.randn(2, 10)
    assert torch.allclose(adapter(x, base, base(x)), x @ (base.weight + delta).T, atol=1e-6)


def test_fourierft_and_shira_draw_peft_s_locations(tiny_llama):
    model, _ = tiny_llama
    for method, hp, ours_of, theirs_of in (
        ("fourierft", {}, lambda a: a.indices, lambda m: m.indices["default"]),
        ("shira", {"r": 4, "random_seed": 7}, lambda a: a.shira_indices, lambda m: m.shira_indices["default"]),
    ):
        reference, theirs = build_pair(model, method, **hp)
        for name, layer in adapted_layers(reference).items():
            their_layer = theirs.get_submodule("base_model.model." + name)
            assert torch.equal(ours_of(layer.adapters["default"]).long(), theirs_of(their_layer).long().to("cpu"))


def test_fourierft_n_frequency_pattern_sets_n_by_layer_name(tiny_llama):
    model, _ = tiny_llama
    adapted = peftlab.adapt(model, "fourierft", n_frequency_pattern={"v_proj": 50})
    sizes = {n: l.adapters["default"].fourierft_spectrum.numel() for n, l in adapted_layers(adapted).items()}
    assert sizes == {f"model.layers.{i}.self_attn.{p}": (50 if p == "v_proj" else 1000)
                     for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert peftlab.count_parameters(adapted).trainable == 2 * (1000 + 50)


def test_fourierft_delta_is_the_inverse_dft_of_the_sparse_spectrum():
    from peftlab.methods.fourierft import FourierFT, FourierFTConfig

    base = torch.nn.Linear(6, 4)
    adapter = FourierFT(base, FourierFTConfig(n_frequency=5, scaling=2.0), 5)
    F = torch.zeros(4, 6, dtype=torch.complex64)
    F[adapter.indices[0], adapter.indices[1]] = adapter.fourierft_spectrum.detach().to(torch.complex64)
    # the inverse DFT, written out: ΔW[p, q] = α Re(Σ F[u, v] e^{2πi(up/4 + vq/6)}) / 24
    p, q = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    expected = torch.zeros(4, 6)
    for u, v in adapter.indices.T.tolist():
        expected += (F[u, v] * torch.exp(2j * torch.pi * (u * p / 4 + v * q / 6))).real
    assert torch.allclose(adapter.delta_weight(base), 2.0 * expected / 24, atol=1e-6)


def test_vblora_top_k_file_loads_both_ways(tiny_llama, tmp_path):
    """save_only_topk_weights: the file holds each logit vector's top-k indices and weights, which
    give back exactly the same A and B (the other logits become -inf)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model, _ = tiny_llama
    hp = {"num_vectors": 32, "vector_length": 16, "topk": 2, "save_only_topk_weights": True}
    ids = torch.tensor([[5, 17, 40, 300, 9]])
    reference, theirs = build_pair(model, "vblora", **hp)
    for source in (reference, theirs):
        randomise(source, seed=6)
        source.eval()
    with torch.no_grad():
        ours_out, their_out = reference(input_ids=ids).logits, theirs(input_ids=ids).logits

    # peftlab -> peft: our file holds only the top-k, and peft loads it
    folder = peftlab.save_adapter(reference, tmp_path / "ours")
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert any(k.endswith("vblora_logits_A_topk_indices") for k in keys)
    assert not any(k.endswith(("vblora_logits_A", "vblora_logits_B")) for k in keys)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - ours_out).abs().max().item() < ATOL

    # peft -> peftlab: peft's own top-k file into the reference adapter
    theirs.save_pretrained(tmp_path / "theirs")
    state = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(state) == set(hf_peft.reference_state_dict(reference))  # the same file layout
    hf_peft.load_reference_state_dict(reference, state)
    with torch.no_grad():
        assert (reference(input_ids=ids).logits - their_out).abs().max().item() < ATOL
    assert torch.isinf(reference.model.layers[0].self_attn.q_proj.adapters["default"].vblora_logits_A).any()
    # and through peftlab.load_adapter, from peft's folder onto a fresh base
    again = peftlab.load_adapter(copy.deepcopy(model), tmp_path / "theirs").eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - their_out).abs().max().item() < ATOL


def test_ln_tuning_targets_peft_s_defaults_and_every_norm_elsewhere(tiny_llama, tiny_bert):
    llama = peftlab.adapt(tiny_llama[0], "ln_tuning")
    expected = [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")]
    assert sorted(adapted_layers(llama)) == expected + ["model.norm"]
    bert = peftlab.adapt(tiny_bert[0], "ln_tuning")  # peft names no BERT default: every LayerNorm
    layers = adapted_layers(bert)
    assert len(layers) == 5 and all(name.endswith("LayerNorm") for name in layers)
    # γ and β of 5 LayerNorms of width 64, and the classifier head (modules_to_save, as in peft)
    assert peftlab.count_parameters(bert).trainable == 5 * 2 * 64 + (64 * 2 + 2)


def test_trainable_tokens_trains_the_rows_a_tied_head_reads_too(tiny_llama):
    model, _ = tiny_llama
    adapted = peftlab.adapt(model, "trainable_tokens", token_indices=TOKENS)
    assert set(adapted_layers(adapted)) == {"model.embed_tokens", "lm_head"}  # the head is tied
    assert peftlab.count_parameters(adapted).trainable == len(TOKENS) * 64
    rows = adapted.model.embed_tokens.adapters["default"]
    with torch.no_grad():
        rows.trainable_tokens_delta.add_(1.0)
    h = torch.randn(1, 64)
    logits = adapted.lm_head(h)
    assert torch.allclose(logits[0, list(TOKENS)], h[0] @ rows.trainable_tokens_delta.T, atol=1e-5)
    with pytest.raises(ConfigError, match="cannot be merged"):
        peftlab.merge(adapted)


# where a default does not fit the tiny 64-wide models, peftlab says so, and peft refuses it too
REFUSED = {
    "road": "group_size=64 does not divide",  # the tiny Llama's v_proj has d_out = 32
    "shira": "entries of a 32 x 64 layer",  # r=32 asks for 32 · 96 entries of v_proj's 2048
    "vblora": "vector_length=256 must divide",
    "trainable_tokens": "needs token_indices",  # peft's default (no ids) trains nothing
}
DEFAULTS = {"tiny_llama": (["hra", "miss", "fourierft", "ln_tuning"], REFUSED),
            # BERT's query and value are 64 x 64: 64 divides d_out, and r=32 asks for all 4096 entries
            "tiny_bert": (["hra", "miss", "fourierft", "ln_tuning", "road", "shira"],
                          {m: v for m, v in REFUSED.items() if m not in ("road", "shira")})}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_adapt_with_defaults(request, arch):
    from peft import get_peft_model

    from peftlab.methods import get_method

    model, _ = request.getfixturevalue(arch)
    ids = torch.tensor([[5, 17, 40, 300, 9]])
    fit, refused = DEFAULTS[arch]
    for method in fit:
        torch.manual_seed(0)
        adapted = peftlab.adapt(copy.deepcopy(model), method)
        assert peftlab.count_parameters(adapted).trainable > 0
        loss_of(adapted, ids)[1].backward()
    for method, match in refused.items():
        with pytest.raises(ConfigError, match=match):
            peftlab.adapt(copy.deepcopy(model), method)
        if method != "trainable_tokens":  # peft refuses the same defaults on these models
            spec = get_method(method)
            config = hf_peft.to_peft_config(spec, spec.config(targets=spec.targets_for(model)), None)
            with pytest.raises(ValueError):
                get_peft_model(copy.deepcopy(model), config)


def test_bad_settings_are_refused_clearly(tiny_llama):
    model, _ = tiny_llama
    cases = [("road", {"variant": "road_3"}, "road_1"), ("road", {"group_size": 5}, "even"),
             ("miss", {"r": 128}, "above this layer's d_in=64"),
             ("miss", {"init_weights": "bat", "r": 48}, "r x r blocks"),
             ("fourierft", {"n_frequency": 5000}, "spectrum entries"), ("shira", {"mask_type": "topk"}, "random"),
             ("vblora", {"topk": 300}, "topk=300 is above"), ("hra", {"r": 0}, "positive integer"),
             ("trainable_tokens", {"token_indices": (1,), "modules_to_save": ("lm_head",)},
              "cannot train whole modules"),
             ("ln_tuning", {"targets": ("q_proj",)}, "normalisation layer")]
    for method, hp, match in cases:
        with pytest.raises(ConfigError, match=match):
            peftlab.adapt(copy.deepcopy(model), method, **hp)


def test_configs_translate_both_ways():
    from peftlab.methods import get_method

    for method, hp in [("hra", {"r": 6, "apply_GS": True}), ("road", {"variant": "road_4", "group_size": 16}),
                       ("miss", {"r": 8, "dropout": 0.1, "init_weights": "mini", "mini_r": 2}),
                       ("fourierft", {"n_frequency": 10, "scaling": 3.0, "random_loc_seed": 1,
                                      "n_frequency_pattern": {"q_proj": 4}}),
                       ("shira", {"r": 3, "random_seed": 4}),
                       ("vblora", {"num_vectors": 8, "vector_length": 4, "dropout": 0.2,
                                   "save_only_topk_weights": True}),
                       ("ln_tuning", {}), ("trainable_tokens", {"token_indices": (1, 2), "init_weights": False})]:
        spec = get_method(method)
        saves = None if method == "trainable_tokens" else ()  # peft's TrainableTokensConfig has no field for it
        config = spec.config(targets=("q_proj",), modules_to_save=saves, **hp)
        theirs = hf_peft.to_peft_config(spec, config)
        assert str(theirs.peft_type).split(".")[-1] == spec.peft_type
        assert hf_peft.from_peft_config(theirs) == (method, config)


@pytest.mark.parametrize("method, hp", [("hra", {"r": 4}), ("road", {"group_size": 8}), ("miss", {"r": 4}),
                                        ("miss", {"r": 4, "init_weights": "bat"}), ("fourierft", {"n_frequency": 30}),
                                        ("shira", {"r": 2}), ("vblora", {"num_vectors": 8, "vector_length": 8})])
def test_conv1d_base_behaves_like_the_same_linear(method, hp):
    """GPT-2's Conv1D stores W as (d_in, d_out): the same adapter weights give the same outputs and
    merge into the same weight as on the nn.Linear it equals (peft has no Conv1D path for most)."""
    from transformers.pytorch_utils import Conv1D

    from peftlab.inject import AdaptedLayer
    from peftlab.methods import METHODS

    torch.manual_seed(0)
    conv, linear = Conv1D(24, 16), torch.nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    from peftlab.methods.fourierft import FourierFT
    from peftlab.methods.hra import HRA
    from peftlab.methods.miss import MiSS
    from peftlab.methods.road import RoAd
    from peftlab.methods.shira import SHiRA
    from peftlab.methods.vblora import VBLoRA, VectorBank

    spec, x, outputs, weights = METHODS[method], torch.randn(3, 16), [], None
    config = spec.config(targets=("x",), **hp)
    make = {"hra": HRA, "road": RoAd, "miss": MiSS, "shira": SHiRA,
            "fourierft": lambda base, c: FourierFT(base, c, c.n_frequency),
            "vblora": lambda base, c: VBLoRA(base, c, VectorBank(c))}[method]
    for base in (conv, linear):
        layer = AdaptedLayer(base)
        layer.adapters["default"] = make(base, config)
        layer.active = ["default"]
        if weights is None:
            randomise(layer.adapters["default"], seed=12)
            weights = layer.adapters["default"].state_dict()
        layer.adapters["default"].load_state_dict(weights)  # the same adapter weights on both
        unmerged = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        outputs.append(unmerged)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
