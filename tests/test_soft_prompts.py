"""Soft prompts (prompt tuning, prefix tuning, P-tuning): peftlab's reference equals peft.

With the same weights (moved by the bridge in peftlab/production/hf_peft.py) the reference model,
called as a plain transformers model, and peft's PeftModel give the same logits, loss and
gradients (fp32), the same greedy tokens from ``generate``, and files each can load from the
other. The prompts are randomised first (N(0, 1), far larger than the tiny models' 0.02-std
embeddings), and every generation step's logits are checked to differ from the base model's, so
the parity is not a parity of no-ops.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import set_active
from peftlab.metrics import count_parameters
from peftlab.methods.p_tuning import p_tuning_parameter_count
from peftlab.methods.prefix_tuning import prefix_tuning_parameter_count
from peftlab.methods.prompt_tuning import prompt_tuning_parameter_count
from peftlab.methods.soft_prompt import soft_prompt_of
from peftlab.production.hf_peft import copy_peft_to_reference, copy_reference_to_peft, reference_to_peft_names

ATOL = 1e-5
N = 4  # virtual tokens in most tests

# (method, hyperparameters): every encoder variant of the three methods
CASES = [
    ("prompt_tuning", {}),
    ("prefix_tuning", {}),
    ("prefix_tuning", {"prefix_projection": True, "encoder_hidden_size": 24}),
    ("p_tuning", {"encoder_hidden_size": 24}),
    ("p_tuning", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12, "encoder_num_layers": 2}),
]
IDS = ["prompt", "prefix", "prefix-mlp", "ptuning-mlp", "ptuning-lstm"]
COUNTS = {"prompt_tuning": prompt_tuning_parameter_count, "prefix_tuning": prefix_tuning_parameter_count,
          "p_tuning": p_tuning_parameter_count}


@pytest.fixture(scope="module")
def tiny_llama():
    """conftest's tiny_llama, built once for this module (~1.5 s each on a busy machine): every
    test here adapts a copy.deepcopy of it, never the model itself."""
    from peftlab.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_bert():
    """conftest's tiny_bert, built once for this module; tests adapt deep copies."""
    from peftlab.models import load_model

    return load_model("tiny-bert")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def randomise_prompts(model: nn.Module, seed: int = 0) -> None:
    """N(0, 1) prompts: far larger than the tiny models' embeddings, so they change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen))


def peft_pair(base: nn.Module, method: str, **hp) -> tuple[nn.Module, nn.Module]:
    """(reference, peft) adapted copies of ``base`` with identical, random soft prompts."""
    ref = peftlab.adapt(copy.deepcopy(base), method, **hp)
    pm = peftlab.adapt(copy.deepcopy(base), method, backend="peft", **hp)
    randomise_prompts(ref)
    copy_reference_to_peft(ref, pm)
    return ref, pm


def _batch(seed: int = 0, batch: int = 2, length: int = 7) -> dict:
    """A causal-LM batch whose first row is left-padded by two tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _greedy(model: nn.Module, batch: dict, new: int = 5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it drops position ids
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=2)


def _max_grad_diff(ref: nn.Module, pm: nn.Module) -> float:
    """Largest gradient difference, relative to the gradient's size where that exceeds 1: peft runs
    the prefix MLP once per batch row, so sums of gradients ~1e3 (SmolLM2) differ in the last bits."""
    theirs = dict(pm.named_parameters())
    diffs = []
    for ours, name in reference_to_peft_names(ref).items():
        grad, other = ref.get_parameter(ours).grad, theirs[name].grad
        diffs.append(((grad - other).abs().max() / grad.abs().max().clamp(min=1.0)).item())
    return max(diffs)


# --------------------------------------------------------------------------------------------
# parity with peft: forward, backward, generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", CASES, ids=IDS)
def test_same_logits_loss_and_gradients_as_peft(tiny_llama, method, hp):
    model, _ = tiny_llama
    ref, pm = peft_pair(model, method, num_virtual_tokens=N, **hp)
    batch = _batch()
    out_ref, out_peft = ref(**batch), pm(**batch)
    # an input prompt's logits cover the virtual positions too (peft's convention); a prefix's do not
    virtual = 0 if method == "prefix_tuning" else N
    assert out_ref.logits.shape == out_peft.logits.shape == (2, virtual + 7, model.config.vocab_size)
    torch.testing.assert_close(out_ref.logits, out_peft.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_ref.loss, out_peft.loss, atol=ATOL, rtol=0)
    out_ref.loss.backward()
    out_peft.loss.backward()
    assert _max_grad_diff(ref, pm) < ATOL
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ref.parameters() if p.requires_grad)


@pytest.mark.parametrize("method,hp", CASES, ids=IDS)
def test_greedy_generation_matches_peft(tiny_llama, method, hp):
    model, _ = tiny_llama
    ref, pm = peft_pair(model, method, num_virtual_tokens=N, **hp)
    batch = _batch(seed=1)
    ours, theirs, base = _greedy(ref, batch), _greedy(pm, batch), _greedy(model, batch)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step_ours, step_theirs in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(step_ours, step_theirs, atol=ATOL, rtol=0)
    # the prompt is really in play at every step (the tiny random model's argmax barely moves,
    # so this compares logits, not tokens)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours.logits, base.logits))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_cached_decoding_equals_recomputing_everything(tiny_llama, method):
    """Each generated step's logits equal a fresh forward over everything so far: the pre-hook
    handles the cache, attention mask and positions right on its own, not only as peft does."""
    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), method, num_virtual_tokens=N)
    randomise_prompts(ref)
    batch = _batch(seed=2)
    out = _greedy(ref, batch, new=4)
    length = batch["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        ids = out.sequences[:, : length + step]
        mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        with torch.no_grad():
            full = ref(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(full[:, -1], logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_generation_without_cache_gives_the_same_tokens(tiny_llama, method):
    """generate(use_cache=False) recomputes everything each step; peft 0.21 crashes on it for
    prefix tuning (it reuses the prefix cache the model hands back), peftlab starts afresh."""
    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), method, num_virtual_tokens=N)
    randomise_prompts(ref)
    batch = _batch(seed=4)
    cached = _greedy(ref, batch, new=4)
    with torch.no_grad():
        fresh = ref.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=2, use_cache=False)
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_positional_call_and_inputs_embeds(tiny_llama):
    model, _ = tiny_llama
    ref, pm = peft_pair(model, "prompt_tuning", num_virtual_tokens=N)
    batch = _batch()
    expected = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ref(batch["input_ids"], batch["attention_mask"]).logits, expected, atol=ATOL, rtol=0)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    got = ref(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,hp", [c for c in CASES if c[1].get("encoder_reparameterization_type") != "LSTM"],
                         ids=[i for i, c in zip(IDS, CASES) if c[1].get("encoder_reparameterization_type") != "LSTM"])
def test_sequence_classification_matches_peft(tiny_bert, method, hp):
    model, tokenizer = tiny_bert
    ref, pm = peft_pair(model, method, num_virtual_tokens=N, **hp)
    batch = dict(tokenizer(["a fine film", "the worst movie I have seen in years"], padding=True,
                           return_tensors="pt"), labels=torch.tensor([1, 0]))
    assert "token_type_ids" in batch  # BERT's segments get the prompt as segment 0
    out_ref, out_peft = ref(**batch), pm(**batch)
    assert out_ref.logits.shape == (2, 2)
    torch.testing.assert_close(out_ref.logits, out_peft.logits, atol=ATOL, rtol=0)
    out_ref.loss.backward()
    out_peft.loss.backward()
    assert _max_grad_diff(ref, pm) < ATOL  # the prompt and the classifier head (modules_to_save)


# --------------------------------------------------------------------------------------------
# the adapter's contract: counts, defaults, disabling, merging, training
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", CASES + [("p_tuning", {"encoder_reparameterization_type": "lstm",
                                                            "encoder_num_layers": 3})],
                         ids=IDS + ["ptuning-lstm-3"])
def test_trainable_parameters_equal_closed_form_and_peft(tiny_llama, method, hp):
    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), method, **hp)  # default: 20 virtual tokens
    pm = peftlab.adapt(copy.deepcopy(model), method, backend="peft", **hp)
    formula = COUNTS[method](model, peftlab.api.records(ref)["default"].config)
    assert count_parameters(ref).trainable == formula == count_parameters(pm).trainable
    assert sorted(n for n, p in ref.named_parameters() if p.requires_grad) == sorted(reference_to_peft_names(ref))


def test_closed_forms_by_hand(tiny_llama):
    """The formulas spelt out for tiny-llama: d_model 64, 2 layers, 2 kv heads of 32 (d_kv 64/2)."""
    model, _ = tiny_llama
    config = model.config
    d, layers = config.hidden_size, config.num_hidden_layers
    d_kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    counts = {m: count_parameters(peftlab.adapt(copy.deepcopy(model), m)).trainable for m in COUNTS}
    assert counts["prompt_tuning"] == 20 * d
    assert counts["prefix_tuning"] == 20 * 2 * layers * d_kv  # grouped-query: d_kv, not d_model
    assert counts["p_tuning"] == 20 * d + 3 * (d * d + d)  # MLP d -> d -> d -> d, biases


@pytest.mark.parametrize("method", list(COUNTS))
def test_disabled_is_exactly_the_base_model_and_merge_refuses(tiny_llama, method):
    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), method, num_virtual_tokens=N)
    randomise_prompts(ref)
    batch = _batch()
    with torch.no_grad():
        base = model(**batch)
        peftlab.set_disabled(ref, True)
        off = ref(**batch)
        peftlab.set_disabled(ref, False)
        on = ref(**batch)
    assert torch.equal(off.logits, base.logits) and torch.equal(off.loss, base.loss)
    assert not torch.allclose(on.loss, base.loss)
    with pytest.raises(ConfigError, match="cannot be merged"):
        peftlab.merge(ref)


@pytest.mark.parametrize("method", list(COUNTS))
def test_a_step_changes_only_the_soft_prompt(tiny_llama, method):
    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), method, num_virtual_tokens=N)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    ref(**_batch()).loss.backward()
    optimizer.step()
    changed = {n for n, p in ref.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.default." in n for n in changed)
    assert "model.embed_tokens.base_layer.weight" not in changed


def test_adapter_switching_with_another_method(tiny_llama):
    """A soft prompt and a LoRA adapter on one model: only the active one runs."""
    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), "prompt_tuning", adapter_name="prompt", num_virtual_tokens=N)
    peftlab.adapt(ref, "lora", adapter_name="lora")
    batch = _batch()
    with torch.no_grad():
        assert ref(**batch).logits.shape[1] == 7  # LoRA active: no virtual tokens
        set_active(ref, "prompt")
        assert ref(**batch).logits.shape[1] == N + 7


def test_training_loop_learns(tiny_llama):
    from datasets import Dataset

    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), "prompt_tuning", num_virtual_tokens=N)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": [1] * 8, "labels": ids}
            for ids in torch.randint(3, 500, (8, 8), generator=gen).tolist()]
    result = peftlab.train(ref, Dataset.from_list(rows), steps=8, batch_size=4, lr=0.3, progress=False)
    assert result.losses[-1] < result.losses[0]


# --------------------------------------------------------------------------------------------
# initialisation from text, configs
# --------------------------------------------------------------------------------------------
def test_text_init_uses_the_vocabulary_embeddings_as_peft(tiny_llama):
    model, tokenizer = tiny_llama
    text = "Classify the sentiment:"
    ref = peftlab.adapt(copy.deepcopy(model), "prompt_tuning", num_virtual_tokens=10,
                        prompt_tuning_init="text", prompt_tuning_init_text=text, tokenizer=tokenizer)
    token_ids = tokenizer(text)["input_ids"]
    expected_ids = (token_ids * 10)[:10]  # repeated until there are 10, then cut
    vocabulary = model.get_input_embeddings().weight
    torch.testing.assert_close(soft_prompt_of(ref, "default").prompt(), vocabulary[expected_ids], atol=0, rtol=0)
    # peft loads the tokenizer by name; the config recorded the tokenizer's path for it
    pm = peftlab.adapt(copy.deepcopy(model), "prompt_tuning", backend="peft", num_virtual_tokens=10,
                       prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                       tokenizer_name_or_path=tokenizer.name_or_path)
    torch.testing.assert_close(pm.prompt_encoder["default"].embedding.weight, vocabulary[expected_ids],
                               atol=0, rtol=0)


def test_config_errors_say_what_to_do(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="tokenizer"):
        peftlab.adapt(copy.deepcopy(model), "prompt_tuning", prompt_tuning_init="text",
                      prompt_tuning_init_text="hello")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        peftlab.adapt(copy.deepcopy(model), "prompt_tuning", prompt_tuning_init="text")
    with pytest.raises(ConfigError, match="Expected one of"):
        peftlab.adapt(copy.deepcopy(model), "prompt_tuning", prompt_tuning_init="vocab")
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        peftlab.adapt(copy.deepcopy(model), "prefix_tuning", num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="MLP"):
        peftlab.adapt(copy.deepcopy(model), "p_tuning", encoder_reparameterization_type="GRU")
    with pytest.raises(ConfigError, match="init_weights"):
        peftlab.adapt(copy.deepcopy(model), "prefix_tuning", init_weights="ones")
    with pytest.warns(UserWarning, match="ignored"):
        peftlab.adapt(copy.deepcopy(model), "p_tuning", encoder_num_layers=3)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        peftlab.adapt(checkpointed, "prefix_tuning")


def test_zero_init_prefix(tiny_llama):
    model, _ = tiny_llama
    for hp in ({}, {"prefix_projection": True}):
        ref = peftlab.adapt(copy.deepcopy(model), "prefix_tuning", init_weights="zero", **hp)
        assert soft_prompt_of(ref, "default").prompt().abs().sum() == 0


# --------------------------------------------------------------------------------------------
# files: peftlab <-> peft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", CASES, ids=IDS)
def test_saved_adapter_loads_in_peft_and_back(tiny_llama, tmp_path, method, hp):
    from peft import PeftModel
    from safetensors.torch import load_file

    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), method, num_virtual_tokens=N, **hp)
    randomise_prompts(ref)
    peftlab.save_adapter(ref, tmp_path / "ours")
    # peft stores the prompt the encoder computes, not the encoder
    stored = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(stored) == {"prompt_embeddings"}
    torch.testing.assert_close(stored["prompt_embeddings"], soft_prompt_of(ref, "default").prompt().detach())

    batch = _batch()
    with torch.no_grad():
        expected = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        in_peft = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
        got = in_peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        back = peftlab.load_adapter(copy.deepcopy(model), tmp_path / "ours")
        got = back(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        via_peft = peftlab.load_adapter(copy.deepcopy(model), tmp_path / "ours", backend="peft")
        got = via_peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # loaded, the prompt is a plain table (inference_mode) that can train on, in both backends
    assert peftlab.api.records(back)["default"].config.inference_mode
    table = stored["prompt_embeddings"].numel()
    assert count_parameters(back).trainable == count_parameters(via_peft).trainable == table

    # the reverse: a file peft wrote loads in peftlab with peft's logits
    pm = peftlab.adapt(copy.deepcopy(model), method, backend="peft", num_virtual_tokens=N, **hp)
    randomise_prompts(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        expected = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours = peftlab.load_adapter(copy.deepcopy(model), tmp_path / "theirs")
        got = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_classifier_adapter_round_trip(tiny_bert, tmp_path):
    """A sequence classifier's file holds the prompt and the trained head (modules_to_save)."""
    from peft import PeftModel

    model, tokenizer = tiny_bert
    ref = peftlab.adapt(copy.deepcopy(model), "p_tuning", num_virtual_tokens=N)
    randomise_prompts(ref)
    peftlab.save_adapter(ref, tmp_path / "cls")
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**batch).logits
        in_peft = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "cls"))
        back = peftlab.load_adapter(copy.deepcopy(model), tmp_path / "cls")
        torch.testing.assert_close(in_peft(**batch).logits, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(**batch).logits, expected, atol=ATOL, rtol=0)


def test_bridge_copies_peft_weights_into_the_reference(tiny_llama):
    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), "p_tuning", num_virtual_tokens=N)
    pm = peftlab.adapt(copy.deepcopy(model), "p_tuning", backend="peft", num_virtual_tokens=N)
    randomise_prompts(pm, seed=5)
    copy_peft_to_reference(pm, ref)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ref(**batch).logits, pm(**batch).logits, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# 4-bit base and the real model
# --------------------------------------------------------------------------------------------
def test_soft_prompts_train_on_an_nf4_base():
    pytest.importorskip("bitsandbytes")
    from peftlab.models import load_model

    model, _ = load_model("tiny-llama", quantization="nf4")
    batch = _batch()
    for method in ("prompt_tuning", "prefix_tuning"):
        ref, pm = peft_pair(model, method, num_virtual_tokens=N)
        loss = ref(**batch).loss
        torch.testing.assert_close(loss, pm(**batch).loss, atol=ATOL, rtol=0)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ref.parameters() if p.requires_grad)


@pytest.mark.slow
def test_smollm2_parity_and_generation(smollm2):
    """On the real SmolLM2-135M: same loss, gradients and greedy tokens as peft, for all three."""
    model, tokenizer = smollm2
    batch = tokenizer(["The capital of France is", "Write a haiku about the sea:"], padding=True,
                      padding_side="left", return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for method, hp in [("prompt_tuning", {"prompt_tuning_init": "text", "tokenizer": tokenizer,
                                          "prompt_tuning_init_text": "Answer like a pirate."}),
                       ("prefix_tuning", {"prefix_projection": True}), ("p_tuning", {})]:
        ref = peftlab.adapt(copy.deepcopy(model), method, num_virtual_tokens=8, **hp)
        pm = peftlab.adapt(copy.deepcopy(model), method, backend="peft", num_virtual_tokens=8,
                           **{k: v for k, v in hp.items() if k != "tokenizer"},
                           **({"tokenizer_name_or_path": tokenizer.name_or_path} if "tokenizer" in hp else {}))
        if method != "prompt_tuning":  # keep the text init: it is what a user would train from
            randomise_prompts(ref)
            with torch.no_grad():
                for p in ref.parameters():
                    if p.requires_grad:
                        p.mul_(0.05)  # a realistic scale for a real model
        copy_reference_to_peft(ref, pm)
        out_ref, out_peft = ref(**batch), pm(**batch)
        torch.testing.assert_close(out_ref.loss, out_peft.loss, atol=ATOL, rtol=0)
        torch.testing.assert_close(out_ref.logits, out_peft.logits, atol=1e-4, rtol=0)
        out_ref.loss.backward()
        out_peft.loss.backward()
        assert _max_grad_diff(ref, pm) < ATOL
        with torch.no_grad():
            ours, theirs = _greedy(ref, batch, new=6), _greedy(pm, batch, new=6)
        assert torch.equal(ours.sequences, theirs.sequences)
