"""peftlab.quant.nf4 against bitsandbytes 0.50.2 (CPU): code books, packed codes, absmax constants,
double quantisation and dequantised weights must be *equal* (torch.equal), not merely close."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.quant import nf4

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module", autouse=True)
def fast_cpu():
    """bnb torch.compiles its odd-shape dequantiser (~4 s per new shape): run it eagerly. And one
    thread: these tensors are tiny, and on a busy 2-core machine threads cost ~10 ms per op."""
    import torch._dynamo

    old = torch._dynamo.config.disable, torch.get_num_threads()
    torch._dynamo.config.disable = True
    torch.set_num_threads(1)
    yield
    torch._dynamo.config.disable = old[0]
    torch.set_num_threads(old[1])


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _assert_same_as_bnb(w, quant_type, double_quant, blocksize=64):
    ref_packed, ref = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                         compress_statistics=double_quant)
    packed, state = nf4.quantize_4bit(w, quant_type, blocksize, double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(state.double.absmax, ref.state2.absmax)
        assert torch.equal(state.double.offset, ref.offset)
        assert torch.equal(state.double.code, ref.state2.code)
        assert state.double.blocksize == ref.state2.blocksize == 256
    out, ref_out = nf4.dequantize_4bit(packed, state), bnbf.dequantize_4bit(ref_packed, ref)
    assert out.dtype == ref_out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, ref_out.reshape(w.shape))  # bnb gives even-length 1-D weights as (1, n)
    return packed, state


# ---- code books ------------------------------------------------------------------------------
def test_nf4_code_is_derived_and_equals_bitsandbytes_table():
    code = nf4.NF4_CODE
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.equal(code, bnbf.get_4bit_type("nf4", device="cpu"))  # bit for bit, not ~1e-7
    assert code[7] == 0 and code[0] == -1 and code[-1] == 1
    assert (code[:7] < 0).sum() == 7 and (code[8:] > 0).sum() == 8 and torch.all(code.diff() > 0)
    # the paper's unrounded offset: the same table to float32 tolerance
    offset = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2
    assert offset == pytest.approx(0.9677083, abs=1e-7)
    assert torch.allclose(nf4.normal_float_code(offset), code, rtol=0, atol=5e-7)


def test_fp4_and_dynamic_code_books_equal_bitsandbytes():
    assert torch.equal(nf4.FP4_CODE, bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_CODE, bnbf.create_dynamic_map())


# ---- packed codes, constants and dequantised weights -------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 128), (33, 65), (7,), (600, 64)])
def test_bit_exact_with_bitsandbytes(quant_type, double_quant, dtype, shape):
    # (33, 65): n = 2145 is odd and no multiple of 64; (600, 64): 600 blocks, 3 double-quant blocks
    _assert_same_as_bnb(_weight(shape, dtype), quant_type, double_quant)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_block_sizes(blocksize):
    _assert_same_as_bnb(_weight((40, 256), torch.float32, seed=1), "nf4", True, blocksize)


@pytest.mark.parametrize("double_quant", [True, False])
def test_blocks_spanning_rows_follow_bnb_reference_kernel(double_quant):
    """d_in = 96 is no multiple of 64, so blocks straddle rows. bitsandbytes 0.50.2's CPU C
    dequantiser gets this case wrong (relative error ~0.26 instead of ~0.09, found while writing
    this test); its own pure-torch kernel (the "default" backend) and ours agree bit for bit."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    w = _weight((20, 96), torch.float32, seed=2)
    ref_packed, ref = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    packed, state = nf4.quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(packed, ref_packed)
    absmax = ref.absmax
    if double_quant:
        absmax = bnbf.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
    expected = default_ops._dequantize_4bit_compute(ref_packed.reshape(-1), absmax, ref.code, 64,
                                                    w.shape, torch.float32)
    out = nf4.dequantize_nf4(packed, state)
    assert torch.equal(out, expected)
    assert ((out - w).norm() / w.norm()).item() < 0.12


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_at_midpoints_go_to_the_lower_code(quant_type):
    code = nf4.CODES[quant_type]
    sorted_code, order = torch.sort(code, stable=True)
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2  # exactly representable halfway points
    # absmax 1 makes w / absmax == w, so every value sits exactly on a midpoint
    w = torch.zeros(64)
    w[0] = 1.0
    w[1 : 1 + mids.numel()] = mids
    packed, state = _assert_same_as_bnb(w, quant_type, double_quant=False)
    q = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], 1).reshape(-1).long()
    assert torch.equal(q[1 : 1 + mids.numel()], order[:-1])  # the lower neighbour, every time


def test_fp4_signed_zeros_and_tiny_values():
    # bnb sorts FP4's +0 before -0: tiny positive values get the "-0" pattern, tiny negatives "+0"
    w = torch.tensor([1.0, 0.0, 1e-4, -1e-4, 0.002, -0.002, 0.003, -0.003] * 8)
    _assert_same_as_bnb(w, "fp4", double_quant=False)


def test_zero_blocks_and_equal_absmax():
    w = _weight((4, 64), torch.float32)
    w[1] = 0  # an all-zero block
    _assert_same_as_bnb(w, "nf4", double_quant=True)
    # every block has absmax 0.5: absmax - mean is all zero, an all-zero 8-bit block
    _assert_same_as_bnb(torch.full((8, 64), 0.5), "nf4", double_quant=True)


def test_8bit_grid_quirk_matches_bitsandbytes():
    mids = (nf4.DYNAMIC_CODE[:-1] + nf4.DYNAMIC_CODE[1:]) / 2
    near = torch.cat([mids + d for d in (-2e-5, -1e-5, -1e-6, 0.0, 1e-6, 1e-5, 2e-5)]).clamp(-1, 1)
    chunks = [torch.cat([torch.ones(1), c]) for c in near.split(255)]  # absmax 1 in every block
    x = torch.cat(chunks)
    ref, ref_state = bnbf.quantize_blockwise(x, code=bnbf.create_dynamic_map(), blocksize=256)
    codes, absmax = nf4._quantize_8bit(x, nf4.DYNAMIC_CODE)
    assert torch.equal(codes, ref) and torch.equal(absmax, ref_state.absmax)
    # ... and this really is not plain nearest-neighbour: some values take the farther code
    exact = nf4._nearest(x, nf4.DYNAMIC_CODE).to(torch.uint8)
    assert (exact != ref).any()


# ---- bits per parameter ------------------------------------------------------------------------
def test_bits_per_parameter_matches_the_papers_arithmetic():
    w = _weight((128, 256), torch.float32)  # n = 32768 = 2 * 64 * 256
    n = w.numel()
    packed, state = nf4.quantize_nf4(w, double_quant=True)
    bits = nf4.bits_per_parameter(state, packed)
    assert bits == nf4.bits_per_parameter(state)
    # codes + 8-bit absmax + fp32 absmax per 256 blocks + the one fp32 mean (vanishes for big n)
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    assert 4 + 8 / 64 + 32 / (64 * 256) == pytest.approx(4.127, abs=1e-3)
    packed, state = nf4.quantize_nf4(w, double_quant=False)
    assert nf4.bits_per_parameter(state, packed) == 4.5


# ---- error comparison --------------------------------------------------------------------------
def test_quantization_error_nf4_beats_fp4_and_int4_on_normal_weights():
    w = _weight((256, 256), torch.float32, seed=3)
    errs = {kind: nf4.quantization_error(w, kind) for kind in ("nf4", "fp4", "int4")}
    for e in errs.values():
        assert e.errors.shape == (w.numel(),)
        assert e.rmse == pytest.approx(e.errors.pow(2).mean().sqrt().item())
        assert 0 < e.mean_abs <= e.rmse <= e.max_abs
    assert errs["nf4"].rmse < errs["int4"].rmse < errs["fp4"].rmse
    assert errs["nf4"].relative < 0.15
    with pytest.raises(ConfigError, match="nf4"):
        nf4.quantization_error(w, "nf5")


def test_int4_is_symmetric_rounding():
    w = _weight((8, 64), torch.float32)
    packed, state = nf4.quantize_int4(w)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    expected = (torch.round(w.reshape(-1, 64) / absmax * 7) / 7 * absmax).reshape(w.shape)
    assert torch.allclose(nf4.dequantize_int4(packed, state), expected, rtol=0, atol=1e-6)


def test_bad_input_is_a_config_error():
    with pytest.raises(ConfigError, match="floating-point"):
        nf4.quantize_nf4(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ConfigError, match="blocksize"):
        nf4.quantize_nf4(torch.ones(4), blocksize=0)


# ---- Linear4bitRef -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_ref_equals_bnb_linear4bit(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48).to(dtype)
    ours = nf4.Linear4bitRef.from_linear(linear, compute_dtype=dtype)
    theirs = bnb.nn.Linear4bit(128, 48, bias=True, compute_dtype=dtype, compress_statistics=True,
                               quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bnb quantises when the module is moved
    theirs.support_avx512bf16_for_cpu = False  # else eval forwards repack the weight for a CPU kernel
    # bnb's module keeps an fp32 weight (load_state_dict copies bf16 values into it): same codes
    theirs_w = bnbf.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(nf4.dequantize_4bit(ours.packed, ours.state, theirs_w.dtype), theirs_w)

    x = torch.randn(3, 5, 128).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)


def test_linear4bit_ref_keeps_fp32_scales_under_dtype_casts():
    layer = nf4.Linear4bitRef.from_linear(nn.Linear(64, 32))
    before = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == torch.uint8 and layer.absmax2.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight, before)
    assert set(layer.state_dict()) == {"bias", "packed", "absmax", "absmax2", "offset"}


def _tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, 64), act=nn.ReLU(), fc2=nn.Linear(64, 64),
                                     lm_head=nn.Linear(64, 10)))


def test_quantize_model_nf4_replaces_linears_and_counts_memory():
    model, fake_quant = _tiny_mlp(), _tiny_mlp()
    with torch.no_grad():  # the dense model with each weight replaced by its 4-bit round trip
        for name in ("fc1", "fc2"):
            w = fake_quant.get_submodule(name).weight
            w.copy_(nf4.dequantize_nf4(*nf4.quantize_nf4(w)))
    x = torch.randn(4, 64)
    with torch.no_grad():
        dense, expected = model(x), fake_quant(x)
    report = nf4.quantize_model_nf4(model)
    assert report.layers == ("fc1", "fc2")
    assert isinstance(model.fc1, nf4.Linear4bitRef) and type(model.lm_head) is nn.Linear
    assert report.bytes_before == 2 * 64 * 64 * 4
    # per layer: 2048 code bytes + 64 uint8 absmax + 1 fp32 second-level absmax + 1 fp32 mean
    assert report.bytes_after == 2 * (2048 + 64 + 4 + 4)
    assert report.bytes_saved == report.bytes_before - report.bytes_after
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, expected)
    assert ((out - dense).norm() / dense.norm()).item() < 0.2  # 4-bit noise through two layers


def test_linear4bit_ref_under_the_injector_trains_lora_and_refuses_merge():
    from peftlab import api, inject

    model = _tiny_mlp()
    nf4.quantize_model_nf4(model)
    assert inject.layer_dims(model.fc1) == (64, 64)
    assert torch.equal(inject.dense_weight(model.fc1), model.fc1.weight)
    api.adapt(model, "lora", r=4, targets=("fc1", "fc2"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    for layer in inject.adapted_layers(model).values():
        nn.init.normal_(layer.adapters["default"].lora_B)
    loss = model(torch.randn(4, 64)).pow(2).mean()
    loss.backward()
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    with pytest.raises(ConfigError, match="4-bit"):
        api.merge(model)
