"""The memory ledger: estimate (no weights loaded) against a measured step, within 15%."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.api import adapt
from peftlab.errors import ConfigError
from peftlab.memory import CATEGORIES, MemoryLedger, estimate_memory, measure_memory, nf4_bytes
from peftlab.models import load_model

TOLERANCE = 0.15
COMPARED = ("weights", "adapter_weights", "gradients", "optimizer", "activations", "total")


def _check_within(est: MemoryLedger, got: MemoryLedger, tolerance: float = TOLERANCE) -> None:
    errors = est.relative_error(got)
    assert set(COMPARED) <= set(errors), (errors, est.table(got))
    bad = {k: v for k, v in errors.items() if abs(v) > tolerance}
    assert not bad, f"estimate off by more than {tolerance:.0%}: {bad}\n{est.table(got)}"


def _check_activations(est: MemoryLedger, got: MemoryLedger, rel: float) -> None:
    """Activations within ``rel``, the logits taken out: they are the same in both and most of a
    tiny model's activations, so they would hide an error in the rest."""
    logits = est.details["activation_terms"].get("log_softmax", 0)
    assert est.activations - logits == pytest.approx(got.activations - logits, rel=rel), est.table(got)


@pytest.mark.parametrize(
    ("dtype", "quantization", "backend"),
    [("float32", None, "reference"), ("bfloat16", None, "reference"), ("float32", None, "peft"),
     ("float32", "nf4", "peft"), ("bfloat16", "nf4", "reference")],
    ids=["lora-fp32", "lora-bf16", "peft-lora-fp32", "qlora-nf4-fp32", "qlora-nf4-bf16"],
)
def test_estimate_within_15_percent_of_measurement_tiny_llama(dtype, quantization, backend):
    est = estimate_memory("tiny-llama", "lora", r=16, batch=2, seq_len=64, dtype=dtype,
                          quantization=quantization, targets="all-linear")
    model, _ = load_model("tiny-llama", dtype=dtype, quantization=quantization)
    torch.manual_seed(0)
    model = adapt(model, "lora", backend=backend, r=16, targets="all-linear")
    got = measure_memory(model, batch=2, seq_len=64)
    _check_within(est, got)
    # the logits are the largest activation here: B·T·V fp32 values kept by log_softmax
    assert est.details["activation_terms"]["log_softmax"] == 2 * 64 * 49152 * 4
    assert got.activations > 2 * 64 * 49152 * 4


@pytest.mark.parametrize(
    ("method", "backend", "dtype", "quantization", "targets", "dropout"),
    [("lora", "fused", "float32", None, "all-linear", 0.0),
     ("lora", "fused", "float32", None, None, 0.0),  # attention only: the MLP is fused anyway
     ("lora", "fused", "bfloat16", None, "all-linear", 0.1),
     ("lora", "fused", "float32", "nf4", "all-linear", 0.0),  # fused QLoRA on bitsandbytes
     ("lora", "fused", "bfloat16", "nf4", None, 0.1),
     ("dora", "fused", "float32", None, "all-linear", 0.1),
     ("lora", "reference", "float32", None, "all-linear", 0.1),
     ("lora", "reference", "bfloat16", None, "all-linear", 0.1),  # up-cast, then dropout
     ("dora", "reference", "float32", None, "all-linear", 0.0),
     # peft's DoRA also saves an identity matrix per layer for a weight norm it then detaches:
     # freed before backward, so not counted (the measurement keeps only what the graph holds)
     ("dora", "peft", "float32", None, "all-linear", 0.0)],
    ids=["fused-lora", "fused-lora-qv", "fused-lora-bf16-dropout", "fused-qlora",
         "fused-qlora-bf16-qv-dropout", "fused-dora-dropout", "lora-dropout", "lora-bf16-dropout",
         "dora", "peft-dora"],
)
def test_estimate_follows_backend_and_dropout(method, backend, dtype, quantization, targets, dropout):
    """The fused path keeps far fewer activations (no logits, no silu(gate) * up, RMSNorm keeps
    x in its own dtype); dropout makes each adapted layer keep dropout(x) and a mask. The formula
    tracks both, well inside 15%: activations within 2% here."""
    kwargs = dict(r=16, targets=targets, dropout=dropout)
    est = estimate_memory("tiny-llama", method, batch=2, seq_len=64, dtype=dtype,
                          quantization=quantization, backend=backend, **kwargs)
    model, _ = load_model("tiny-llama", dtype=dtype, quantization=quantization)
    torch.manual_seed(0)
    got = measure_memory(adapt(model, method, backend=backend, **kwargs), batch=2, seq_len=64)
    _check_within(est, got)
    terms = est.details["activation_terms"]
    assert ("log_softmax" in terms) == (backend != "fused")  # the fused loss keeps no logits
    _check_activations(est, got, rel=0.02)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_gradient_checkpointing_estimate(backend):
    """Checkpointed blocks keep only their inputs; the block recomputed in backward is a
    temporary (it lives after the loss's buffers are gone), not a saved activation."""
    kwargs = dict(r=16, targets="all-linear", backend=backend)
    est = estimate_memory("tiny-llama", "lora", batch=2, seq_len=64, gradient_checkpointing=True, **kwargs)
    model, _ = load_model("tiny-llama")
    model = adapt(model, "lora", **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = measure_memory(model, batch=2, seq_len=64)
    _check_within(est, got)
    assert abs(est.relative_error(got)["activations"]) < 0.1, est.table(got)
    assert est.temporaries >= est.details["activation_terms"]["recomputed_block"]


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_soft_prompt_estimates(method):
    """Input prompts: n virtual tokens before every input, so the model runs on seq_len + n
    positions (logits included) and block 0's input needs a gradient. A prefix: every attention
    reads n trained keys and values first, through an explicit (T, n + T) mask."""
    est = estimate_memory("tiny-llama", method, batch=2, seq_len=64)
    model, _ = load_model("tiny-llama")
    torch.manual_seed(0)
    got = measure_memory(adapt(model, method), batch=2, seq_len=64)
    _check_within(est, got)
    positions = 64 if method == "prefix_tuning" else 64 + 20  # 20 virtual tokens by default
    assert est.details["activation_terms"]["log_softmax"] == 2 * positions * 49152 * 4
    _check_activations(est, got, rel=0.02)


# methods whose own saved tensors the formula models (the rest are counted as LoRA)
MODELLED = {"lora", "loftq", "adalora", "dora", "vera", "loha", "lokr", "ia3", "bitfit",
            "prompt_tuning", "p_tuning", "prefix_tuning"}


def test_every_method_estimate_against_measurement():
    """Each registered method with its own defaults, 2 x 64 tokens: the whole ledger within 15%,
    and for the methods the formula models, the activations (logits aside) within 2%."""
    from peftlab.methods import METHODS

    off = {}
    from tests.support_matrix import SMALL_MODEL_SETTINGS

    for name in METHODS:
        model_name = "tiny-bert" if name == "bitfit" else "tiny-llama"  # Llama has no biases
        # the method's own defaults, as peftlab.adapt uses them (LoRA 8, VeRA 256, OFT blocks), except
        # where a default cannot fit the 32-wide tiny model (the support matrix's small settings)
        extra = {"total_step": 10} if name == "adalora" else dict(SMALL_MODEL_SETTINGS.get(name, {}))
        est = estimate_memory(model_name, name, batch=2, seq_len=64, **extra)
        model, _ = load_model(model_name)
        torch.manual_seed(0)
        if name in ("lora_ga", "eva", "corda"):  # inits that start from data (the estimate needs none)
            ids = torch.randint(5, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
            extra = {**extra, "data": [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(2)]}
        got = measure_memory(adapt(model, name, **extra), batch=2, seq_len=64)
        _check_within(est, got)
        logits = est.details["activation_terms"].get("log_softmax", 0)
        off[name] = (est.activations - got.activations) / (got.activations - logits)
    assert MODELLED <= off.keys()
    bad = {name: f"{err:+.1%}" for name, err in off.items() if name in MODELLED and abs(err) > 0.02}
    assert not bad, bad


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padded_batches_keep_the_mask(backend, dtype):
    """A batch with padding carries an attention mask: SDPA keeps it (B, 1, T, T) in the model's
    dtype, and k, v repeated to every head (no grouped-query shortcut with a mask)."""
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 50:] = 0  # the second row is 14 tokens shorter
    est = estimate_memory("tiny-llama", "lora", batch=2, seq_len=64, dtype=dtype, backend=backend,
                          padded=True)
    unpadded = estimate_memory("tiny-llama", "lora", batch=2, seq_len=64, dtype=dtype, backend=backend)
    model, _ = load_model("tiny-llama", dtype=dtype)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    got = measure_memory(adapt(model, "lora", backend=backend), input_ids=ids, attention_mask=mask)
    _check_within(est, got)
    _check_activations(est, got, rel=0.01)
    assert est.activations > unpadded.activations


def test_fused_estimate_needs_a_fusable_method_and_known_backend():
    with pytest.raises(ConfigError, match="fused"):
        estimate_memory("tiny-llama", "ia3", backend="fused")
    with pytest.raises(ConfigError, match="fused"):
        estimate_memory("tiny-llama", None, backend="fused")  # full fine-tuning has no adapters
    with pytest.raises(ConfigError, match="backend"):
        estimate_memory("tiny-llama", "lora", backend="triton")
    # the fused loss's temporaries: one chunk of logits at a time (170 rows of 49,152), not 512
    from peftlab.production.fused import DEFAULT_CHUNK_ELEMENTS

    fused = estimate_memory("tiny-llama", "lora", batch=4, seq_len=128, backend="fused")
    reference = estimate_memory("tiny-llama", "lora", batch=4, seq_len=128)
    assert fused.temporaries == 2 * (DEFAULT_CHUNK_ELEMENTS // 49152) * 49152 * 4
    assert reference.temporaries == 2 * 512 * 49152 * 4
    # peft keeps what the reference keeps
    assert (estimate_memory("tiny-llama", "lora", backend="peft").as_dict()
            == estimate_memory("tiny-llama", "lora").as_dict())


def test_dropout_masks_depend_on_the_device():
    """On the CPU PyTorch's dropout keeps a noise tensor of the input's dtype, on CUDA a
    one-byte mask: only that term changes."""
    cpu = estimate_memory("tiny-llama", "lora", batch=2, seq_len=8, targets="all-linear",
                          dropout=0.1, device="cpu")
    cuda = estimate_memory("tiny-llama", "lora", batch=2, seq_len=8, targets="all-linear",
                           dropout=0.1, device="cuda")
    no_dropout = estimate_memory("tiny-llama", "lora", batch=2, seq_len=8, targets="all-linear",
                                 device="cuda")
    assert no_dropout.activations < cuda.activations < cpu.activations
    assert cpu.weights == cuda.weights and cpu.optimizer == cuda.optimizer


def test_full_fine_tuning_estimate_matches_measurement():
    est = estimate_memory("tiny-llama", None, batch=2, seq_len=32)
    model, _ = load_model("tiny-llama")
    for p in model.parameters():
        p.requires_grad_(True)
    got = measure_memory(model, batch=2, seq_len=32)
    errors = est.relative_error(got)
    # every parameter trains: weights are all "adapter_weights", gradients and moments follow
    assert est.weights < 0.01 * est.adapter_weights
    for key in ("adapter_weights", "gradients", "optimizer"):
        assert abs(errors[key]) < 0.01, (key, errors)
    # trained norms keep x/rms, the trained head its input: the formula counts them
    assert abs(errors["activations"]) < 0.01, est.table(got)


@pytest.mark.parametrize("name", ["tiny-bert", "minilm-l6"])
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_classifier_estimates_match_measurement(name, targets):
    """The bundled BERT-style classifiers: hidden and attention dropout on (CPU SDPA then runs the
    eager way), one random class per sequence as the label."""
    est = estimate_memory(name, "lora", r=8, batch=2, seq_len=32, targets=targets, dropout=0.1)
    model, _ = load_model(name)
    torch.manual_seed(0)
    got = measure_memory(adapt(model, "lora", r=8, targets=targets, dropout=0.1), batch=2, seq_len=32)
    _check_within(est, got)
    assert abs(est.relative_error(got)["activations"]) < 0.02, est.table(got)
    assert est.temporaries == 0  # no logits over a vocabulary


@pytest.mark.parametrize("targets", [None, ("gate_proj", "up_proj", "down_proj"), ("o_proj",)],
                         ids=["q-v", "mlp-only", "o-only"])
def test_eager_attention_and_first_block_estimates(tiny_llama, targets):
    """Eager attention keeps the scores; in the first block (frozen embeddings) each matmul keeps
    an operand only for the other's gradient, so what is kept depends on the adapted layers."""
    model, _ = tiny_llama
    est = estimate_memory("tiny-llama", "lora", r=8, batch=2, seq_len=64, targets=targets,
                          attn_implementation="eager")
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    got = measure_memory(adapt(model, "lora", r=8, targets=targets), batch=2, seq_len=64)
    _check_activations(est, got, rel=0.02)


def test_nf4_bytes_match_bitsandbytes_storage():
    """Codes + uint8 absmax + nested fp32 absmax + code books, as bitsandbytes keeps them."""
    from peftlab.memory import tensor_bytes

    model, _ = load_model("tiny-llama", quantization="nf4")
    layer = model.model.layers[0].mlp.down_proj  # (64, 128): 8192 values
    assert type(layer).__name__ == "Linear4bit"
    measured = tensor_bytes([layer.weight])
    assert measured == nf4_bytes(64 * 128)
    assert nf4_bytes(64 * 128) == 4096 + 128 + 4 + 1024 + 64 + 4
    assert nf4_bytes(64 * 128, double_quant=False) == 4096 + 4 * 128 + 64


def test_estimate_loads_no_weights_and_scales_sensibly(monkeypatch):
    """SmolLM2-135M's ledger from its config alone: fp32 weights ~540 MB, NF4 a few times less,
    checkpointing and SDPA save activations, and nothing is loaded (load_model is never called)."""
    import peftlab.models

    def forbidden(*args, **kwargs):
        raise AssertionError("estimate_memory must not load a model")

    monkeypatch.setattr(peftlab.models, "load_model", forbidden)
    fp32 = estimate_memory("smollm2-135m", "lora", r=16, batch=4, seq_len=128, targets="all-linear")
    assert 500e6 < fp32.weights < 560e6
    nf4 = estimate_memory("smollm2-135m", "lora", r=16, batch=4, seq_len=128, targets="all-linear", quantization="nf4")
    assert nf4.weights < fp32.weights / 2.5
    assert nf4.adapter_weights == fp32.adapter_weights
    # 30 blocks x 7 linears, r=16: r (d_in + d_out) fp32 values each, counted as peft counts them
    assert fp32.details["trainable_params"] == 4_884_480
    assert fp32.optimizer == 2 * fp32.adapter_weights + 4 * 2 * 210
    ckpt = estimate_memory("smollm2-135m", "lora", r=16, batch=4, seq_len=128, targets="all-linear", gradient_checkpointing=True)
    assert ckpt.activations < fp32.activations / 2
    eager = estimate_memory("smollm2-135m", "lora", r=16, batch=4, seq_len=128, targets="all-linear", attn_implementation="eager")
    assert eager.activations > fp32.activations
    bigger = estimate_memory("smollm2-135m", "lora", r=16, batch=8, seq_len=128, targets="all-linear")
    assert bigger.activations == pytest.approx(2 * fp32.activations, rel=0.01)
    assert bigger.weights == fp32.weights
    # no targets: the method's defaults, as peftlab.adapt uses them (LoRA: q_proj, v_proj)
    qv = estimate_memory("smollm2-135m", "lora", r=16, batch=4, seq_len=128)
    assert qv.details["trainable_params"] == 30 * 16 * ((576 + 576) + (576 + 192))


def test_estimate_accepts_configs_models_and_other_methods(tiny_llama):
    model, _ = tiny_llama
    from_model = estimate_memory(model, "lora", r=8, batch=1, seq_len=16)
    from_config = estimate_memory(model.config, "lora", r=8, batch=1, seq_len=16)
    assert from_model.as_dict() == from_config.as_dict()
    dora = estimate_memory(model.config, "dora", r=8, batch=1, seq_len=16)
    assert dora.adapter_weights > from_model.adapter_weights  # + one magnitude per output
    bert = estimate_memory("tiny-bert", "lora", r=8, batch=2, seq_len=16)
    assert bert.activations > 0 and bert.temporaries == 0


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="dtype"):
        estimate_memory("tiny-llama", dtype="float8")
    with pytest.raises(ConfigError, match="quantization"):
        estimate_memory("tiny-llama", quantization="int3")
    with pytest.raises(ConfigError, match="config"):
        estimate_memory(42)
    model, _ = load_model("tiny-llama")
    for p in model.parameters():  # nothing trainable
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable"):
        measure_memory(model, batch=1, seq_len=8)


def test_ledger_table_and_public_names():
    a = MemoryLedger(100, 10, 10, 20, 60, 5, "estimate")
    b = MemoryLedger(100, 10, 10, 20, 50, 0, "measured")
    assert a.total == 205
    errors = a.relative_error(b)
    assert errors["activations"] == pytest.approx(0.2)
    assert errors["total"] == pytest.approx(10 / 190)  # temporaries left out: not measured
    assert "temporaries" not in errors
    text = a.table(b)
    assert "activations" in text and "+20.0%" in text
    assert set(a.as_dict()) == set(CATEGORIES) | {"total"}
    assert peftlab.estimate_memory is estimate_memory
    assert peftlab.measure_memory is measure_memory
    from peftlab import metrics

    assert metrics.MemoryLedger is MemoryLedger


@pytest.mark.slow
@pytest.mark.parametrize(("quantization", "backend"),
                         [(None, "reference"), ("nf4", "peft"), (None, "fused"), ("nf4", "fused")],
                         ids=["lora", "qlora-nf4", "fused-lora", "fused-qlora-nf4"])
def test_estimate_within_15_percent_smollm2(smollm2, quantization, backend):
    """The real model, batch 2 x 64: LoRA on the shared fp32 model, QLoRA (peft on bnb NF4), and
    both on the fused path."""
    est = estimate_memory("smollm2-135m", "lora", r=16, batch=2, seq_len=64, quantization=quantization,
                          targets="all-linear", backend=backend)
    if quantization is None:
        model = copy.deepcopy(smollm2[0])
    else:
        model, _ = load_model("smollm2-135m", quantization="nf4")
    torch.manual_seed(0)
    model = adapt(model, "lora", backend=backend, r=16, targets="all-linear")
    got = measure_memory(model, batch=2, seq_len=64)
    _check_within(est, got)


def test_every_registered_method_has_an_estimate():
    """Methods without a rank or linear targets (IA3, prompts, LLaMA-Adapter, ...) get their own
    defaults; AdaLoRA needs no schedule length; LoftQ has LoRA's shapes."""
    from peftlab.methods import METHODS

    from tests.support_matrix import SMALL_MODEL_SETTINGS

    lora = peftlab.estimate_memory("tiny-llama", "lora", batch=2, seq_len=16)
    for name in METHODS:
        model = "tiny-bert" if name == "bitfit" else "tiny-llama"  # Llama has no biases to train
        # (where a default cannot fit the 32-wide tiny model, the support matrix's small settings)
        ledger = peftlab.estimate_memory(model, name, batch=2, seq_len=16, **SMALL_MODEL_SETTINGS.get(name, {}))
        assert ledger.weights > 0 and ledger.total > ledger.weights, name
        if name != "bitfit":
            # (VeRA adds its shared frozen random A and B, r=256 by default: 1% of tiny-llama)
            assert ledger.weights == pytest.approx(lora.weights, rel=0.02), name
    assert peftlab.estimate_memory("tiny-llama", "loftq", batch=2, seq_len=16).adapter_weights == lora.adapter_weights
