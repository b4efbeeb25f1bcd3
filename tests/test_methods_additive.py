"""IA3, BitFit, bottleneck adapters and LLaMA-Adapter: each reference proven equal to its
production path.

- IA3 and LLaMA-Adapter: Hugging Face peft (IA3Config, AdaptionPromptConfig). Same weights ->
  same outputs and gradients (fp32, atol 1e-5) on tiny Llama and BERT models, peft's on-disk
  names, files that load in peft and back.
- BitFit: plain ``requires_grad`` on the model's own biases (peftlab.production.merged.bitfit):
  same outputs, gradients and training steps.
- Bottleneck: peftlab's fused form (peftlab.production.merged.fuse_bottleneck): same outputs and
  gradients, in training (addmm path) and without gradients (down projection folded).
Plus, for all: output unchanged at init, closed-form parameter counts, only adapter parameters
change in a step, merge (or its clear refusal), save/load round trips.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.api import make_config, records
from peftlab.errors import AdapterFileError, ConfigError
from peftlab.inject import adapted_layers
from peftlab.methods import get_method
from peftlab.methods.bottleneck import layer_parameter_count
from peftlab.models import _tiny_bert, _tiny_llama
from peftlab.production import hf_peft, merged

ATOL = 1e-5
METHODS = ("ia3", "bitfit", "bottleneck", "llama_adapter")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter parameter away from its init (zero gates and up projections included)."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".adapters." in name or ".copies." in name:
            param.add_(torch.randn(param.shape, generator=g) * 0.2 * (param.abs().mean() + 0.1))


@torch.no_grad()
def random_biases(model: nn.Module, seed: int = 3) -> nn.Module:
    """HF initialises biases to zero, which would hide a bias handled wrongly: give them values."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def batch(model: nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (2, 7), generator=g)
    if model.config.model_type == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "labels": ids}


def default_hp(build, method: str) -> dict:
    """What a method needs beyond defaults on this model (BitFit on Llama: the norms)."""
    return {"include_norms": True} if (method == "bitfit" and build is _tiny_llama) else {}


SUPPORTED = [(b, m) for b in (_tiny_llama, _tiny_bert) for m in METHODS if not (m == "llama_adapter" and b is _tiny_bert)]


def ids_of(cases):
    return [f"{b.__name__.removeprefix('_')}-{m}" for b, m in cases]


# --------------------------------------------------------------------------------------------
# Contract checks shared by the four methods
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,method", SUPPORTED, ids=ids_of(SUPPORTED))
def test_starts_at_base_model_and_disables_back_to_it(build, method):
    model = build().eval()
    inputs = batch(model)
    with torch.no_grad():
        base = model(**inputs).logits
        peftlab.adapt(model, method, **default_hp(build, method))
        assert torch.equal(model(**inputs).logits, base)  # IA3 ones, zero up / gate, copied biases
        randomise(model)
        changed = model(**inputs).logits
        peftlab.set_disabled(model, True)
        assert torch.equal(model(**inputs).logits, base)
        peftlab.set_disabled(model, False)
        assert (changed - base).abs().max() > 1e-3


@pytest.mark.parametrize("build,method", SUPPORTED, ids=ids_of(SUPPORTED))
def test_trainable_count_is_the_closed_form(build, method):
    model = build()
    spec = get_method(method)
    peftlab.adapt(model, method, **default_hp(build, method))
    config = records(model)["default"].config
    copies = sum(p.numel() for n, p in model.named_parameters() if ".copies." in n)  # the BERT head
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - copies
    if spec.params_per_layer is not None:
        expected = 0
        for layer in adapted_layers(model).values():
            d_in, d_out = layer.base_layer.in_features, layer.base_layer.out_features
            expected += spec.params_per_layer(d_in, d_out, config)
    else:
        fresh = build()  # the closed form is computed on the model before adapting
        expected = spec.parameter_count(fresh, make_config(spec, fresh, **default_hp(build, method)))
    assert trainable == expected > 0


def test_closed_forms_by_hand():
    """The formulas on tiny-llama (hidden 64, d_ff 128, 4 heads of 16, 2 kv heads, 2 layers)."""
    llama, bert = _tiny_llama(), _tiny_bert()
    count = lambda m, method, **hp: get_method(method).parameter_count(m, make_config(get_method(method), m, **hp))
    assert count(llama, "ia3") == 2 * (32 + 32 + 128)  # k, v outputs (2 kv heads x 16); down input
    assert count(bert, "ia3") == 2 * (64 + 64 + 64 + 128)  # key, value; attention output, output inputs
    assert count(llama, "llama_adapter") == 2 * (10 * 64 + 1)
    assert count(llama, "llama_adapter", adapter_len=3, adapter_layers=1) == 3 * 64 + 1
    # BERT: 6 linear biases per layer (q k v, attn out 64 each; intermediate 128; output 64) and
    # 2 LayerNorm biases per layer, the embedding LayerNorm, the pooler (classifier: modules_to_save)
    assert count(bert, "bitfit") == 2 * (4 * 64 + 128 + 64 + 2 * 64) + 64 + 64
    assert count(llama, "bitfit", include_norms=True) == 2 * 2 * 64 + 64  # 2 RMSNorms per layer + final
    # bottleneck on o_proj (64 -> 64) and down_proj (128 -> 64) of 2 layers; r = 64 // 16 = 4
    assert count(llama, "bottleneck") == 2 * 2 * (2 * 4 * 64 + 4 + 64)
    # parallel: down reads the 64-wide sublayer input x̂ on both, not down_proj's 128-wide input
    assert count(llama, "bottleneck", kind="parallel", r=8) == 2 * 2 * (8 * (64 + 64) + 8 + 64)
    assert count(bert, "bottleneck", kind="parallel", r=8) == 2 * 2 * (8 * (64 + 64) + 8 + 64)
    parallel = make_config(get_method("bottleneck"), llama, kind="parallel", r=8)
    assert layer_parameter_count(64, parallel, d_model=96) == 8 * (96 + 64) + 8 + 64


@pytest.mark.parametrize("build,method", SUPPORTED, ids=ids_of(SUPPORTED))
def test_only_adapter_parameters_change_in_a_step(build, method):
    model = build()
    peftlab.adapt(model, method, **default_hp(build, method))
    randomise(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch(model)).loss.backward()
    optimiser.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == param.requires_grad, name
        assert param.requires_grad == (".adapters.default." in name or ".copies.default." in name), name


# --------------------------------------------------------------------------------------------
# Parity with peft: IA3 and LLaMA-Adapter
# --------------------------------------------------------------------------------------------
PEFT_CASES = [
    (_tiny_llama, "ia3", {}),
    (_tiny_bert, "ia3", {}),
    (_tiny_llama, "ia3", {"targets": "all-linear", "feedforward_modules": r".*(down|up)_proj"}),
    (_tiny_llama, "llama_adapter", {}),
    (_tiny_llama, "llama_adapter", {"adapter_len": 3, "adapter_layers": 1}),
]


def peft_id(case) -> str:
    build, method, hp = case
    return f"{build.__name__.removeprefix('_')}-{method}-" + ("-".join(f"{k}={v}" for k, v in hp.items()) or "defaults")


def pair(build, method: str, hp: dict):
    """(reference model with random adapter weights, peft model given the same weights)."""
    ours = peftlab.adapt(build(), method, **hp)
    randomise(ours)
    theirs = peftlab.adapt(build(), method, backend="peft", **hp)
    hf_peft.copy_reference_to_peft(ours, theirs)
    return ours.eval(), theirs.eval()


def max_grad_diff(ours: nn.Module, theirs: nn.Module) -> float:
    their_params = dict(theirs.named_parameters())
    diffs = [(ours.get_parameter(mine).grad - their_params[name].grad).abs().max().item()
             for mine, name in hf_peft.reference_to_peft_names(ours).items()]
    assert diffs
    return max(diffs)


@pytest.mark.parametrize("case", PEFT_CASES, ids=[peft_id(c) for c in PEFT_CASES])
def test_same_outputs_and_gradients_as_peft(case):
    build, method, hp = case
    ours, theirs = pair(build, method, hp)
    inputs = batch(ours)
    out_ours, out_theirs = ours(**inputs), theirs(**inputs)
    assert (out_ours.logits - out_theirs.logits).abs().max() < ATOL
    out_ours.loss.backward()
    out_theirs.loss.backward()
    assert max_grad_diff(ours, theirs) < ATOL
    # the same parameters train in both
    ours_trainable = {hf_peft.reference_to_peft_names(ours)[n] for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", PEFT_CASES[:4], ids=[peft_id(c) for c in PEFT_CASES[:4]])
def test_saved_adapter_loads_in_peft_and_back(tmp_path, case):
    import peft

    build, method, hp = case
    ours = peftlab.adapt(build(), method, **hp).eval()
    randomise(ours)
    inputs = batch(ours)
    expected = ours(**inputs).logits
    peftlab.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path / "a")).eval()
    assert (theirs(**inputs).logits - expected).abs().max() < ATOL
    again = peftlab.load_adapter(build(), tmp_path / "a").eval()
    assert (again(**inputs).logits - expected).abs().max() < ATOL
    assert records(again)["default"].method == method
    # a file peft wrote loads in the reference too
    theirs.save_pretrained(str(tmp_path / "b"))
    from_peft = peftlab.load_adapter(build(), tmp_path / "b").eval()
    assert (from_peft(**inputs).logits - expected).abs().max() < ATOL


# --------------------------------------------------------------------------------------------
# IA3 specifics
# --------------------------------------------------------------------------------------------
def test_ia3_scales_the_right_axis_and_peft_shapes():
    model = peftlab.adapt(_tiny_bert(), "ia3")
    layers = adapted_layers(model)
    key = layers["bert.encoder.layer.0.attention.self.key"].adapters["default"]
    ffn = layers["bert.encoder.layer.0.output.dense"].adapters["default"]
    attn_out = layers["bert.encoder.layer.0.attention.output.dense"].adapters["default"]
    assert not key.feedforward and key.ia3_l.shape == (64, 1)  # scales the output
    assert ffn.feedforward and ffn.ia3_l.shape == (1, 128)  # scales the input
    assert attn_out.feedforward  # "output.dense" names both, as in peft
    # h = W (l ⊙ x) + b for a feed-forward layer, l ⊙ (W x + b) otherwise
    base = layers["bert.encoder.layer.0.output.dense"].base_layer
    with torch.no_grad():
        ffn.ia3_l.uniform_(0.5, 1.5)
        key.ia3_l.uniform_(0.5, 1.5)
    x = torch.randn(3, 128)
    assert torch.allclose(layers["bert.encoder.layer.0.output.dense"](x), base(x * ffn.ia3_l), atol=ATOL)
    kb = layers["bert.encoder.layer.0.attention.self.key"].base_layer
    y = torch.randn(3, 64)
    assert torch.allclose(layers["bert.encoder.layer.0.attention.self.key"](y), kb(y) * key.ia3_l.T, atol=ATOL)


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_bert], ids=["tiny_llama", "tiny_bert"])
def test_ia3_merge_scales_weights_and_biases(build):
    model = peftlab.adapt(random_biases(build()), "ia3").eval()
    randomise(model)
    base_state = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    inputs = batch(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        peftlab.merge(model)
        assert (model(**inputs).logits - expected).abs().max() < ATOL
        if build is _tiny_bert:  # key/value scale their output, so their bias is scaled too
            layer = adapted_layers(model)["bert.encoder.layer.0.attention.self.key"]
            scale = layer.adapters["default"].ia3_l.flatten()
            original = base_state["bert.encoder.layer.0.attention.self.key.base_layer.bias"]
            assert torch.allclose(layer.base_layer.bias, original * scale, atol=1e-6)
        peftlab.unmerge(model)
        for name, param in model.named_parameters():
            if name in base_state:
                assert torch.allclose(param, base_state[name], atol=1e-6), name
        assert (model(**inputs).logits - expected).abs().max() < ATOL


def test_ia3_peft_config_has_exact_feedforward_subset():
    model = _tiny_llama()
    spec = get_method("ia3")
    config = hf_peft.to_peft_config(spec, make_config(spec, model), model)
    assert config.target_modules == {f"model.layers.{i}.{m}" for i in range(2)
                                     for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert config.feedforward_modules == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    name, back = hf_peft.from_peft_config(config)
    assert name == "ia3" and set(back.feedforward_modules) == config.feedforward_modules


# --------------------------------------------------------------------------------------------
# LLaMA-Adapter specifics
# --------------------------------------------------------------------------------------------
def test_llama_adapter_refuses_bert_clearly():
    for backend in ("reference", "peft"):
        with pytest.raises(ConfigError, match="architectures peft.s AdaptionPrompt knows"):
            peftlab.adapt(_tiny_bert(), "llama_adapter", backend=backend)
    with pytest.raises(ConfigError, match="more than the model's 2 attention layers"):
        peftlab.adapt(_tiny_llama(), "llama_adapter", adapter_layers=3)


def test_llama_adapter_wraps_the_top_layers_and_refuses_merge():
    model = peftlab.adapt(_tiny_llama(), "llama_adapter", adapter_len=4, adapter_layers=1)
    assert list(adapted_layers(model)) == ["model.layers.1.self_attn"]
    adapter = adapted_layers(model)["model.layers.1.self_attn"].adapters["default"]
    assert adapter.adaption_prompt.shape == (1, 4, 64) and adapter.adaption_gate.item() == 0.0
    with pytest.raises(ConfigError, match="cannot be merged.*attention over extra keys"):
        peftlab.merge(model)


def test_llama_adapter_generates_like_peft():
    torch.manual_seed(0)  # the adaption prompts start from the global generator: same prompts in any test order
    ours, theirs = pair(_tiny_llama, "llama_adapter", {"adapter_len": 4})
    with torch.no_grad():  # a large gate, so the prompts decide the continuation
        for name, param in ours.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(3.0)
    hf_peft.copy_reference_to_peft(ours, theirs)
    prompt = torch.tensor([[1, 17, 250, 903, 44]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 2}
    with torch.no_grad():
        tokens = ours.generate(input_ids=prompt, **kwargs)
        assert torch.equal(tokens, theirs.generate(input_ids=prompt, **kwargs))
        peftlab.set_disabled(ours, True)
        base_tokens = ours.generate(input_ids=prompt, **kwargs)
    assert tokens.shape == (1, 11) and not torch.equal(tokens, base_tokens)


@pytest.mark.slow
def test_llama_adapter_matches_peft_on_smollm2(smollm2):
    model, tokenizer = smollm2
    hp = {"adapter_len": 10, "adapter_layers": 2}
    ours = peftlab.adapt(copy.deepcopy(model), "llama_adapter", **hp).eval()
    randomise(ours)
    theirs = peftlab.adapt(copy.deepcopy(model), "llama_adapter", backend="peft", **hp).eval()
    hf_peft.copy_reference_to_peft(ours, theirs)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out_ours, out_theirs = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert (out_ours.logits - out_theirs.logits).abs().max() < ATOL
    out_ours.loss.backward()
    out_theirs.loss.backward()
    assert max_grad_diff(ours, theirs) < ATOL


# --------------------------------------------------------------------------------------------
# BitFit: reference == plain requires_grad on the model's own biases
# --------------------------------------------------------------------------------------------
def test_bitfit_without_biases_says_what_would_train():
    with pytest.raises(ConfigError) as err:
        peftlab.adapt(_tiny_llama(), "bitfit")
    message = str(err.value)
    assert "no bias parameters" in message and "include_norms=True" in message
    assert "model.layers.0.input_layernorm" in message and "5 norm layers" in message
    with pytest.raises(ConfigError, match="no bias parameters"):
        merged.bitfit(_tiny_llama())  # the production path refuses the same way


@pytest.mark.parametrize("build,hp", [(_tiny_bert, {}), (_tiny_bert, {"include_norms": True}),
                                      (_tiny_llama, {"include_norms": True})],
                         ids=["tiny_bert", "tiny_bert_norms", "tiny_llama_norms"])
def test_bitfit_reference_equals_plain_requires_grad(build, hp):
    ours = peftlab.adapt(random_biases(build()), "bitfit", **hp).eval()
    randomise(ours)
    plain = random_biases(build()).eval()
    trainable = merged.bitfit(plain, **hp)
    merged.copy_reference_to_plain(ours, plain)
    # the same parameters train: the reference's adapter copies are the plain model's own tensors
    names = {k.removeprefix(hf_peft.PREFIX) for k in hf_peft.reference_state_dict(ours)}
    assert set(trainable) == names
    inputs = batch(ours)
    out_ours, out_plain = ours(**inputs), plain(**inputs)
    assert (out_ours.logits - out_plain.logits).abs().max() < ATOL
    out_ours.loss.backward()
    out_plain.loss.backward()
    mapping = {ours_name: hf_peft.saved_name(peft_name).removeprefix(hf_peft.PREFIX)
               for ours_name, peft_name in hf_peft.reference_to_peft_names(ours).items()}
    for mine, theirs in mapping.items():
        assert (ours.get_parameter(mine).grad - plain.get_parameter(theirs).grad).abs().max() < ATOL, mine
    before = {n: ours.get_parameter(n).detach().clone() for n in mapping}
    # and the same training steps. SGD, not Adam: a key bias has no effect on attention (softmax
    # is shift-invariant), so its gradient is rounding noise, which Adam would scale up to lr
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    opt_plain = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (plain, opt_plain)):
            opt.step()
            opt.zero_grad()
            model(**inputs).loss.backward()
    moved = 0
    for mine, theirs in mapping.items():
        assert (ours.get_parameter(mine) - plain.get_parameter(theirs)).abs().max() < ATOL, mine
        moved += (ours.get_parameter(mine) - before[mine]).abs().max().item() > 1e-3
    assert moved > len(mapping) // 2  # the steps did change most tensors


def test_bitfit_targets_select_biases_and_merge():
    model = peftlab.adapt(_tiny_bert(), "bitfit", targets=("query", "intermediate.dense")).eval()
    assert sorted(adapted_layers(model)) == [f"bert.encoder.layer.{i}.{m}" for i in range(2)
                                             for m in ("attention.self.query", "intermediate.dense")]
    randomise(model)
    inputs = batch(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        peftlab.merge(model)
        assert (model(**inputs).logits - expected).abs().max() < ATOL
        layer = adapted_layers(model)["bert.encoder.layer.0.attention.self.query"]
        assert torch.equal(layer.base_layer.bias, layer.adapters["default"].bias)
        peftlab.unmerge(model)
        assert (model(**inputs).logits - expected).abs().max() < ATOL


def test_bitfit_save_load_round_trip(tmp_path):
    model = peftlab.adapt(_tiny_bert(), "bitfit").eval()
    randomise(model)
    inputs = batch(model)
    expected = model(**inputs).logits
    peftlab.save_adapter(model, tmp_path / "bitfit")
    config = json.loads((tmp_path / "bitfit" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB_BITFIT" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"] and config["include_norms"] is False
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "bitfit" / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.bias" in keys
    assert "base_model.model.bert.embeddings.LayerNorm.bias" in keys
    assert not any(k.endswith("query.weight") for k in keys)
    again = peftlab.load_adapter(_tiny_bert(), tmp_path / "bitfit").eval()
    assert (again(**inputs).logits - expected).abs().max() < ATOL
    with pytest.raises(AdapterFileError, match="peft cannot load it"):
        peftlab.load_adapter(_tiny_bert(), tmp_path / "bitfit", backend="peft")


# --------------------------------------------------------------------------------------------
# Bottleneck adapters: reference == fused production form
# --------------------------------------------------------------------------------------------
BOTTLENECK_CASES = [(b, kind) for b in (_tiny_llama, _tiny_bert) for kind in ("houlsby", "parallel")]


def test_houlsby_reads_the_sublayer_output():
    model = peftlab.adapt(_tiny_bert(), "bottleneck", targets=("output.dense",), non_linearity="gelu")
    randomise(model)
    layer = adapted_layers(model)["bert.encoder.layer.0.attention.output.dense"]
    adapter = layer.adapters["default"]
    x = torch.randn(3, 64)
    h = layer.base_layer(x)
    serial = h + 1.0 * adapter.up(F.gelu(adapter.down(h)))  # Houlsby: on the sublayer output
    assert torch.allclose(layer(x), serial, atol=ATOL)


def capture(model: nn.Module, spots: dict[str, str]) -> tuple[dict, list]:
    """{key: tensor} filled during the next forward: spots maps key -> "module path:in" (its first
    input) or "module path:out" (its output)."""
    seen, hooks = {}, []
    for key, spot in spots.items():
        path, what = spot.split(":")
        module = model.get_submodule(path)
        if what == "in":
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, k, key=key: seen.__setitem__(key, a[0] if a else k["hidden_states"]), with_kwargs=True))
        else:
            hooks.append(module.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(key, o)))
    return seen, hooks


def test_parallel_adapter_is_he_et_al_on_llama():
    """y = sublayer(x̂) + s·up(f(down(x̂))), x̂ the RMSNorm-ed residual stream both sublayers read."""
    model = peftlab.adapt(_tiny_llama(), "bottleneck", kind="parallel", r=8, non_linearity="tanh").eval()
    randomise(model)
    block = "model.layers.1"  # layer 1: its x̂ depends on layer 0's adapters too
    seen, hooks = capture(model, {
        "attn_x": f"{block}.input_layernorm:out", "mlp_x": f"{block}.post_attention_layernorm:out",
        "context": f"{block}.self_attn.o_proj:in", "attn_y": f"{block}.self_attn.o_proj:out",
        "mlp_y": f"{block}.mlp:out"})
    with torch.no_grad():
        model(**batch(model))
    for hook in hooks:
        hook.remove()
    attn, mlp = model.get_submodule(f"{block}.self_attn"), model.get_submodule(f"{block}.mlp")
    o, down = attn.o_proj.adapters["default"], mlp.down_proj.adapters["default"]
    assert o.down.weight.shape == down.down.weight.shape == (8, 64)  # reads x̂ (64), not the 128-wide d_ff
    with torch.no_grad():
        x = seen["mlp_x"]  # the whole feed-forward sublayer, by hand
        ffn = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                       mlp.down_proj.base_layer.weight)
        expected = ffn + 4.0 * F.linear(torch.tanh(F.linear(x, down.down.weight, down.down.bias)),
                                        down.up.weight, down.up.bias)
        assert (seen["mlp_y"] - expected).abs().max() < ATOL
        x = seen["attn_x"]  # attention: W_o · context, plus the branch from x̂
        expected = attn.o_proj.base_layer(seen["context"]) + 4.0 * o.up(torch.tanh(o.down(x)))
        assert (seen["attn_y"] - expected).abs().max() < ATOL
        wrong = attn.o_proj.base_layer(seen["context"]) + 4.0 * o.up(torch.tanh(o.down(seen["context"])))
        assert (seen["attn_y"] - wrong).abs().max() > 1e-3  # the o_proj input would be another adapter


def test_parallel_adapter_is_he_et_al_on_bert():
    """BERT: the attention branch reads the block input, the feed-forward one the attention
    block's LayerNorm output; both add to the projection output before dropout, residual, norm."""
    model = peftlab.adapt(random_biases(_tiny_bert()), "bottleneck", kind="parallel", r=8,
                          non_linearity="gelu").eval()
    randomise(model)
    block = "bert.encoder.layer.1"
    seen, hooks = capture(model, {
        "attn_x": f"{block}.attention:in", "context": f"{block}.attention.output.dense:in",
        "attn_y": f"{block}.attention.output.dense:out", "ffn_x": f"{block}.attention.output.LayerNorm:out",
        "inner": f"{block}.output.dense:in", "ffn_y": f"{block}.output.dense:out"})
    with torch.no_grad():
        model(**batch(model))
    for hook in hooks:
        hook.remove()
    attn_dense = model.get_submodule(f"{block}.attention.output.dense")
    ffn_dense, intermediate = model.get_submodule(f"{block}.output.dense"), model.get_submodule(f"{block}.intermediate")
    a, f = attn_dense.adapters["default"], ffn_dense.adapters["default"]
    with torch.no_grad():
        expected = attn_dense.base_layer(seen["context"]) + 4.0 * a.up(F.gelu(a.down(seen["attn_x"])))
        assert (seen["attn_y"] - expected).abs().max() < ATOL
        x = seen["ffn_x"]  # the feed-forward sublayer by hand: W2 GELU(W1 x̂ + b1) + b2
        inner = F.gelu(F.linear(x, intermediate.dense.weight, intermediate.dense.bias))
        assert (inner - seen["inner"]).abs().max() < ATOL
        expected = ffn_dense.base_layer(inner) + 4.0 * f.up(F.gelu(f.down(x)))
        assert (seen["ffn_y"] - expected).abs().max() < ATOL


def _tiny_other(model_type: str) -> nn.Module:
    """A 1-layer GPT-2, OPT or DistilBERT built from a config (no download), seeded."""
    import transformers as tf

    torch.manual_seed(0)
    config = {"gpt2": lambda: tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1000),
              "opt": lambda: tf.OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=48, num_attention_heads=2,
                                          word_embed_proj_dim=32, vocab_size=1000),
              "distilbert": lambda: tf.DistilBertConfig(n_layers=1, dim=32, hidden_dim=48, n_heads=2,
                                                        vocab_size=1000)}[model_type]()
    auto = tf.AutoModelForSequenceClassification if model_type == "distilbert" else tf.AutoModelForCausalLM
    return auto.from_config(config).eval()


# (model_type, feed-forward's last layer, the norm whose output is the feed-forward input x̂)
OTHER_ARCHS = [("gpt2", "transformer.h.0.mlp.c_proj", "transformer.h.0.ln_2"),
               ("opt", "model.decoder.layers.0.fc2", "model.decoder.layers.0.final_layer_norm"),
               ("distilbert", "distilbert.transformer.layer.0.ffn.lin2",
                "distilbert.transformer.layer.0.sa_layer_norm")]


@pytest.mark.parametrize("model_type,target,norm", OTHER_ARCHS, ids=[a[0] for a in OTHER_ARCHS])
def test_parallel_adapter_sources_of_other_architectures(model_type, target, norm):
    model = peftlab.adapt(_tiny_other(model_type), "bottleneck", kind="parallel", r=4).eval()
    randomise(model)
    seen, hooks = capture(model, {"x": f"{norm}:out", "inner": f"{target}:in", "y": f"{target}:out"})
    with torch.no_grad():
        model(input_ids=torch.randint(5, 1000, (2, 6), generator=torch.Generator().manual_seed(0)))
        for hook in hooks:
            hook.remove()
        layer = model.get_submodule(target)
        adapter = layer.adapters["default"]
        expected = layer.base_layer(seen["inner"]) + 4.0 * adapter.up(F.relu(adapter.down(seen["x"])))
        assert (seen["y"] - expected).abs().max() < ATOL
    assert len(adapted_layers(model)) == 2  # the attention output projection too


def test_parallel_adapter_trains_and_follows_the_sublayer_input():
    torch.manual_seed(0)
    model = peftlab.adapt(_tiny_llama(), "bottleneck", kind="parallel", r=4)
    randomise(model)
    out = model(**batch(model))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # batches of another shape, in train and eval mode: each call reads its own x̂
    for mode, shape in ((True, (3, 5)), (False, (1, 9)), (True, (2, 7))):
        model.train(mode)
        ids = torch.randint(5, 1000, shape, generator=torch.Generator().manual_seed(shape[0]))
        assert model(input_ids=ids).logits.shape == (*shape, model.config.vocab_size)
    layer = adapted_layers(model)["model.layers.0.self_attn.o_proj"]
    assert layer.adapters["default"].tap.value is None  # nothing outlives a call
    with pytest.raises(ConfigError, match="reads the input of 'q_proj'.*none was caught"):
        layer(torch.randn(2, 64))  # alone, the layer has no sublayer input


def test_parallel_adapter_with_gradient_checkpointing():
    """Recomputation in backward reads x̂ again: same loss and gradients, both checkpoint modes."""
    def step(reentrant: bool | None) -> tuple[float, dict]:
        torch.manual_seed(0)
        model = peftlab.adapt(_tiny_llama(), "bottleneck", kind="parallel", r=4).train()
        randomise(model)
        if reentrant is not None:
            model.config.use_cache = False
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        calls = []
        layer = adapted_layers(model)["model.layers.0.self_attn.o_proj"]
        layer.register_forward_hook(lambda *_: calls.append(1))
        loss = model(**batch(model)).loss
        loss.backward()
        assert len(calls) == (1 if reentrant is None else 2)  # checkpointing ran the layer again
        assert layer.adapters["default"].tap.value is None  # (non-reentrant stops recomputing early)
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = step(None)
    for reentrant in (False, True):
        again, other = step(reentrant)
        assert again == pytest.approx(loss, abs=1e-6)
        assert set(other) == set(grads) and all(other[n] is not None for n in grads)
        assert max((grads[n] - other[n]).abs().max().item() for n in grads) < ATOL


def test_parallel_hooks_come_and_go_with_the_adapter():
    from peftlab import compose

    base = _tiny_llama().eval()
    inputs = batch(base)
    with torch.no_grad():
        plain = base(**inputs).logits
    model = peftlab.adapt(copy.deepcopy(base), "bottleneck", kind="parallel", r=4).eval()
    randomise(model)
    attn = model.model.layers[0].self_attn
    hooks = lambda: len(attn._forward_pre_hooks) + len(attn._forward_hooks)  # noqa: E731
    assert hooks() == 2
    with torch.no_grad():
        expected = model(**inputs).logits
        # another adapter wraps the source layers: x̂ is now read at the wrapper, still the same
        compose.add_adapter(model, "other", "lora", r=2, targets=("q_proj", "up_proj"))
        assert (model(**inputs).logits - expected).abs().max() < ATOL
        compose.delete_adapter(model, "other")
        assert (model(**inputs).logits - expected).abs().max() < ATOL
        compose.add_adapter(model, "second", "bottleneck", kind="parallel", r=2)
        with pytest.raises(ConfigError, match="mixed batch"):
            model(**inputs, adapter_names=["default", "second"])
        compose.delete_adapter(model, "second")
        assert hooks() == 2
        compose.delete_adapter(model, "default")
        assert hooks() == 0 and (model(**inputs).logits - plain).abs().max() < ATOL
    # a refused adapt leaves neither wrapped layers nor hooks behind
    with pytest.raises(ConfigError, match=r"'model.layers.0.self_attn.q_proj' needs its sublayer's input.*o_proj"):
        peftlab.adapt(model, "bottleneck", kind="parallel", targets="all-linear")
    assert not adapted_layers(model) and hooks() == 0


def test_parallel_sources_can_be_given():
    """Any layer that reads the sublayer input will do: k_proj and gate_proj give the same x̂."""
    inputs = batch(_tiny_llama())
    outputs = []
    for sources in (None, {"o_proj": "k_proj", "down_proj": "gate_proj"}):
        model = _tiny_llama()
        torch.manual_seed(0)  # the same down projections at init
        model = peftlab.adapt(model, "bottleneck", kind="parallel", r=4, sources=sources).eval()
        randomise(model)
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    assert (outputs[0] - outputs[1]).abs().max() < ATOL
    with pytest.raises(ConfigError, match="'model.layers.0.self_attn.nope'.*not a linear layer"):
        peftlab.adapt(_tiny_llama(), "bottleneck", kind="parallel", sources={"o_proj": "nope", "down_proj": "up_proj"})
    with pytest.raises(ConfigError, match="for kind='parallel' only"):
        peftlab.adapt(_tiny_llama(), "bottleneck", sources={"o_proj": "q_proj"})
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="does not know where.*Sequential.*sources="):
        peftlab.adapt(plain, "bottleneck", kind="parallel", targets=("2",))
    model = peftlab.adapt(plain, "bottleneck", kind="parallel", r=2, targets=("2",), sources={"2": "0"})
    assert model[2].adapters["default"].down.in_features == 8


@pytest.mark.parametrize("build,kind", BOTTLENECK_CASES, ids=[f"{b.__name__[1:]}-{k}" for b, k in BOTTLENECK_CASES])
def test_fused_bottleneck_equals_reference(build, kind):
    ours = peftlab.adapt(random_biases(build()), "bottleneck", kind=kind, non_linearity="gelu").eval()
    randomise(ours)
    fused = merged.fuse_bottleneck(copy.deepcopy(ours))
    assert not adapted_layers(fused) and any(isinstance(m, merged.FusedBottleneck) for m in fused.modules())
    inputs = batch(ours)
    out_ours, out_fused = ours(**inputs), fused(**inputs)  # training path: addmm, no folding
    assert (out_ours.logits - out_fused.logits).abs().max() < ATOL
    out_ours.loss.backward()
    out_fused.loss.backward()
    fused_params = dict(fused.named_parameters())
    grads = 0
    for name, param in ours.named_parameters():
        if param.requires_grad and ".adapters." in name:
            other = fused_params[name.replace(".adapters.default.", ".")]
            assert (param.grad - other.grad).abs().max() < ATOL, name
            grads += 1
    assert grads == 4 * len(adapted_layers(ours))
    # without gradients the down projection is folded into the base matmul
    with torch.no_grad():
        assert (ours(**inputs).logits - fused(**inputs).logits).abs().max() < ATOL
        # a step changes the adapter: the folded cache must notice
        for model in (ours, fused):
            for name, param in model.named_parameters():
                if "down" in name:
                    param.mul_(1.5)
        assert (ours(**inputs).logits - fused(**inputs).logits).abs().max() < ATOL
    merged.unfuse_bottleneck(fused)
    assert set(adapted_layers(fused)) == set(adapted_layers(ours))


@pytest.mark.parametrize("build", (_tiny_llama, _tiny_bert), ids=("llama", "bert"))
def test_bottleneck_cannot_merge_and_round_trips(tmp_path, build):
    model = peftlab.adapt(build(), "bottleneck", kind="parallel", r=4).eval()
    randomise(model)
    with pytest.raises(ConfigError, match="non-linearity .* no fixed ΔW"):
        peftlab.merge(model)
    inputs = batch(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    peftlab.save_adapter(model, tmp_path / "bn")
    config = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB_BOTTLENECK" and config["kind"] == "parallel" and config["r"] == 4
    again = peftlab.load_adapter(build(), tmp_path / "bn").eval()
    with torch.no_grad():
        assert (again(**inputs).logits - expected).abs().max() < ATOL



def test_parallel_sources_round_trip(tmp_path):
    sources = {"o_proj": "k_proj", "down_proj": "gate_proj"}
    model = peftlab.adapt(_tiny_llama(), "bottleneck", kind="parallel", r=4, sources=sources).eval()
    randomise(model)
    inputs = batch(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    peftlab.save_adapter(model, tmp_path / "bn")
    assert json.loads((tmp_path / "bn" / "adapter_config.json").read_text())["sources"] == sources
    again = peftlab.load_adapter(_tiny_llama(), tmp_path / "bn").eval()
    assert records(again)["default"].config.sources == sources
    assert again.model.layers[0].mlp.down_proj.adapters["default"].tap.source == "gate_proj"
    with torch.no_grad():
        assert (again(**inputs).logits - expected).abs().max() < ATOL


def test_bottleneck_config_errors():
    with pytest.raises(ConfigError, match="Did you mean 'parallel'"):
        peftlab.adapt(_tiny_llama(), "bottleneck", kind="paralel")
    with pytest.raises(ConfigError, match="non_linearity='softmax'"):
        peftlab.adapt(_tiny_llama(), "bottleneck", non_linearity="softmax")
    with pytest.raises(ConfigError, match="no 'bottleneck' method"):
        peftlab.adapt(_tiny_llama(), "bottleneck", backend="peft")
