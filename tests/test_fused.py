"""The fused backend (peftlab/production/fused/) against the reference path.

Tolerance: float32 throughout, outputs and gradients must agree to atol 1e-5 plus rtol 1e-4
(on the 30-layer SmolLM2, atol 1e-4 times the tensor's largest value: see that test). Every test randomises
the adapter weights first (B = 0 at init would let a wrong LoRA branch pass), so that a wrong
backward cannot agree by accident.
"""

from __future__ import annotations

import copy
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers
from peftlab.production import fused
from peftlab.production.fused import matmul

ATOL, RTOL = 1e-5, 1e-4


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial adapter weights (B != 0, magnitude away from ||W||)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen) * 0.1
                p.add_(noise.to(p.device, p.dtype))


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, relative: float | None = None) -> None:
    """|a - b| <= 1e-5 + 1e-4 |b|; with ``relative``, |a - b| <= relative * max |b| + 1e-4 |b|."""
    assert a is not None and b is not None, what
    atol = relative * b.abs().max().item() if relative else ATOL
    torch.testing.assert_close(a, b, atol=atol, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def assert_same_grads(ref: nn.Module, fz: nn.Module, relative: float | None = None) -> None:
    g_ref, g_fz = trainable_grads(ref), trainable_grads(fz)
    assert g_ref.keys() == g_fz.keys() and g_ref
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, f"{name} got no gradient: the test cannot fail"
        assert_close(g_fz[name], g_ref[name], name, relative)


# --------------------------------------------------------------------------------------------
# Layer level: plain Linear (with bias), Conv1D, peftlab's Linear4bitRef
# --------------------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self, base: str) -> None:
        super().__init__()
        if base == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.up, self.down = Conv1D(48, 32), Conv1D(16, 48)  # Conv1D(nf=d_out, nx=d_in)
            nn.init.normal_(self.up.weight, std=0.1)
            nn.init.normal_(self.down.weight, std=0.1)
        else:
            self.up, self.down = nn.Linear(32, 48), nn.Linear(48, 16)
        if base == "nf4-ref":
            from peftlab.quant.nf4 import quantize_model_nf4

            quantize_model_nf4(self, skip=())

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _outputs_and_input_grads(ref: nn.Module, fz: nn.Module, x: torch.Tensor):
    """([y_ref, y_fused], [dx_ref, dx_fused]) in training mode, same dropout masks for both."""
    ref.train(), fz.train()
    outs, xgrads = [], []
    for model in (ref, fz):
        xi = x.clone().requires_grad_()
        torch.manual_seed(123)  # same dropout masks for both
        y = model(xi)
        (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
        outs.append(y)
        xgrads.append(xi.grad)
    return outs, xgrads


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("base", ["linear", "conv1d", "nf4-ref"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_layer_parity(method, base, dropout):
    torch.manual_seed(0)
    net = TwoLayer(base)
    ref = peftlab.adapt(net, method, r=4, alpha=8.0, dropout=dropout, targets=("up", "down"))
    randomize_adapters(ref)
    fz = fused.fuse(copy.deepcopy(ref))  # the same adapter weights, run by the fused kernels
    assert all(type(m) is fused.FusedAdaptedLayer for m in adapted_layers(fz).values())
    outs, xgrads = _outputs_and_input_grads(ref, fz, torch.randn(3, 5, 32))
    assert_close(outs[1], outs[0], "output")
    assert_close(xgrads[1], xgrads[0], "input gradient")
    assert_same_grads(ref, fz)


def test_fused_layers_run_the_functions(monkeypatch):
    """The parity above must come from the fused kernels, not from a silent fallback."""
    calls = []
    for fn in (fused.LoRAFunction, fused.DoRAFunction):
        monkeypatch.setattr(fn, "forward", staticmethod(
            lambda *a, _f=fn.forward: calls.append(1) or _f(*a)))
    for method in ("lora", "dora"):
        net = peftlab.adapt(TwoLayer("nf4-ref"), method, r=4, targets=("up", "down"),
                            backend="fused")
        net(torch.randn(2, 32)).sum().backward()
    assert len(calls) == 4


def test_swiglu_mlp_is_fused(llama, monkeypatch):
    """Llama's MLP runs SwiGLUFunction (a = silu(g) * u recomputed in backward); unfuse
    gives the class's own forward back."""
    calls = []
    original = fused.SwiGLUFunction.forward
    monkeypatch.setattr(fused.SwiGLUFunction, "forward", staticmethod(
        lambda *a: calls.append(1) or original(*a)))
    model = peftlab.adapt(copy.deepcopy(llama), "lora", r=4, targets="all-linear", backend="fused")
    mlp = model.model.layers[0].mlp
    assert fused.is_swiglu_mlp(mlp) and "forward" in mlp.__dict__
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    assert len(calls) == len(model.model.layers)
    norm = model.model.layers[0].post_attention_layernorm
    assert "forward" in norm.__dict__  # the RMSNorms run RMSNormFunction
    fused.unfuse(model)
    assert "forward" not in mlp.__dict__ and not fused.has_fused_loss(model)
    assert "forward" not in norm.__dict__
    # LoRA on attention only: the MLPs' frozen down_proj goes through the Function as well
    calls.clear()
    model = peftlab.adapt(copy.deepcopy(llama), "lora", r=4, backend="fused")
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    assert len(calls) == len(model.model.layers)


@pytest.fixture(autouse=True)
def onednn_for_every_size(monkeypatch):
    """The tiny test models sit below ONEDNN_MIN_MACS; run their matmuls through oneDNN anyway
    (where this machine has it, whatever the speed rule picks), so the parity tests cover the kernels
    the benchmark times."""
    monkeypatch.setattr(fused, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(fused, "USE_ONEDNN", True)


def test_dense_linear_equals_f_linear(monkeypatch):
    """The fused Functions' matmuls (oneDNN for fp32 on x86 CPUs): x Wᵀ + b, dy W through a
    transposed view, several leading dims, no rows; bf16 goes to PyTorch's own matmul."""
    torch.manual_seed(0)
    calls = []
    op = matmul._onednn_linear()
    if op is not None:
        monkeypatch.setattr(matmul, "_onednn_linear", lambda: lambda *a: calls.append(1) or op(*a))
    monkeypatch.setattr(fused, "USE_ONEDNN", True)
    x, w, b, dy = torch.randn(2, 5, 24), torch.randn(40, 24), torch.randn(40), torch.randn(7, 40)
    assert_close(fused.dense_linear(x, w, b), F.linear(x, w, b), "x W^T + b")
    assert_close(fused.dense_linear(dy, w.T), dy @ w, "dy W")
    assert fused.dense_linear(torch.randn(0, 24), w).shape == (0, 40)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(fused.dense_linear(xb, wb), F.linear(xb, wb))
    assert len(calls) == (0 if op is None else 3)  # fp32 with rows: oneDNN ran


@pytest.mark.parametrize(("capability", "onednn_isa", "expected"),
                         [("AVX512", None, True), ("AVX512", "AVX2", False), ("AVX2", None, False),
                          ("DEFAULT", None, False), ("AVX512", "AVX512_CORE_AMX", True)])
def test_onednn_where_its_avx512_kernels_run(monkeypatch, capability, onednn_isa, expected):
    """The default picks oneDNN by the rule peftlab bench train justifies (matmul.py's table)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if onednn_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
    matmul.onednn_is_faster.cache_clear()
    try:
        assert matmul.onednn_is_faster() is expected
    finally:
        matmul.onednn_is_faster.cache_clear()


def test_parity_without_onednn(llama, monkeypatch):
    """USE_ONEDNN = False (PyTorch's own matmul everywhere) gives the same loss and gradients."""
    ref, fz = _model_pair(llama, "lora")
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(3))
    _, dx_on = _loss_and_input_grad(fz, ids, ids)
    grads_on = trainable_grads(fz)
    fz.zero_grad()
    monkeypatch.setattr(fused, "USE_ONEDNN", False)
    _, dx_off = _loss_and_input_grad(fz, ids, ids)
    assert_close(dx_off, dx_on, "input-embedding gradient")
    for name, grad in trainable_grads(fz).items():
        assert_close(grad, grads_on[name], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_function_equals_transformers(llama, dtype):
    """Llama's RMSNorm through RMSNormFunction: same output and input gradient as transformers'
    own forward (fp32: to rounding; bf16: bit-for-bit output, gradient to bf16 rounding); a
    trainable norm weight keeps autograd's forward (and gets its gradient)."""
    norm = copy.deepcopy(llama.model.layers[0].input_layernorm).to(dtype)
    assert fused.is_rms_norm(norm) and not fused.is_rms_norm(nn.LayerNorm(4))
    with torch.no_grad():
        norm.weight.normal_()
    norm.weight.requires_grad_(False)
    x = torch.randn(3, 5, norm.weight.numel(), dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    y_ref = norm(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    fused._wrap_forward(norm, fused._fused_rms_norm_forward)
    y = norm(x)
    assert y.grad_fn.name() == "RMSNormFunctionBackward"
    (dx,) = torch.autograd.grad(y, x, dy)
    if dtype == torch.float32:
        assert_close(y, y_ref, "output")
        assert_close(dx, dx_ref, "input gradient")
    else:
        assert torch.equal(y, y_ref)
        assert_close(dx.float(), dx_ref.float(), "input gradient", relative=0.02)
    norm.weight.requires_grad_(True)
    y = norm(x)
    assert y.grad_fn.name() != "RMSNormFunctionBackward"
    y.backward(dy)
    assert norm.weight.grad is not None


def test_fallbacks_stay_correct():
    """Two active adapters, LoRA on an embedding, a disabled adapter: reference forward."""
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8))
    ref = peftlab.adapt(emb, "lora", r=2, targets=("0", "1"))
    randomize_adapters(ref)
    fz = fused.fuse(copy.deepcopy(ref))
    ids = torch.randint(0, 50, (2, 7))
    assert_close(fz(ids), ref(ids), "embedding + linear")
    peftlab.set_disabled(fz), peftlab.set_disabled(ref)
    assert_close(fz(ids), ref(ids), "disabled")


# --------------------------------------------------------------------------------------------
# Model level: tiny Llama, fp32 and bitsandbytes NF4
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    """One tiny fp32 Llama for the whole module; tests adapt deep copies of it, never it."""
    model, _ = peftlab.load_model("tiny-llama")
    return model


@pytest.fixture(scope="module")
def tiny_llama_nf4():
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    pytest.importorskip("bitsandbytes")
    model, _ = peftlab.load_model("tiny-llama", quantization="nf4", device="cpu")
    return model


def _model_pair(base: nn.Module, method: str, dropout: float = 0.0, targets="all-linear"):
    ref = peftlab.adapt(copy.deepcopy(base), method, r=4, alpha=8.0, dropout=dropout,
                        targets=targets)
    randomize_adapters(ref)
    fz = fused.fuse(copy.deepcopy(ref))
    return ref, fz


def _loss_and_input_grad(model, ids, labels, seed=7):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    torch.manual_seed(seed)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    return out, embeds.grad


@pytest.mark.parametrize("method,quant,dropout,targets", [
    ("lora", None, 0.0, "all-linear"), ("dora", None, 0.0, "all-linear"),
    ("lora", None, 0.1, "all-linear"), ("lora", "nf4", 0.0, "all-linear"),
    ("dora", "nf4", 0.1, "all-linear"),
    # peftlab's default targets (attention only): the MLPs' frozen down_proj, dense or 4-bit,
    # runs SwiGLUFunction without LoRA
    ("lora", None, 0.0, None), ("lora", "nf4", 0.1, None),
])
def test_model_parity(llama, tiny_llama_nf4, method, quant, dropout, targets):
    base = tiny_llama_nf4 if quant else llama
    if quant:
        import bitsandbytes as bnb

        assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ref, fz = _model_pair(base, method, dropout, targets)
    ref.train(), fz.train()
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    out_ref, dx_ref = _loss_and_input_grad(ref, ids, labels)
    out_fz, dx_fz = _loss_and_input_grad(fz, ids, labels)
    assert out_fz.logits is None  # the fused loss never built them
    assert_close(out_fz.loss, out_ref.loss, "loss")
    assert_close(dx_fz, dx_ref, "input-embedding gradient")
    assert_same_grads(ref, fz)
    with torch.no_grad():  # without labels: full logits, same as the reference
        ref.eval(), fz.eval()
        assert_close(fz(input_ids=ids).logits, ref(input_ids=ids).logits, "logits")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_token_inputs_with_dropout(llama, method):
    """model(input_ids=...) as in training: the first block's inputs come from frozen embeddings
    and need no gradient, so the Functions there get no input gradient to compute (DoRA with
    dropout once tried to use a weight it had not fetched)."""
    ref, fz = _model_pair(llama, method, dropout=0.1)
    ref.train(), fz.train()
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (ref, fz):
        torch.manual_seed(11)  # same dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], "loss")
    assert_same_grads(ref, fz)


def test_parity_across_combinations(llama, tiny_llama_nf4):
    """Every combination at once (one base at a time): base (fp32, bitsandbytes NF4, peftlab NF4,
    bf16) x LoRA / DoRA x dropout x targets (peftlab's default, all-linear, o_proj + down_proj,
    gate_proj alone) x token ids / embeddings that need a gradient x gradient checkpointing:
    256 fused-vs-reference steps, loss and every adapter gradient. Each dimension has its own test
    above; this one is for their interactions (DoRA + dropout + token ids once crashed)."""
    import itertools

    from peftlab.quant.nf4 import quantize_model_nf4

    nf4_ref = copy.deepcopy(llama)
    quantize_model_nf4(nf4_ref)
    bases = {"fp32": llama, "bnb-nf4": tiny_llama_nf4, "peftlab-nf4": nf4_ref,
             "bf16": copy.deepcopy(llama).to(torch.bfloat16)}
    targets = {"default": None, "all-linear": "all-linear", "o+down": ("o_proj", "down_proj"),
               "gate": ("gate_proj",)}
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(1))
    failures = []
    for (base_name, base), method, dropout, target, inputs, checkpointing in itertools.product(
            bases.items(), ["lora", "dora"], [0.0, 0.1], targets, ["ids", "embeds"], [False, True]):
        ref, fz = _model_pair(base, method, dropout, targets[target])
        losses, grads = [], []
        for model in (ref, fz):
            model.train()
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            torch.manual_seed(5)  # same dropout masks
            if inputs == "ids":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
                loss = model(inputs_embeds=embeds, labels=ids).loss
            loss.backward()
            losses.append(loss.detach().float())
            grads.append(trainable_grads(model))
        # bf16: both paths round differently at each of ~20 matmuls (see test_bf16_base_close_to_reference)
        tol = 5e-2 if base_name == "bf16" else 1e-4
        worst = max(((g - grads[0][k]).abs().max() / grads[0][k].abs().max()).item()
                    for k, g in grads[1].items())
        if (grads[0].keys() != grads[1].keys() or worst > 10 * tol
                or not torch.allclose(losses[1], losses[0], rtol=tol, atol=tol)):
            failures.append(f"{base_name} {method} dropout={dropout} {target} {inputs} "
                            f"checkpointing={checkpointing}: loss {losses[0]:.6f} vs {losses[1]:.6f}, "
                            f"worst gradient error {worst:.2e} of max")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_parity(llama, reentrant):
    """QLoRA recipes turn on gradient checkpointing: the fused Functions (LoRA, SwiGLU, RMSNorm,
    loss) recomputed inside checkpointed layers give the reference's loss and gradients."""
    ref, fz = _model_pair(llama, "lora")
    for model in (ref, fz):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(2))
    out_ref, dx_ref = _loss_and_input_grad(ref, ids, ids)
    out_fz, dx_fz = _loss_and_input_grad(fz, ids, ids)
    assert_close(out_fz.loss, out_ref.loss, "loss")
    assert_close(dx_fz, dx_ref, "input-embedding gradient")
    assert_same_grads(ref, fz)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bf16_base_close_to_reference(llama, method):
    """A bf16 base with fp32 adapters (the usual mixed setup): LoRA adds its fp32 branch as the
    reference does (same loss to bf16 rounding), DoRA computes in bf16; gradients agree to bf16
    rounding (relative error of each gradient tensor below 5%)."""
    ref, fz = _model_pair(copy.deepcopy(llama).to(torch.bfloat16), method)
    ref.train(), fz.train()
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(8))
    losses = [m(input_ids=ids, labels=ids).loss for m in (ref, fz)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-3
    g_ref, g_fz = trainable_grads(ref), trainable_grads(fz)
    for name in g_ref:
        assert g_fz[name].dtype == torch.float32
        assert (g_fz[name] - g_ref[name]).norm() < 0.05 * g_ref[name].norm(), name


def test_nf4_eval_then_train_still_learns(tiny_llama_nf4):
    """bitsandbytes' AVX512-BF16 repack trap: the fused path never calls its forward, so an
    eval-mode no-grad pass cannot strip the gradient path."""
    import bitsandbytes as bnb

    model = peftlab.adapt(copy.deepcopy(tiny_llama_nf4), "lora", r=4, targets="all-linear",
                          backend="fused")
    randomize_adapters(model)  # B != 0, so A gets a gradient too
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # the trap armed, as bitsandbytes ships it
    ids = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = trainable_grads(model)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())


# --------------------------------------------------------------------------------------------
# The fused cross-entropy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_linear_cross_entropy_matches_torch(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(100, 16, generator=gen).mul_(0.3).requires_grad_()
    bias = torch.randn(100, generator=gen).requires_grad_()
    targets = torch.randint(0, 100, (4, 9), generator=gen)
    targets[1, 3:] = -100
    for num_items in (None, 50):
        ref = F.cross_entropy((hidden @ weight.T + bias).reshape(-1, 100), targets.reshape(-1),
                              reduction="mean" if num_items is None else "sum")
        ref = ref if num_items is None else ref / num_items
        grads_ref = torch.autograd.grad(ref * 3.0, (hidden, weight, bias))
        loss = fused.linear_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk,
                                          num_items_in_batch=num_items)
        grads = torch.autograd.grad(loss * 3.0, (hidden, weight, bias))  # upstream grad != 1
        assert_close(loss, ref, "loss")
        for g, g_ref, name in zip(grads, grads_ref, ("hidden", "weight", "bias")):
            assert_close(g, g_ref, name)


def test_fused_loss_equals_transformers_loss(llama):
    """model(input_ids, labels, num_items_in_batch): fused vs transformers' ForCausalLMLoss,
    loss and gradients, with -100 labels and the label shift."""
    model = peftlab.adapt(copy.deepcopy(llama), "lora", r=4, targets="all-linear", backend="fused")
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 49152, (3, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, -1] = -100
    results = []
    for use_fused in (False, True):
        if use_fused:
            fused.install_fused_loss(model)
        else:
            fused.remove_fused_loss(model)
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(11))
        out.loss.backward()
        results.append((out, trainable_grads(model)))
    (hf, g_hf), (fz, g_fz) = results
    assert hf.logits is not None and hf.logits.shape == (3, 10, 49152) and fz.logits is None
    assert_close(fz.loss, hf.loss, "loss")
    for name in g_hf:
        assert_close(g_fz[name], g_hf[name], name)
    with torch.no_grad():  # evaluation with labels: loss only, same value
        assert_close(model(input_ids=ids, labels=labels).loss,
                     F.cross_entropy(hf.logits[:, :-1].reshape(-1, 49152),
                                     labels[:, 1:].reshape(-1)),
                     "no-grad loss")


def test_trainer_style_step_learns(llama):
    """The call transformers' Trainer and TRL make: model(**batch).loss.backward()."""
    model = peftlab.adapt(copy.deepcopy(llama), "lora", r=8, alpha=16.0, targets="all-linear",
                          backend="fused")
    model.train()
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_transformers_trainer_uses_fused_loss(llama, tmp_path, monkeypatch):
    """One Trainer step (2 micro-batches, so Trainer passes num_items_in_batch): the fused loss
    runs, and the adapter after the step equals the one trained with transformers' own loss."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    calls = []
    original = fused.LinearCrossEntropyFunction.forward
    monkeypatch.setattr(fused.LinearCrossEntropyFunction, "forward", staticmethod(
        lambda *a: calls.append(1) or original(*a)))
    ids = torch.randint(0, 49152, (4, 12), generator=torch.Generator().manual_seed(9)).tolist()
    labels = [[-100] * 3 + row[3:] for row in ids]  # masked prompts
    data = Dataset.from_dict({"input_ids": ids, "labels": labels, "text": ["unused"] * 4})
    start = peftlab.adapt(copy.deepcopy(llama), "lora", r=4, targets="all-linear")
    randomize_adapters(start)
    trained, losses = [], []
    for use_fused in (False, True):
        model = fused.fuse(copy.deepcopy(start), loss=use_fused)
        # plain SGD without clipping, so the step shows the gradient's size, not just its sign
        args = TrainingArguments(str(tmp_path / str(use_fused)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=1, optim="sgd",
                                 learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                                 report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                 disable_tqdm=True)
        losses.append(Trainer(model=model, args=args, train_dataset=data).train().training_loss)
        trained.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert len(calls) == 2  # two micro-batches through the fused loss, none without it
    assert abs(losses[1] - losses[0]) < 1e-5
    moved = max((trained[0][n] - start.get_parameter(n)).abs().max() for n in trained[0])
    assert moved > 1e-3  # the step changed the adapter enough for the comparison to mean much
    for name in trained[0]:
        assert_close(trained[1][name], trained[0][name], name)


# --------------------------------------------------------------------------------------------
# The rest of peftlab keeps working
# --------------------------------------------------------------------------------------------
def test_adapt_backend_fused_and_errors(llama):
    from peftlab.api import BACKENDS

    assert "fused" in BACKENDS
    model = peftlab.adapt(copy.deepcopy(llama), "dora", r=4, backend="fused")
    assert fused.has_fused_loss(model) and model.peftlab.backend == "fused"
    assert peftlab.count_parameters(model).trainable > 0
    other = copy.deepcopy(llama)
    with pytest.raises(ConfigError, match="fused"):
        peftlab.adapt(other, "loha", backend="fused")
    assert not adapted_layers(other)  # the refused call left the model alone
    fused.unfuse(model)
    assert not fused.has_fused_loss(model)
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids, labels=ids).logits is not None


def test_wrapped_forward_keeps_signature_and_copies(llama):
    """Trainer reads forward's signature to pick dataset columns; deepcopy must rebind the
    wrapped forwards to the copy (else the copy would run the original's modules)."""
    import inspect

    model = peftlab.adapt(copy.deepcopy(llama), "lora", r=4, targets="all-linear", backend="fused")
    randomize_adapters(model)
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.zero_()  # the twin is now the base model
        ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
        base_loss = llama(input_ids=ids, labels=ids).loss
        assert_close(twin(input_ids=ids, labels=ids).loss, base_loss, "twin == base")
        assert (model(input_ids=ids, labels=ids).loss - base_loss).abs() > 1e-3


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_save_load(llama, tmp_path, method):
    ref, fz = _model_pair(llama, method)
    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = fz(input_ids=ids).logits
        peftlab.save_adapter(fz, tmp_path / "adapter")
        loaded = peftlab.load_adapter(copy.deepcopy(llama), tmp_path / "adapter")
        assert_close(loaded(input_ids=ids).logits, before, "reloaded into the reference path")
        assert_close(fused.fuse(loaded)(input_ids=ids).logits, before, "reloaded, fused")
        peftlab.merge(fz)
        assert_close(fz(input_ids=ids).logits, before, "merged")
        peftlab.unmerge(fz)
        assert_close(fz(input_ids=ids).logits, before, "unmerged")


def _float64_truth(model: nn.Module) -> nn.Module:
    """A float64 copy that computes in float64 throughout: transformers' RMSNorm (and its loss)
    up-cast to float32 on purpose, which in a float64 model is a down-cast that rounds like the
    float32 run it is meant to judge."""
    exact = copy.deepcopy(model).double()

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in exact.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm, module)
    return exact


def _float64_loss_and_input_grad(exact, ids):
    embeds = exact.get_input_embeddings()(ids).detach().requires_grad_()
    logits = exact(inputs_embeds=embeds).logits  # (B, T, V) float64
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss, embeds.grad


@pytest.mark.slow
def test_smollm2_parity(smollm2):
    """The real 135M model, one short batch: fused (LoRA, SwiGLU, fused loss) == reference.

    30 layers of float32 rounding, so the tolerance is measured on the run, not set at the edge
    of one machine's result: a float64 run of the same model gives the true loss and gradients;
    the reference's worst relative error (its largest |error| / max |true value| over the loss,
    the input gradient and every adapter gradient) is this machine's float32 rounding for this
    computation, and every fused result must be within 4x of it (each path sums in its own
    order; measured ratios 0.6x-1.7x over random adapters here).
    """
    torch.manual_seed(0)
    ref, fz = _model_pair(smollm2[0], "lora")
    exact = _float64_truth(ref)
    ref.train(), fz.train(), exact.train()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(6))
    out_ref, dx_ref = _loss_and_input_grad(ref, ids, ids)
    out_fz, dx_fz = _loss_and_input_grad(fz, ids, ids)
    loss_64, dx_64 = _float64_loss_and_input_grad(exact, ids)
    g_ref, g_fz, g_64 = trainable_grads(ref), trainable_grads(fz), trainable_grads(exact)
    assert g_ref.keys() == g_fz.keys() == g_64.keys() and g_ref
    truth = {"loss": loss_64, "input-embedding gradient": dx_64, **g_64}
    refs = {"loss": out_ref.loss, "input-embedding gradient": dx_ref, **g_ref}
    fused_results = {"loss": out_fz.loss, "input-embedding gradient": dx_fz, **g_fz}

    def relative_error(got, true):
        return (got.double() - true).abs().max().item() / true.abs().max().item()

    rounding = max(relative_error(refs[name], truth[name]) for name in truth)
    assert 0 < rounding < 1e-2, f"the float32 reference is off float64 by {rounding:.2g}"
    for name, true in truth.items():
        assert true.abs().sum() > 0, f"{name} is zero: the test cannot fail"
        err = relative_error(fused_results[name], true)
        assert err <= 4 * rounding, (f"{name}: fused is off float64 by {err:.3g} of its largest value; "
                                     f"the float32 reference by at most {rounding:.3g}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_cuda_layer_parity_nf4_ref(method):
    """peftlab's own NF4 layer on the GPU (its codes and scales are buffers: .cuda() moves them)."""
    torch.manual_seed(0)
    ref = peftlab.adapt(TwoLayer("nf4-ref").cuda(), method, r=4, alpha=8.0, targets=("up", "down"))
    randomize_adapters(ref)
    fz = fused.fuse(copy.deepcopy(ref))
    outs, grads = _outputs_and_input_grads(ref, fz, torch.randn(3, 5, 32, device="cuda"))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)  # GPU sums in other orders
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)
    assert_same_grads(ref, fz, relative=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_cuda_parity(llama, method, quant):
    """tiny Llama on the GPU, full-precision and bitsandbytes NF4 bases (QLoRA)."""
    if quant:
        pytest.importorskip("bitsandbytes")
        base, _ = peftlab.load_model("tiny-llama", quantization="nf4", device="cuda")
    else:
        base = copy.deepcopy(llama).cuda()
    ref, fz = _model_pair(base, method, dropout=0.1)
    ref.train(), fz.train()
    ids = torch.randint(0, 49152, (2, 12), device="cuda")
    out_ref, dx_ref = _loss_and_input_grad(ref, ids, ids)
    out_fz, dx_fz = _loss_and_input_grad(fz, ids, ids)
    torch.testing.assert_close(out_fz.loss, out_ref.loss, atol=1e-4, rtol=1e-4)  # GPU sums in other orders
    torch.testing.assert_close(dx_fz, dx_ref, atol=1e-4, rtol=1e-3)
    assert_same_grads(ref, fz, relative=1e-3)
