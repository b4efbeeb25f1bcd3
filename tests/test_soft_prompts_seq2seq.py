"""Soft prompts on encoder-decoders (T5, BART): peftlab's reference equals peft's PeftModelForSeq2SeqLM.

On tiny random T5 and BART models built from their configs (no network): with the same weights,
the reference model, called as a plain transformers model, and peft give the same logits, loss
and gradients (fp32), the same greedy tokens from ``generate``, and files each loads from the
other. peft's layout is followed to the letter (peftlab/methods/soft_prompt.py): an input prompt
has 2n rows and the encoder reads the first n (n rows with num_transformer_submodules=1); a prefix sits in the decoder's self-attention
only, decoder layer l reading block (2l mod L). Where peft cannot run a model, peftlab refuses
its backend with a clear error and the reference still works.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.errors import ConfigError
from peftlab.metrics import count_parameters
from peftlab.methods.soft_prompt import soft_prompt_of
from peftlab.production.hf_peft import reference_to_peft_names
from tests.test_soft_prompts import peft_pair, randomise_prompts

ATOL = 1e-5
N = 3  # virtual tokens
VOCAB = 96

# (method, hyperparameters): every encoder variant of the three methods
CASES = [
    ("prompt_tuning", {}),
    ("prefix_tuning", {}),
    ("prefix_tuning", {"prefix_projection": True, "encoder_hidden_size": 12}),
    ("p_tuning", {"encoder_hidden_size": 12}),
    ("p_tuning", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
]
IDS = ["prompt", "prefix", "prefix-mlp", "ptuning-mlp", "ptuning-lstm"]


def _t5(**fields) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _seeded(T5ForConditionalGeneration, T5Config(**{**config, **fields}))


def _bart(**fields) -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    config = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    return _seeded(BartForConditionalGeneration, BartConfig(**{**config, **fields}))


def _seeded(cls, config) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(config).eval()


ARCHS = {"T5": _t5, "BART": _bart}


@pytest.fixture(scope="module", params=list(ARCHS))
def base(request) -> nn.Module:
    """A tiny T5 or BART, built once per module; tests adapt deep copies, never the model itself."""
    return ARCHS[request.param]()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _pair(base: nn.Module, method: str, **hp) -> tuple[nn.Module, nn.Module]:
    """(reference, peft) copies with identical random prompts of N virtual tokens."""
    return peft_pair(base, method, num_virtual_tokens=N, **hp)


def _batch(seed: int = 0, decoder_mask: bool = False) -> dict:
    """Sources of 7 tokens (the second row right-padded by two) and targets of 5 (labels: the
    model shifts them right into the decoder's input)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = torch.randint(3, VOCAB, (2, 5), generator=gen)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if decoder_mask:  # the first target is a token shorter: its last position is padding
        batch["labels"] = labels.clone()
        batch["labels"][0, -1] = -100
        batch["decoder_attention_mask"] = (batch["labels"] != -100).long()
    return batch


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"},
                     decoder_input_ids=_decoder_inputs(model, batch["labels"])).logits


def _decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    start = model.config.decoder_start_token_id
    shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, model.config.pad_token_id)


def _grads(ref: nn.Module, pm: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    theirs = dict(pm.named_parameters())
    return [(ours, ref.get_parameter(ours).grad, theirs[name].grad)
            for ours, name in reference_to_peft_names(ref).items()]


def _greedy(model: nn.Module, batch: dict, new: int = 4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


# --------------------------------------------------------------------------------------------
# parity with peft: forward, backward, generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", CASES, ids=IDS)
def test_same_logits_loss_and_prompt_gradients_as_peft(base, method, hp):
    ref, pm = _pair(base, method, **hp)
    batch = _batch()
    out_ref, out_peft = ref(**batch), pm(**batch)
    # one logit row per target token: the virtual tokens are the encoder's, not the decoder's
    assert out_ref.logits.shape == out_peft.logits.shape == (2, 5, VOCAB)
    torch.testing.assert_close(out_ref.logits, out_peft.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_ref.loss, out_peft.loss, atol=ATOL, rtol=0)
    with torch.no_grad():
        assert (out_ref.logits - base(**batch).logits).abs().max() > 1e-3  # the prompt is in play
    out_ref.loss.backward()
    out_peft.loss.backward()
    for name, ours, theirs in _grads(ref, pm):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-4, msg=name)
    assert any(ours.abs().sum() > 0 for _, ours, _ in _grads(ref, pm))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_decoder_attention_mask_as_peft(base, method):
    """peft widens decoder_attention_mask for a prefix (the decoder's cache holds it) and leaves
    it alone for an input prompt (the decoder reads no virtual tokens)."""
    ref, pm = _pair(base, method)
    batch = _batch(seed=1, decoder_mask=True)
    out_ref, out_peft = ref(**batch), pm(**batch)
    torch.testing.assert_close(out_ref.logits, out_peft.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_ref.loss, out_peft.loss, atol=ATOL, rtol=0)


def test_input_prompt_reads_only_the_first_n_of_its_2n_rows(base):
    """peft's table has a prompt per stack (2n rows); its seq2seq forward puts the first n before
    the encoder's input and never reads the others, which get no gradient."""
    ref, pm = _pair(base, "prompt_tuning")
    table = soft_prompt_of(ref, "default").embedding.weight
    assert table.shape == pm.prompt_encoder["default"].embedding.weight.shape == (2 * N, 32)
    ref(**_batch()).loss.backward()
    assert table.grad[:N].abs().sum() > 0 and table.grad[N:].abs().sum() == 0


def test_inputs_embeds_and_positional_call(base):
    ref, pm = _pair(base, "p_tuning")
    batch = _batch()
    expected = pm(**batch).logits
    embeds = base.get_input_embeddings()(batch["input_ids"])
    got = ref(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    got = ref(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,hp", [CASES[0], CASES[1], CASES[4]], ids=["prompt", "prefix", "ptuning-lstm"])
def test_greedy_generation_matches_peft(base, method, hp):
    ref, pm = _pair(base, method, **hp)
    batch = _batch(seed=2)
    ours, theirs, plain = _greedy(ref, batch), _greedy(pm, batch), _greedy(base, batch)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step_ours, step_theirs in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(step_ours, step_theirs, atol=ATOL, rtol=0)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours.logits, plain.logits))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_cached_decoding_equals_a_fresh_forward(base, method):
    """Each generated step's logits equal one forward over the tokens so far: generate runs the
    encoder on its own (the encoder's hook) and the decoder with a cache (the model's hook), and
    the two agree with a plain call, independently of peft."""
    ref = peftlab.adapt(copy.deepcopy(base), method, num_virtual_tokens=N)
    randomise_prompts(ref)
    batch = _batch(seed=3)
    out = _greedy(ref, batch)
    for step, logits in enumerate(out.logits):
        with torch.no_grad():
            full = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=out.sequences[:, : step + 1], use_cache=False).logits
        torch.testing.assert_close(full[:, -1], logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_generation_without_cache_and_with_beams(base, method):
    """generate(use_cache=False) gives the cached tokens; beam search (encoder states and cache
    expanded per beam) gives peft's."""
    ref, pm = _pair(base, method)
    batch = _batch(seed=4)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                  min_new_tokens=4, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ref.generate(**kwargs), ref.generate(**kwargs, use_cache=False))
        assert torch.equal(ref.generate(**kwargs, num_beams=2), pm.generate(**kwargs, num_beams=2))


# --------------------------------------------------------------------------------------------
# files: peftlab <-> peft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", CASES, ids=IDS)
def test_adapter_files_load_both_ways(base, tmp_path, method, hp):
    from peft import PeftModel
    from safetensors.torch import load_file

    ref = peftlab.adapt(copy.deepcopy(base), method, num_virtual_tokens=N, **hp)
    randomise_prompts(ref)
    peftlab.save_adapter(ref, tmp_path / "ours")
    stored = load_file(tmp_path / "ours" / "adapter_model.safetensors")["prompt_embeddings"]
    rows = N if method == "prefix_tuning" else 2 * N  # a prefix has n rows, an input prompt 2n
    assert stored.shape[0] == rows
    batch = _batch()
    expected = _logits(ref, batch)
    in_peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=ATOL, rtol=0)
    back = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, batch), expected, atol=ATOL, rtol=0)
    via_peft = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "ours", backend="peft")
    torch.testing.assert_close(_logits(via_peft.eval(), batch), expected, atol=ATOL, rtol=0)

    # the reverse: a file peft wrote loads in peftlab with peft's logits, and trains there
    pm = peftlab.adapt(copy.deepcopy(base), method, backend="peft", num_virtual_tokens=N, **hp)
    randomise_prompts(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "theirs"))
    expected = _logits(pm.eval(), batch)
    ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(_logits(ours, batch), expected, atol=ATOL, rtol=0)
    assert count_parameters(ours).trainable == stored.numel()


@pytest.mark.parametrize("peft_type", ["PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"])
def test_an_adapter_made_with_peft_alone_loads_in_peftlab(base, tmp_path, peft_type):
    """peft's own configs (peft reads the geometry from the model's config itself)."""
    import peft

    config = getattr(peft, peft_type)(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    randomise_prompts(pm, seed=6)
    pm.save_pretrained(str(tmp_path))
    batch = _batch()
    ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(ours, batch), _logits(pm.eval(), batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("peft_type", "extra"), [("PromptTuningConfig", {}),
                                               ("PromptEncoderConfig", {"encoder_hidden_size": 12})])
def test_one_prompt_stack_loads_both_ways(base, tmp_path, peft_type, extra):
    """num_transformer_submodules=1: the table holds only the encoder's n rows (peft runs it so);
    the same number in peftlab, saved and loaded both ways with peft's logits and trainable count."""
    import peft
    from peft import PeftModel

    config = getattr(peft, peft_type)(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N,
                                      num_transformer_submodules=1, **extra)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    randomise_prompts(pm, seed=6)
    pm.save_pretrained(str(tmp_path / "theirs"))
    batch = _batch()
    ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(_logits(ours, batch), _logits(pm.eval(), batch), atol=ATOL, rtol=0)
    assert soft_prompt_of(ours, "default").prompt().shape[0] == N
    method = "prompt_tuning" if peft_type == "PromptTuningConfig" else "p_tuning"
    fresh = peftlab.adapt(copy.deepcopy(base), method, num_virtual_tokens=N, num_transformer_submodules=1, **extra)
    randomise_prompts(fresh, seed=2)
    peftlab.save_adapter(fresh, tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(in_peft, batch), _logits(fresh, batch), atol=ATOL, rtol=0)
    assert count_parameters(fresh).trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_prompt_stacks_peft_does_not_lay_out_are_refused(base, tiny_llama):
    with pytest.raises(ConfigError, match=r"num_transformer_submodules=1 does not fit prefix tuning.*Expected "
                                          r"num_transformer_submodules=2"):
        peftlab.adapt(copy.deepcopy(base), "prefix_tuning", num_virtual_tokens=N, num_transformer_submodules=1)
    llama, _ = tiny_llama
    with pytest.raises(ConfigError, match=r"num_transformer_submodules=2 does not fit an input prompt.*this "
                                          r"model has one.*Expected num_transformer_submodules=1"):
        peftlab.adapt(copy.deepcopy(llama), "prompt_tuning", num_virtual_tokens=N, num_transformer_submodules=2)
    with pytest.raises(ConfigError, match=r"num_transformer_submodules=3 is invalid"):
        peftlab.adapt(copy.deepcopy(llama), "prompt_tuning", num_transformer_submodules=3)


# --------------------------------------------------------------------------------------------
# peft's prefix layout, and the shapes peft cannot guess
# --------------------------------------------------------------------------------------------
def test_prefix_decoder_layer_l_reads_block_2l_mod_L():
    """With L = 3 the decoder's layers read blocks 0, 2, 1; with L = 2 both read block 0, and
    block 1 gets no gradient: peft's layout, which the reference follows (same logits)."""
    for layers, used in ((3, {0, 1, 2}), (2, {0})):
        model = _t5(num_layers=layers)
        ref, pm = _pair(model, "prefix_tuning")
        batch = _batch()
        torch.testing.assert_close(_logits(ref, batch), _logits(pm, batch), atol=ATOL, rtol=0)
        ref(**batch).loss.backward()
        grad = soft_prompt_of(ref, "default").embedding.weight.grad.view(N, layers, 2, 32)
        assert {b for b in range(layers) if grad[:, b].abs().sum() > 0} == used


@pytest.mark.parametrize("build", [lambda: _t5(d_kv=6), lambda: _bart(decoder_attention_heads=2)],
                         ids=["t5-d_kv-6", "bart-2-decoder-heads"])
def test_prefix_on_decoders_whose_heads_peft_cannot_guess(build, tmp_path):
    """T5 v1.1-style d_kv · heads != d_model, or a BART decoder with its own head count: peft's
    own guess (d_model // the encoder's heads) breaks; peftlab names the decoder's key width and
    heads in the peft config, so both backends and the saved file agree."""
    model = build()
    ref, pm = _pair(model, "prefix_tuning")
    batch = _batch()
    expected = _logits(ref, batch)
    torch.testing.assert_close(_logits(pm, batch), expected, atol=ATOL, rtol=0)
    from peft import PeftModel

    peftlab.save_adapter(ref, tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, atol=ATOL, rtol=0)


def test_a_decoder_deeper_than_the_encoder_is_refused_on_peft_only(tmp_path):
    """peft gives the decoder's cache num_layers (the encoder's depth) layers and fails on a
    deeper decoder; peftlab refuses that backend and says what to try, its reference runs."""
    model = _t5(num_layers=2, num_decoder_layers=3)
    with pytest.raises(ConfigError, match=r"decoder has 3 layers.*backend='reference'"):
        peftlab.adapt(copy.deepcopy(model), "prefix_tuning", backend="peft", num_virtual_tokens=N)
    ref = peftlab.adapt(copy.deepcopy(model), "prefix_tuning", num_virtual_tokens=N)
    randomise_prompts(ref)
    ref(**_batch()).loss.backward()
    assert soft_prompt_of(ref, "default").embedding.weight.grad.abs().sum() > 0
    peftlab.save_adapter(ref, tmp_path / "deep")  # peftlab loads its own file back
    back = peftlab.load_adapter(copy.deepcopy(model), tmp_path / "deep")
    torch.testing.assert_close(_logits(back, _batch()), _logits(ref, _batch()), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# the adapter's contract on an encoder-decoder
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", CASES, ids=IDS)
def test_trainable_parameters_equal_closed_form_and_peft(base, method, hp):
    from peftlab.methods import METHODS

    ref = peftlab.adapt(copy.deepcopy(base), method, num_virtual_tokens=N, **hp)
    pm = peftlab.adapt(copy.deepcopy(base), method, backend="peft", num_virtual_tokens=N, **hp)
    formula = METHODS[method].parameter_count(base, peftlab.api.records(ref)["default"].config)
    assert count_parameters(ref).trainable == formula == count_parameters(pm).trainable


def test_text_init_fills_all_2n_rows(base):
    """As peft: the text's tokens repeat until the whole table (2n rows) is filled."""

    class Tokenizer:  # what prompt tuning asks of a tokenizer, without one on disk
        name_or_path = "stub"

        def __call__(self, text: str) -> dict:
            return {"input_ids": [5, 6]}

    ref = peftlab.adapt(copy.deepcopy(base), "prompt_tuning", num_virtual_tokens=N, prompt_tuning_init="text",
                        prompt_tuning_init_text="Summarise:", tokenizer=Tokenizer())
    vocabulary = base.get_input_embeddings().weight
    torch.testing.assert_close(soft_prompt_of(ref, "default").prompt(), vocabulary[[5, 6] * N], atol=0, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_training_steps_lower_the_loss_and_change_only_the_prompt(base, method):
    ref = peftlab.adapt(copy.deepcopy(base), method, num_virtual_tokens=N)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    optimizer = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    batch, losses = _batch(), []
    for _ in range(5):  # in eval mode: the tiny models' dropout would blur five steps
        optimizer.zero_grad()
        loss = ref(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in ref.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.default." in n for n in changed)
    with torch.no_grad():
        peftlab.set_disabled(ref, True)
        torch.testing.assert_close(ref(**batch).logits, base(**batch).logits, atol=0, rtol=0)
