"""LoftQ from scratch: the error ‖W - (Q + B A)‖_F falls with iterations and stays below plain
NF4's; the result is bit-for-bit peft's ``loftq_init`` (run on CPU by replacing its hard-coded
"cuda"; on a GPU machine, peft's function itself); an adapted model starts closer to the original
than a QLoRA (NF4 base, B A = 0) one does.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers
from peftlab.production.hf_peft import from_peft_config, import_peft, to_peft_config
from peftlab.quant.loftq import loftq, loftq_errors
from peftlab.quant.nf4 import Linear4bitRef, dequantize_nf4, quantize_model_nf4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def _weight(seed: int = 0, d_out: int = 128, d_in: int = 64) -> torch.Tensor:
    """A weight shaped like a pretrained one: a low-rank part, noise, and two outlier columns."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, 8, generator=gen) @ torch.randn(8, d_in, generator=gen) * 0.007
    w += torch.randn(d_out, d_in, generator=gen) * 0.01
    w[:, :2] *= 6
    return w


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _peft_loftq_init():
    """peft's own ``loftq_init``, its one hard-coded device ("cuda") replaced by "cpu"; nothing
    else changes. On a CUDA machine, the unmodified function."""
    import_peft()
    import peft.utils.loftq_utils as loftq_utils

    if torch.cuda.is_available():
        return loftq_utils.loftq_init
    source = inspect.getsource(loftq_utils.loftq_init)
    assert source.count('"cuda"') == 1  # if peft changes this function, re-check this test
    namespace = dict(vars(loftq_utils))
    exec(source.replace('"cuda"', '"cpu"'), namespace)  # noqa: S102 (peft's own source text)
    return namespace["loftq_init"]


# --------------------------------------------------------------------------------------------
# one matrix
# --------------------------------------------------------------------------------------------
def test_error_falls_with_iterations_and_beats_plain_nf4():
    w = _weight()
    result = loftq(w, r=8, num_iter=5)
    errors = result.errors
    assert len(errors) == 5
    assert errors[0] < 0.85 * result.nf4_error  # one round already removes a good part of it
    for before, after in zip(errors, errors[1:]):
        assert after <= before * 1.001  # monotone, up to rounding
    assert errors[-1] < 0.95 * errors[0]
    # the returned pieces are what the errors measure
    q_plus_ba = result.dequantized + result.lora_B @ result.lora_A
    assert (w - q_plus_ba).norm().item() == pytest.approx(errors[-1], rel=1e-4)
    # Q is a true NF4 tensor: its codes and scales rebuild it exactly
    torch.testing.assert_close(dequantize_nf4(result.packed, result.state, torch.float32), result.dequantized,
                               atol=0, rtol=0)
    # a higher rank carries more of the error
    assert loftq(w, r=16, num_iter=1).errors[0] < errors[0]


@pytest.mark.parametrize("num_iter", [1, 3])
def test_same_as_peft_loftq_init(num_iter):
    w = _weight(seed=1)
    peft_q, peft_a, peft_b = _peft_loftq_init()(w, num_bits=4, reduced_rank=8, num_iter=num_iter)
    ours = loftq(w, r=8, num_iter=num_iter)
    atol = 1e-5 if torch.cuda.is_available() else 0.0  # another device's SVD rounds differently
    for mine, theirs in ((ours.dequantized, peft_q), (ours.lora_A, peft_a), (ours.lora_B, peft_b)):
        torch.testing.assert_close(mine, theirs.cpu(), atol=atol, rtol=0)


def test_scaling_is_divided_out():
    """LoRA multiplies B A by alpha / r: with scaling s, s · B A is the same rank-r correction."""
    w = _weight(seed=2)
    plain, scaled = loftq(w, r=8, num_iter=2), loftq(w, r=8, num_iter=2, scaling=4.0)
    torch.testing.assert_close(4.0 * scaled.lora_B @ scaled.lora_A, plain.lora_B @ plain.lora_A,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(scaled.dequantized, plain.dequantized, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# a model
# --------------------------------------------------------------------------------------------
def test_adapted_model_starts_closer_to_the_original_than_qlora():
    base = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = base(input_ids=ids).logits
        qlora = copy.deepcopy(base)  # the QLoRA start: NF4 base, B A = 0
        quantize_model_nf4(qlora, double_quant=False)
        qlora_gap = (qlora(input_ids=ids).logits - original).norm() / original.norm()
        model = peftlab.adapt(copy.deepcopy(base), "lora", init="loftq", r=16, alpha=16, targets="all-linear")
        loftq_gap = (model(input_ids=ids).logits - original).norm() / original.norm()
        # measured 0.061 vs 0.093 (random weights have no low-rank structure: LoftQ's worst case)
        assert loftq_gap < 0.75 * qlora_gap
        five = peftlab.adapt(copy.deepcopy(base), "loftq", r=16, alpha=16, loftq_iter=5, targets="all-linear")
        assert (five(input_ids=ids).logits - original).norm() / original.norm() < loftq_gap  # 0.053
        # the new base is NF4(W) (one round: Q = NF4(W)); the adapter alone closes the gap
        peftlab.set_disabled(model, True)
        torch.testing.assert_close(model(input_ids=ids).logits, qlora(input_ids=ids).logits, atol=1e-5, rtol=0)
        peftlab.set_disabled(model, False)
    report = loftq_errors(model)
    assert len(report) == 14
    assert all(r["errors"][0] < r["nf4_error"] for r in report.values())
    # only the adapter trains; the new base stays frozen
    assert all(not layer.base_layer.weight.requires_grad for layer in adapted_layers(model).values())


def test_quantising_the_loftq_base_gives_back_q_exactly():
    """NF4 of a dequantised NF4 tensor is itself: a real 4-bit base holds exactly LoftQ's Q."""
    model = peftlab.adapt(_tiny_llama(), "loftq", r=4, loftq_iter=2, targets=("q_proj", "v_proj"))
    q = {name: layer.base_layer.weight.detach().clone() for name, layer in adapted_layers(model).items()}
    quantize_model_nf4(model, double_quant=False)
    for name, layer in adapted_layers(model).items():
        assert isinstance(layer.base_layer, Linear4bitRef)
        torch.testing.assert_close(layer.base_layer.weight, q[name], atol=0, rtol=0)


def test_conv1d_base_keeps_its_layout():
    from transformers.pytorch_utils import Conv1D

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = Conv1D(48, 32)  # weight (d_in=32, d_out=48)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = Tiny()
    with torch.no_grad():
        net.proj.weight.copy_(_weight(seed=3, d_out=48, d_in=32).T)
    w = net.proj.weight.detach().clone()
    model = peftlab.adapt(net, "lora", init="loftq", r=8, targets=("proj",))
    layer = adapted_layers(model)["proj"]
    q_plus_delta = layer.base_layer.weight + layer.delta_weight()  # both (d_in, d_out)
    expected = loftq(w.T, r=8, scaling=1.0)
    assert (w - q_plus_delta).norm().item() == pytest.approx(expected.errors[0], rel=1e-4)


# --------------------------------------------------------------------------------------------
# registry, peft configs, errors
# --------------------------------------------------------------------------------------------
def test_peft_backend_same_model_and_config_translation():
    """backend="peft": peft's LoRA (init_lora_weights=True) then peftlab's LoftQ on its layers,
    since peft's own LoftQ needs CUDA; the model equals the reference one. The peft config says
    init_lora_weights=True, as peft's LoftQ recipe saves adapters (the weights are final)."""
    base = _tiny_llama()
    hp = dict(r=8, alpha=32, loftq_iter=2, targets=("q_proj", "v_proj", "down_proj"))
    ref = peftlab.adapt(copy.deepcopy(base), "loftq", **hp)
    pm = peftlab.adapt(copy.deepcopy(base), "loftq", backend="peft", **hp)
    assert pm.peft_config["default"].init_lora_weights is True
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=0)
    spec = peftlab.METHODS["loftq"]
    config = peftlab.api.make_config(spec, None, **hp, modules_to_save=())
    peft_config = to_peft_config(spec, config)
    assert (peft_config.init_lora_weights, peft_config.r, peft_config.lora_alpha) == (True, 8, 32)
    assert from_peft_config(peft_config)[0] == "lora"  # a finished LoRA adapter (on the LoftQ base)


def test_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="already 4-bit"):
        base = _tiny_llama()
        quantize_model_nf4(base)
        peftlab.adapt(base, "lora", init="loftq", targets=("q_proj",))
    with pytest.raises(ConfigError, match="loftq_bits"):
        peftlab.adapt(_tiny_llama(), "loftq", loftq_bits=8)
    with pytest.raises(ConfigError, match="loftq_iter"):
        peftlab.adapt(_tiny_llama(), "loftq", loftq_iter=0)
    with pytest.raises(ConfigError, match="init='loftq'"):
        peftlab.adapt(_tiny_llama(), "loftq", init="kaiming")
    with pytest.raises(ConfigError, match="linear layers"):
        peftlab.adapt(_tiny_llama(), "lora", init="loftq", targets=("embed_tokens",))
