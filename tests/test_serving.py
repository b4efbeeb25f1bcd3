"""Many adapters on one base (peftlab/inject/gather.py, production/fused/gather.py,
io/hotswap.py): the gather and segment forms of a mixed batch, with the KV cache, and
hot-swapping, each compared with peft 0.21.2 given the same adapter weights."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import compose
from peftlab.errors import AdapterFileError, ConfigError
from peftlab.inject import AdaptedLayer
from peftlab.inject.gather import LowRank, gathered, mixed_update, segmented, segments, stack
from tests.test_compose import randomise_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

# three adapters of different ranks, scalings and targets
ADAPTERS = {
    "a": dict(r=4, alpha=8.0, targets=("q_proj", "v_proj")),
    "b": dict(r=8, alpha=16.0, targets="all-linear"),
    "c": dict(r=2, alpha=3.0, targets=("o_proj", "down_proj"), use_rslora=True),
}
MIXED = ["b", "__base__", "a", "c", "b", "a"]  # rows sharing an adapter are not contiguous
GROUPED = ["a", "a", "b", "c", "c", "__base__"]  # they are: the segment form


def _served(tiny_llama):
    """The tiny Llama with the three adapters, and a clean copy of its base."""
    model, tokenizer = tiny_llama
    base = copy.deepcopy(model)
    for i, (name, options) in enumerate(ADAPTERS.items()):
        if i == 0:
            peftlab.adapt(model, "lora", adapter_name=name, **options)
        else:
            compose.add_adapter(model, name, "lora", **options)
        randomise_adapter(model, name, i + 1)
    return model.eval(), base, tokenizer


def _peft_copy(model, base, tmp_path):
    from peft import PeftModel

    for name in ADAPTERS:
        peftlab.save_adapter(model, tmp_path / name, adapter_name=name)
    pm = PeftModel.from_pretrained(base, str(tmp_path / "a"), adapter_name="a")
    for name in ("b", "c"):
        pm.load_adapter(str(tmp_path / name), adapter_name=name)
    return pm.eval()


def _ids(rows=6, length=7):
    return torch.randint(0, 200, (rows, length), generator=torch.Generator().manual_seed(0))


def test_gather_and_segment_forms_equal_a_loop_over_adapters():
    gen = torch.Generator().manual_seed(0)
    factors = {n: LowRank(torch.randn(r, 12, generator=gen), torch.randn(10, r, generator=gen), s)
               for n, r, s in (("p", 2, 0.5), ("q", 5, 2.0), ("s", 3, 1.0))}
    x = torch.randn(5, 4, 12, generator=gen)
    for names in (["q", "__base__", "p", "q", "s"], ["p", "p", "q", "s", "__base__"]):
        expected = torch.zeros(5, 4, 10)
        for i, name in enumerate(names):
            if name in factors:
                f = factors[name]
                expected[i] = (x[i] @ f.A.T) @ f.B.T * f.scaling
        torch.testing.assert_close(mixed_update(x, factors, names), expected, atol=1e-5, rtol=1e-5)
    stacked = stack(list(factors.values()))
    assert stacked.A.shape == (4, 5, 12) and stacked.B.shape == (4, 10, 5)  # slot 0 + 3, rank padded to 5
    assert stacked.A[0].abs().sum() == 0 and stacked.A[1, 2:].abs().sum() == 0  # zeros: base slot, padding
    slots = [1, 1, 2, 3, 0]
    runs = segments(slots)
    assert runs == [(0, 2, 1), (2, 3, 2), (3, 4, 3), (4, 5, 0)] and segments([1, 2, 1]) is None
    torch.testing.assert_close(segmented(x, stacked, runs), gathered(x, stacked, torch.tensor(slots)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("names", [MIXED, GROUPED], ids=["gather", "segment"])
def test_mixed_batch_of_ranks_and_targets_matches_peft(tiny_llama, tmp_path, names):
    model, base, _ = _served(tiny_llama)
    pm = _peft_copy(model, base, tmp_path)
    ids = _ids()
    with torch.no_grad():
        theirs = pm(input_ids=ids, adapter_names=names).logits
        ours = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for i, name in enumerate(names):  # each row is that adapter alone
        with torch.no_grad(), (compose.disabled(model) if name == "__base__" else _using(model, name)):
            torch.testing.assert_close(ours[i], model(input_ids=ids[i:i + 1]).logits[0], atol=1e-5, rtol=1e-5)
    # gradients flow through the stacked factors too (the reference form differentiates)
    model(input_ids=ids, adapter_names=names).logits.square().mean().backward()
    layer = model.model.layers[0].self_attn.q_proj
    trained = layer.adapters["a"]  # the active adapter is the trainable one
    assert trained.lora_A.grad.abs().sum() > 0 and trained.lora_B.grad.abs().sum() > 0


class _using:
    """set_adapter for a block, then back to the adapter that was active."""

    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.before = compose.active_adapter(self.model)
        compose.set_adapter(self.model, self.name)

    def __exit__(self, *exc):
        compose.set_adapter(self.model, self.before)


def _count_gathers(monkeypatch):
    from peftlab.production.fused import gather, layer

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return gather.gather_rows(*args, **kwargs)

    monkeypatch.setattr(layer, "gather_rows", counting)
    return calls


def test_fused_backend_gathers_once_per_batch_and_matches(tiny_llama, monkeypatch):
    from peftlab.production import fused

    model, _, _ = _served(tiny_llama)
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids, adapter_names=MIXED).logits
    fused.fuse(model, loss=False)
    calls = _count_gathers(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=MIXED).logits, reference, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(peftlab.inject.adapted_layers(model))  # one gather per layer for the call
    assert all(getattr(m, "gathered", None) is None for m in model.modules() if isinstance(m, AdaptedLayer))


def test_generate_with_adapter_names_uses_the_kv_cache_and_matches_peft(tiny_llama, tmp_path, monkeypatch):
    from peftlab.production import fused

    model, base, tokenizer = _served(tiny_llama)
    pm = _peft_copy(model, base, tmp_path)
    ids, mask = _ids(length=5), torch.ones(6, 5, dtype=torch.long)
    settings = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, adapter_names=MIXED, **settings)
        ours = model.generate(input_ids=ids, adapter_names=MIXED, **settings)
        assert torch.equal(ours, theirs)
        for i in (0, 1, 3):  # a row generated in the mixed batch = generated alone
            context = compose.disabled(model) if MIXED[i] == "__base__" else _using(model, MIXED[i])
            with context:
                alone = model.generate(input_ids=ids[i:i + 1], **{**settings, "attention_mask": mask[i:i + 1]})
            assert torch.equal(ours[i], alone[0])
        fused.fuse(model, loss=False)
        calls = _count_gathers(monkeypatch)
        assert torch.equal(model.generate(input_ids=ids, adapter_names=MIXED, **settings), ours)
    assert len(calls) == len(peftlab.inject.adapted_layers(model))  # once for the prompt and all 6 steps
    with pytest.raises(ConfigError, match="one adapter name per example"):
        model.generate(input_ids=ids, adapter_names=MIXED, num_beams=2, **settings)
    assert all(m.example_adapters is None for m in model.modules() if isinstance(m, AdaptedLayer))


# --------------------------------------------------------------------------------------------
# loading N adapters, hot-swapping
# --------------------------------------------------------------------------------------------
def _saved(tiny_llama, tmp_path, r, seed, targets=("q_proj", "v_proj"), alpha=None):
    """Save a LoRA adapter of rank r (random weights) trained on the tiny Llama; its folder."""
    model, _ = copy.deepcopy(tiny_llama[0]), None
    peftlab.adapt(model, "lora", r=r, alpha=alpha or 2.0 * r, targets=targets)
    randomise_adapter(model, "default", seed)
    folder = tmp_path / f"r{r}-{seed}-{len(targets)}"
    peftlab.save_adapter(model, folder)
    return folder


def _fresh(tiny_llama, folder):
    model = copy.deepcopy(tiny_llama[0])
    return peftlab.load_adapter(model, folder).eval()


def test_hotswap_in_place_matches_a_fresh_load_and_peft(tiny_llama, tmp_path):
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    x, y, z = (_saved(tiny_llama, tmp_path, r, seed) for r, seed in ((4, 1), (4, 2), (8, 3)))
    base = copy.deepcopy(tiny_llama[0])
    model = peftlab.load_adapter(copy.deepcopy(base), x).eval()
    layer = model.model.layers[1].self_attn.v_proj.adapters["default"]
    pointers = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())
    ids = _ids()
    peftlab.hotswap_adapter(model, y)
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == pointers  # no reallocation
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, _fresh(tiny_llama, y)(input_ids=ids).logits)
        before = model(input_ids=ids).logits
    with pytest.raises(AdapterFileError, match="prepare_hotswap"):
        peftlab.hotswap_adapter(model, z)  # rank 8 into rank-4 tensors
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # a refusal changes nothing
    peftlab.prepare_hotswap(model, target_rank=8)
    layer = model.model.layers[1].self_attn.v_proj.adapters["default"]
    pointers = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # zero padding changes nothing
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(x)).eval()
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    prepare_model_for_compiled_hotswap(pm, target_rank=8, check_compiled="ignore")
    for folder in (z, x):  # a larger rank into the padded room, then a smaller one back
        peftlab.hotswap_adapter(model, folder)
        peft_hotswap(pm, str(folder), adapter_name="default")
        with torch.no_grad():
            ours = model(input_ids=ids).logits
            torch.testing.assert_close(ours, _fresh(tiny_llama, folder)(input_ids=ids).logits)
            torch.testing.assert_close(ours, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == pointers
    peftlab.save_adapter(model, tmp_path / "after")  # the swapped-in adapter saves and loads back
    with torch.no_grad():
        torch.testing.assert_close(_fresh(tiny_llama, tmp_path / "after")(input_ids=ids).logits, ours)


def test_hotswap_refuses_what_does_not_fit(tiny_llama, tmp_path):
    x = _saved(tiny_llama, tmp_path, 4, 1)
    wider = _saved(tiny_llama, tmp_path, 4, 2, targets=("q_proj", "v_proj", "o_proj"))
    narrower = _saved(tiny_llama, tmp_path, 4, 3, targets=("q_proj",))
    model = _fresh(tiny_llama, x)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(AdapterFileError, match="adapts layers the loaded adapter 'default' does not"):
        peftlab.hotswap_adapter(model, wider)
    with pytest.raises(ConfigError, match="no adapter named 'other'"):
        peftlab.hotswap_adapter(model, x, adapter_name="other")
    peftlab.merge(model)
    with pytest.raises(ConfigError, match="merged"):
        peftlab.hotswap_adapter(model, narrower)
    peftlab.unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    peftlab.hotswap_adapter(model, narrower)  # fewer targets: v_proj's tensors become zeros
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, _fresh(tiny_llama, narrower)(input_ids=ids).logits)
    ia3 = copy.deepcopy(tiny_llama[0])
    peftlab.adapt(ia3, "ia3")
    with pytest.raises(ConfigError, match="LoRA adapters"):
        peftlab.hotswap_adapter(ia3, x)


def test_load_adapters_is_all_or_nothing(tiny_llama, tmp_path):
    folders = {f"user{i}": _saved(tiny_llama, tmp_path, r, i) for i, r in enumerate((2, 4, 8))}
    model = peftlab.load_adapters(copy.deepcopy(tiny_llama[0]), folders).eval()
    assert compose.list_adapters(model) == ["user0", "user1", "user2"]
    ids = _ids(rows=3)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=list(folders)).logits
        for i, folder in enumerate(folders.values()):
            torch.testing.assert_close(mixed[i], _fresh(tiny_llama, folder)(input_ids=ids[i:i + 1]).logits[0],
                                       atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterFileError):
        peftlab.load_adapters(model, {"user3": folders["user0"], "user4": tmp_path / "missing"})
    assert compose.list_adapters(model) == ["user0", "user1", "user2"]


def test_adapter_chat_answers_with_every_adapter_in_one_batch(tiny_llama, tmp_path):
    from peftlab.widgets import AdapterChat

    folders = {f"user{i}": _saved(tiny_llama, tmp_path, 4, i + 1) for i in range(2)}
    model, tokenizer = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    chat = AdapterChat(model, tokenizer, adapters=folders, max_new_tokens=5, prompt="Hello there")
    assert chat.names == ["user0", "user1", "__base__"]
    answers = chat.ask()
    assert set(answers) == set(chat.names) and "3 answers from one generate call" in chat.status.value
    for name, column in zip(chat.names, chat.columns.children):
        assert (name if name != "__base__" else "base model") in column.value
    for name in ("user0", "user1"):  # each column is what that adapter alone answers
        alone = peftlab.load_adapter(copy.deepcopy(tiny_llama[0]), folders[name]).eval()
        from peftlab.widgets.serve import answer_each

        assert answer_each(alone, tokenizer, "Hello there", ["default"], 5)["default"] == answers[name]
    assert chat.ask("   ") == {} and "prompt is empty" in chat.status.value
    with pytest.raises(peftlab.errors.UnknownNameError, match="no adapter named 'carol'"):
        AdapterChat(model, tokenizer, names=["carol"])


def test_bench_serve_runs_every_variant_and_writes_its_provenance(tmp_path):
    import json

    from peftlab import bench_serve

    with pytest.raises(ConfigError, match="--only: 'fusd' is not known. Did you mean 'fused'"):
        bench_serve.parse_options(["--only", "fusd"])
    with pytest.raises(ConfigError, match="--adapters '0' is invalid"):
        bench_serve.parse_options(["--adapters", "0"])
    config = bench_serve.parse_options(["--model", "tiny-llama", "--batches", "4", "--adapters", "1,3",
                                        "--repeats", "1", "--new-tokens", "2", "--prompt-len", "4",
                                        "--out", str(tmp_path / "serve.json")])
    rows, memory = bench_serve.run_serve(config)
    assert [(r.adapters, r.variant) for r in rows] == [(n, v) for n in (1, 3) for v in bench_serve.VARIANTS]
    assert all(r.status == "ok" and r.tokens_per_s > 0 for r in rows)
    assert all(r.same_as_peft == 1.0 for r in rows if r.variant not in ("merged", "peft"))  # same tokens as peft
    assert memory[1]["merged_copies_mb"] == pytest.approx(3 * memory[0]["merged_copies_mb"])
    assert bench_serve.request_names(["a", "b", "c"], 6, 3, 0).count("a") == 2
    bench_serve.write_outputs(rows, memory, config, tmp_path / "serve.json")
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["command"].startswith("peftlab bench serve --model tiny-llama --batches 4 --adapters 1,3")
    assert {"cpu", "torch", "peft", "date"} <= set(data["provenance"]) and len(data["speedups"]) == 2
    assert (tmp_path / "serve.html").stat().st_size > 1000
    assert "fused vs peft" in bench_serve.format_table(rows, memory, config)


def test_generate_with_names_survives_deepcopy_and_pickle(tiny_llama):
    import pickle

    model, _, _ = _served(tiny_llama)
    ids = _ids(rows=3, length=4)
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.generate.model is twin and twin.save_pretrained.model is twin  # the copy's own
        with torch.no_grad():
            assert torch.equal(twin.generate(input_ids=ids, adapter_names=["a", "b", "__base__"], **settings),
                               model.generate(input_ids=ids, adapter_names=["a", "b", "__base__"], **settings))


def test_fused_gathered_factors_follow_writes_and_hot_swaps_within_one_routing(tiny_llama, tmp_path):
    from peftlab.production import fused
    from peftlab.routing import adapters_per_example

    model, _, _ = _served(tiny_llama)
    folder = tmp_path / "a"
    peftlab.save_adapter(model, folder, adapter_name="a")
    fused.fuse(model, loss=False)
    ids = _ids()

    def both():  # the fused forward, and the reference forward of the same weights
        fused_out = model(input_ids=ids).logits
        fused.unfuse(model)
        reference = model(input_ids=ids).logits
        fused.fuse(model, loss=False)
        return fused_out, reference

    with torch.no_grad(), adapters_per_example(model, MIXED):
        first = model(input_ids=ids).logits
        model.model.layers[0].self_attn.q_proj.adapters["a"].lora_B.mul_(3.0)  # an in-place write
        fused_out, reference = both()
        torch.testing.assert_close(fused_out, reference, atol=1e-5, rtol=1e-5)
        assert (fused_out - first).abs().max() > 1e-4
        peftlab.prepare_hotswap(model, target_rank=8, adapter_name="a")  # new, padded tensors for "a"
        peftlab.hotswap_adapter(model, folder, "a")  # a's saved weights back, into them
        fused_out, reference = both()
        torch.testing.assert_close(fused_out, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused_out, first, atol=1e-5, rtol=1e-5)
