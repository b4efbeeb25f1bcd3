"""Bad input gives a clear error, and loses nothing.

One table lists every bad input the issue names: configs, models, data, adapters on disk. Each
row runs one call and asserts
  * the exception type (a peftlab type, :class:`peftlab.errors.PeftlabError`, where the check is
    ours),
  * that the message names the bad value, and says what to try,
  * that nothing was lost: a failed ``adapt``/``load_adapter`` leaves the model exactly as it was
    (no wrapped layer, nothing frozen), a failed save leaves the adapter already on disk intact.

Related tests elsewhere (not repeated here): tests/test_io.py (every atomic-write mechanism),
tests/test_data.py (file readers), tests/test_faults.py (training faults, SIGKILL),
tests/test_qlora_trap.py (the AVX512-BF16 4-bit trap: train -> generate -> train still learns).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import peftlab
from peftlab import io
from peftlab.errors import (AdapterFileError, ConfigError, DataError, OfflineError, PeftlabError,
                            UnknownNameError)
from peftlab.inject import AdaptedLayer, TrainableCopy


# --------------------------------------------------------------------------------------------
# shared state: tiny models built once per module, copied per case
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bases():
    from peftlab.models import load_model

    llama, llama_tok = load_model("tiny-llama")
    bert, bert_tok = load_model("tiny-bert")
    return {"llama": llama, "llama_tok": llama_tok, "bert": bert, "bert_tok": bert_tok}


@pytest.fixture(scope="module")
def nf4_llama():
    from peftlab.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("tiny-llama", quantization="nf4")[0]


def _untouched(model: nn.Module) -> None:
    """As a fresh transformers model: no adapter wrapper, no record, every parameter trainable."""
    assert not any(isinstance(m, (AdaptedLayer, TrainableCopy)) for m in model.modules())
    assert not peftlab.api.records(model)
    assert all(p.requires_grad for p in model.parameters())


@dataclass
class Ctx:
    """What a case's call gets: fresh copies of the tiny models, a saved adapter, a scratch dir."""

    llama: nn.Module
    llama_tok: object
    bert: nn.Module
    bert_tok: object
    tmp: Path
    saved: Path  # a LoRA r=4 adapter of tiny-llama, saved with peftlab.save_adapter


@pytest.fixture
def ctx(bases, tmp_path):
    saved = peftlab.save_adapter(peftlab.adapt(copy.deepcopy(bases["llama"]), "lora", r=4), tmp_path / "saved")
    return Ctx(copy.deepcopy(bases["llama"]), bases["llama_tok"], copy.deepcopy(bases["bert"]),
               bases["bert_tok"], tmp_path, saved)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / io.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rows(**columns):
    from datasets import Dataset

    return Dataset.from_dict(columns)


def _labelled(labels: list[int]):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    return Dataset.from_dict({"text": ["a"] * len(labels), "label": labels}, features=features)


def _train(model, data, tok, **kw):
    return peftlab.train(model, data, tokenizer=tok, steps=1, batch_size=2, max_length=16, progress=False, **kw)


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    call: Callable[[Ctx], object]
    error: type[BaseException]
    value: str  # regex: the bad value, named in the message
    hint: str  # regex: what to try / what was expected
    keeps: str = "llama"  # what must be left untouched: "llama", "bert", "saved" (folder), ""


def _adapt(method: str = "lora", backend: str = "reference", **hp):
    return lambda c: peftlab.adapt(c.llama, method, backend=backend, **hp)


def _load(edit: Callable[[Path], None] | None = None, model: str = "llama", path=None):
    def call(c: Ctx):
        if edit is not None:
            edit(c.saved)
        return peftlab.load_adapter(getattr(c, model), path(c) if path else c.saved)

    return call


def _truncate(folder: Path) -> None:
    weights = folder / io.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garble(folder: Path) -> None:
    weights = folder / io.WEIGHTS_NAME
    weights.write_bytes(bytes(torch.randint(0, 256, (weights.stat().st_size,), generator=torch.Generator().manual_seed(0),
                                            dtype=torch.uint8).tolist()))


def _wider_llama(c: Ctx):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    c.llama = wider  # checked untouched afterwards
    _edit_config(c.saved, base_model_name_or_path="tiny-llama")
    return peftlab.load_adapter(wider, c.saved)


def _save_over_existing(target: Callable[[Ctx], Path]):
    """Save a second adapter where ``target`` points; the first one must survive the failure."""

    def call(c: Ctx):
        return peftlab.save_adapter(peftlab.adapt(copy.deepcopy(c.bert), "lora", r=2), target(c))

    return call


def _file_in_the_way(c: Ctx) -> Path:
    (c.tmp / "notes.txt").write_text("keep me")
    return c.tmp / "notes.txt"


def _denied_mkdtemp(c: Ctx) -> Path:
    """Root ignores permissions; simulate a read-only destination at the system-call level."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    mp = pytest.MonkeyPatch()
    mp.setattr(io.files.tempfile, "mkdtemp", denied)
    c._undo = mp  # type: ignore[attr-defined]
    return c.saved


CASES = [
    # ---- config ----------------------------------------------------------------------------
    Case("rank-zero", _adapt(r=0), ConfigError, r"r=0", r"positive integer.*Try r=8"),
    Case("rank-negative", _adapt(r=-4), ConfigError, r"r=-4", r"positive integer.*Try r=8"),
    Case("rank-zero-dora", _adapt("dora", r=0), ConfigError, r"r=0", r"Try r=8"),
    Case("rank-zero-loha", _adapt("loha", r=0), ConfigError, r"r=0", r"Try r=8"),
    Case("rank-zero-vera", _adapt("vera", r=0), ConfigError, r"r=0", r"Try r=8"),
    # k_proj is 32 x 64: r=40 fits q_proj (64 x 64), so the error comes after a layer was wrapped
    Case("alpha-zero", _adapt(alpha=0), ConfigError, r"alpha=0\b", r"\(0, inf\)\. Try a value of alpha"),
    Case("alpha-negative", _adapt(alpha=-8.0), ConfigError, r"alpha=-8.0", r"\(0, inf\)\. Try"),
    Case("alpha-zero-loha", _adapt("loha", alpha=0), ConfigError, r"alpha=0\b", r"Try"),
    Case("dropout-one", _adapt(dropout=1.0), ConfigError, r"dropout=1.0", r"\[0, 1\)\. Try"),
    Case("dropout-negative", _adapt(dropout=-0.1), ConfigError, r"dropout=-0.1", r"\[0, 1\)\. Try"),
    Case("dropout-dora", _adapt("dora", dropout=2), ConfigError, r"dropout=2\b", r"\[0, 1\)"),
    # (not "lroa": since RoAd is registered, difflib finds 'road' as close as 'lora')
    Case("unknown-method", _adapt("lorra"), UnknownNameError, r"'lorra'", r"Did you mean 'lora'\?.*list_methods"),
    Case("unknown-method-case", _adapt("LoHA-x"), UnknownNameError, r"'LoHA-x'", r"Did you mean 'loha'\?"),
    Case("unknown-backend", _adapt(backend="pft"), ConfigError, r"'pft'", r"Did you mean 'peft'\?"),
    Case("hyperparameter-not-taken", _adapt("ia3", r=8), ConfigError, r"'ia3'.*'r'",
         r"Expected some of: .*feedforward_modules"),
    Case("hyperparameter-typo", _adapt(rank=8), ConfigError, r"'rank'", r"Did you mean 'r'\?"),
    Case("hyperparameter-peft-name", _adapt(lora_alpha=16), ConfigError, r"'lora_alpha'", r"Did you mean 'alpha'\?"),
    Case("hyperparameter-peft-targets", _adapt(target_modules=["q_proj"]), ConfigError, r"'target_modules'",
         r"Did you mean 'targets'\?"),
    Case("targets-match-nothing", _adapt(targets=["qproj"]), ConfigError, r"\('qproj',\) matched no module",
         r"q_proj, k_proj, v_proj.*Try one of these, or 'all-linear'"),
    Case("targets-regex-match-nothing", _adapt(targets=r".*attention\.query"), ConfigError,
         r"matched no module", r"q_proj"),
    Case("targets-output-head", _adapt(targets=["lm_head"]), ConfigError, r"'lm_head' is the model's output head",
         r"modules_to_save=\['lm_head'\]"),
    Case("targets-unsupported-type", _adapt(targets=["input_layernorm"]), ConfigError,
         r"'model.layers.0.input_layernorm' is a LlamaRMSNorm", r"Expected a linear layer.*Try"),
    Case("targets-classifier-head", lambda c: peftlab.adapt(c.bert, "lora", targets=["classifier"]),
         ConfigError, r"'classifier' is the model's output head", r"modules_to_save=\['classifier'\]", keeps="bert"),
    # peft 0.21's LoHa/LoKr read the packed 4-bit weight's shape and fail deep inside: refused first
    Case("peft-loha-on-nf4", lambda c: peftlab.adapt(c.nf4, "loha", backend="peft"), ConfigError,
         r"peft's loha cannot run on a 4-bit \(NF4\) base", r"Try backend='reference'.*method='lora'", keeps="nf4"),
    Case("peft-lokr-on-nf4", lambda c: peftlab.adapt(c.nf4, "lokr", backend="peft"), ConfigError,
         r"peft's lokr", r"Try backend='reference'", keeps="nf4"),
    Case("loftq-on-nf4", lambda c: peftlab.adapt(c.nf4, "loftq"), ConfigError, r"already 4-bit",
         r"full-precision base", keeps="nf4"),
    # ---- models ----------------------------------------------------------------------------
    Case("unknown-bundled-model", lambda c: peftlab.load_model("tiny-lama"), UnknownNameError, r"'tiny-lama'",
         r"Did you mean 'tiny-llama'\?.*Bundled models: smollm2-135m", keeps=""),
    Case("hub-model-offline", lambda c: peftlab.load_model("some-org/some-model"), OfflineError,
         r"'some-org/some-model'", r"Bundled models that work offline.*Try peftlab.load_model\('smollm2-135m'\)",
         keeps=""),
    Case("model-folder-missing", lambda c: peftlab.load_model("./no/such/folder"), UnknownNameError,
         r"'./no/such/folder'", r"Expected a folder holding config.json", keeps=""),
    # ---- data ------------------------------------------------------------------------------
    Case("unknown-bundled-dataset", lambda c: peftlab.load_dataset("rotten-tomato"), UnknownNameError,
         r"'rotten-tomato'", r"Did you mean 'rotten-tomatoes'\?", keeps=""),
    Case("hub-dataset-offline", lambda c: peftlab.load_dataset("some-org/some-data"), OfflineError,
         r"'some-org/some-data'", r"Bundled datasets that work offline", keeps=""),
    Case("empty-dataset", lambda c: _train(peftlab.adapt(c.llama, "lora"), _rows(text=[]), c.llama_tok),
         DataError, r"empty \(0 rows\)", r"Expected at least one row.*try peftlab.load_dataset", keeps=""),
    Case("empty-file", lambda c: (c.tmp / "e.csv").write_text("text,label\n") and peftlab.load_dataset(str(c.tmp / "e.csv")),
         DataError, r"e.csv holds no rows", r"Expected a header line and at least", keeps=""),
    Case("wrong-columns-classification",
         lambda c: _train(peftlab.adapt(c.bert, "lora"), _rows(sentence=["a", "b"], y=[0, 1]), c.bert_tok),
         DataError, r"\['sentence', 'y'\]", r"needs 'text' and 'label'.*Try peftlab.load_dataset", keeps=""),
    Case("wrong-columns-causal-lm",
         lambda c: _train(peftlab.adapt(c.llama, "lora"), _rows(prompt=["a"], completion=["b"]), c.llama_tok),
         DataError, r"\['completion', 'prompt'\]", r"'question' \+ 'answer' or 'text'.*Try", keeps=""),
    Case("label-outside-label-set", lambda c: peftlab.data.tokenize_classification(_labelled([1, -1]), c.bert_tok),
         DataError, r"Label -1 is not in the label set", r"Expected one of: 0 \(neg\), 1 \(pos\).*Map labels", keeps=""),
    Case("label-string-not-a-class-id",
         lambda c: peftlab.data.tokenize_classification(_rows(text=["a", "b"], label=["pos", "neg"]), c.bert_tok),
         DataError, r"Label 'pos'", r"Map labels to class ids", keeps=""),
    Case("label-outside-classifier",
         lambda c: _train(peftlab.adapt(c.bert, "lora"), _rows(text=["a", "b", "c"], label=[0, 1, 5]), c.bert_tok),
         DataError, r"class ids from 0 to 5.*2 outputs", r"num_labels=6", keeps=""),
    Case("label-negative",
         lambda c: peftlab.data.tokenize_classification(_rows(text=["a", "b"], label=[0, -3]), c.bert_tok),
         DataError, r"-3", r"Expected one of: class ids 0, 1, 2", keeps=""),
    # ---- adapters on disk (loading) --------------------------------------------------------
    Case("adapter-folder-missing", _load(path=lambda c: c.tmp / "nowhere"), AdapterFileError, r"nowhere does not exist",
         r"Expected a folder written by peftlab.save_adapter"),
    Case("adapter-weights-missing", _load(lambda f: (f / io.WEIGHTS_NAME).unlink()), AdapterFileError,
         r"no adapter_model.safetensors", r"Save the adapter again"),
    Case("adapter-config-missing", _load(lambda f: (f / io.CONFIG_NAME).unlink()), AdapterFileError,
         r"has no adapter_config.json", r"Try the folder that holds both"),
    Case("adapter-truncated", _load(_truncate), AdapterFileError, r"adapter_model.safetensors cannot be read",
         r"truncated or corrupt.*Save or copy the adapter again"),
    Case("adapter-corrupt-bytes", _load(_garble), AdapterFileError, r"adapter_model.safetensors cannot be read",
         r"truncated or corrupt"),
    Case("adapter-config-not-json", _load(lambda f: (f / io.CONFIG_NAME).write_text('{"peft_type": "LO')),
         AdapterFileError, r"adapter_config.json is not valid JSON", r"save the adapter again"),
    Case("adapter-config-other-method", _load(lambda f: _edit_config(f, peft_type="IA3", feedforward_modules=[])),
         AdapterFileError, r"no place for: '.*q_proj.lora_A.weight'.*the method is 'ia3'",
         r"different method or base model.*Check adapter_config.json"),
    Case("adapter-config-method-peftlab-lacks", _load(lambda f: _edit_config(f, peft_type="POLY")),
         AdapterFileError, r"'POLY'", r"Try load_adapter\(\.\.\., backend='peft'\)"),
    Case("adapter-other-shapes", _wider_llama, AdapterFileError,
         r"layer 'model.layers.0.self_attn.q_proj' expects lora_A of shape \(4, 96\) but the file has \(4, 64\)",
         r"trained on 'tiny-llama'"),
    Case("adapter-on-another-architecture", _load(model="bert"), AdapterFileError, r"matched no module",
         r"Expected the base model it was trained on", keeps="bert"),
    Case("adapter-path-is-a-file", _load(path=lambda c: c.saved / io.CONFIG_NAME), AdapterFileError,
         r"adapter_config.json is a file", r"Try its folder"),
    # ---- adapters on disk (saving) ---------------------------------------------------------
    Case("save-path-is-a-file", _save_over_existing(_file_in_the_way), AdapterFileError, r"notes.txt is a file",
         r"Expected a folder path.*Try another path", keeps="saved"),
    Case("save-over-foreign-folder", _save_over_existing(lambda c: c.tmp), AdapterFileError,
         r"holds other things than an adapter", r"Try a subfolder", keeps="saved"),
    Case("save-read-only-destination", _save_over_existing(_denied_mkdtemp), AdapterFileError,
         r"Cannot write .*saved: permission denied", r"Try a path in your home", keeps="saved"),
    Case("save-model-without-adapter", lambda c: peftlab.save_adapter(c.llama, c.tmp / "x"), ConfigError,
         r"no peftlab adapter", r"Try peftlab.adapt\(model, 'lora'\)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, request):
    if case.keeps == "nf4" or "nf4" in case.id:
        ctx.nf4 = copy.deepcopy(request.getfixturevalue("nf4_llama"))  # type: ignore[attr-defined]
        before = {n: p.requires_grad for n, p in ctx.nf4.named_parameters()}
    saved_bytes = {p.name: p.read_bytes() for p in ctx.saved.iterdir()}
    t0 = time.perf_counter()
    try:
        with pytest.raises(case.error) as info:
            case.call(ctx)
    finally:
        undo = getattr(ctx, "_undo", None)
        if undo is not None:
            undo.undo()
    elapsed = time.perf_counter() - t0
    message = str(info.value)
    errors = case.error if isinstance(case.error, tuple) else (case.error,)
    if all(issubclass(e, PeftlabError) for e in errors):
        assert isinstance(info.value, PeftlabError)
    assert __import__("re").search(case.value, message), f"the bad value is not named: {message}"
    assert __import__("re").search(case.hint, message, __import__("re").S), f"no hint what to try: {message}"
    assert elapsed < 15, f"took {elapsed:.1f} s: bad input must fail fast"
    # nothing lost
    if case.keeps in ("llama", "bert"):
        _untouched(getattr(ctx, case.keeps))
    elif case.keeps == "nf4":
        assert not any(isinstance(m, AdaptedLayer) for m in ctx.nf4.modules())
        assert {n: p.requires_grad for n, p in ctx.nf4.named_parameters()} == before
    elif case.keeps == "saved":
        assert {p.name: p.read_bytes() for p in ctx.saved.iterdir()} == saved_bytes
        loaded = peftlab.load_adapter(copy.deepcopy(ctx.llama), ctx.saved)  # still complete
        assert peftlab.api.records(loaded)["default"].config.r == 4
        assert [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_case_count():
    """The table above is the list of bad inputs; keep its ids unique."""
    assert len({c.id for c in CASES}) == len(CASES) >= 50


# --------------------------------------------------------------------------------------------
# cases that are warnings, not errors, and real read-only file systems
# --------------------------------------------------------------------------------------------
def test_text_longer_than_the_context_is_cut_with_a_warning(bases):
    """max_length beyond max_position_embeddings (512 here): BERT's absolute positions would fail
    deep inside with a tensor-size error; train cuts to the context and says so."""
    model = peftlab.adapt(copy.deepcopy(bases["bert"]), "lora")
    rows = _rows(text=["word " * 600] * 2, label=[0, 1])
    with pytest.warns(UserWarning, match=r"max_length=2000 is longer than the model's context of 512") as record:
        result = peftlab.train(model, rows, tokenizer=bases["bert_tok"], steps=1, batch_size=2, max_length=2000,
                               progress=False)
    assert result.stop_reason == "completed"
    assert any("truncated" in str(w.message) or "cut" in str(w.message) for w in record)


@pytest.mark.parametrize("method, r, shape, cap", [("lora", 40, "32 x 64", 32), ("dora", 65, "64 x 64", 64),
                                                   ("loha", 40, "32 x 64", 32)])
def test_a_rank_above_a_layers_size_is_a_warning_and_still_adapts(bases, method, r, shape, cap):
    """peft allows r > min(d_out, d_in) (its own test cases use r=8 on a 2 x 20 layer), so an adapter
    saved that way must load; the warning says the extra ranks are redundant."""
    with pytest.warns(peftlab.PeftlabWarning, match=rf"r={r} is above min\(d_out, d_in\) = {cap} for a {shape} layer") as record:
        model = peftlab.adapt(copy.deepcopy(bases["llama"]), method, r=r, targets="all-linear")
    assert any(f"Try r <= {cap}" in str(w.message) and "without adding expressiveness" in str(w.message)
               for w in record)
    assert peftlab.count_parameters(model).trainable > 0


def test_rows_longer_than_max_length_are_truncated_with_one_warning(bases):
    rows = _rows(text=["word " * 100, "short"], label=[0, 1])
    with pytest.warns(UserWarning) as record:
        tokens = peftlab.data.tokenize_classification(rows, bases["bert_tok"], max_length=16)
    assert max(len(ids) for ids in tokens["input_ids"]) == 16
    assert sum("1 of 2" in str(w.message) or "truncat" in str(w.message) for w in record) >= 1


def test_hub_model_offline_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(OfflineError):
        peftlab.load_model("some-org/some-model")
    assert time.perf_counter() - t0 < 5


def _can_bind_read_only() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("unshare") is not None \
        and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_bind_read_only(), reason="needs root and mount namespaces (unshare -m)")
def test_save_to_a_real_read_only_file_system(bases, tmp_path):
    """A real read-only bind mount (EROFS, not EACCES), in a private mount namespace so nothing
    leaks out of the test: the save fails with AdapterFileError and the old adapter stays."""
    folder = tmp_path / "ro"
    peftlab.save_adapter(peftlab.adapt(copy.deepcopy(bases["llama"]), "lora", r=4), folder / "adapter")
    before = (folder / "adapter" / io.WEIGHTS_NAME).read_bytes()
    # the child replaces the folder as save_adapter does (io.atomic_dir), without building a model
    script = (
        "from peftlab import io\n"
        "from peftlab.errors import AdapterFileError\n"
        f"try:\n    with io.atomic_dir({str(folder / 'adapter')!r}) as tmp:\n"
        "        (tmp / 'adapter_model.safetensors').write_bytes(b'new')\n"
        "except AdapterFileError as e:\n    print('ERR', type(e.__cause__).__name__, e)\n"
    )
    shell = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec {sys.executable} -c \"$0\""
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, script],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert "ERR OSError" in out.stdout or "ERR PermissionError" in out.stdout, out.stdout + out.stderr
    assert "read-only" in out.stdout and "Try a path" in out.stdout
    assert (folder / "adapter" / io.WEIGHTS_NAME).read_bytes() == before
    assert peftlab.api.records(peftlab.load_adapter(copy.deepcopy(bases["llama"]), folder / "adapter"))["default"].config.r == 4
