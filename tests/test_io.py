"""Adapters on disk: peft's format both ways, atomic writes, and clear errors."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab
from peftlab import io
from peftlab.io import files as io_files
from peftlab.errors import AdapterFileError, ConfigError
from peftlab.inject import AdaptedLayer, TrainableCopy, adapted_layers


def _randomise(model: nn.Module, seed: int = 0, only: str = "") -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and only in name:  # adapter weights and trainable copies only
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def _adapted(base: nn.Module, seed: int = 0, **hp) -> nn.Module:
    return _randomise(peftlab.adapt(copy.deepcopy(base), "lora", **hp), seed)


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _peft():
    from peftlab.production.hf_peft import import_peft

    return import_peft()


@pytest.fixture
def llama(tiny_llama):
    return tiny_llama[0]


@pytest.fixture
def bert(tiny_bert):
    return tiny_bert[0]


# --------------------------------------------------------------------------------------------
# the format
# --------------------------------------------------------------------------------------------
def test_saved_folder_is_peft_format(llama, tmp_path):
    model = _adapted(llama, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    out = peftlab.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["a"]  # no temporary folder left next to it

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    layers = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert sorted(config["target_modules"]) == layers

    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    layer = model.get_submodule("model.layers.1.self_attn.v_proj").adapters["default"]
    torch.testing.assert_close(tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"], layer.lora_B)


def test_classifier_head_saved_as_modules_to_save(bert, tmp_path):
    model = _adapted(bert, r=2)
    out = peftlab.save_adapter(model, tmp_path / "b")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    tensors = load_file(out / "adapter_model.safetensors")
    torch.testing.assert_close(tensors["base_model.model.classifier.weight"], model.classifier.copies["default"].weight)
    assert "base_model.model.classifier.bias" in tensors


# --------------------------------------------------------------------------------------------
# round trips, both directions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "bert"])
def test_peftlab_to_peft_and_back(which, request, tmp_path):
    base = request.getfixturevalue(which)
    model = _adapted(base, r=4, targets="all-linear")
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(copy.deepcopy(base)), atol=1e-3)
    peftlab.save_adapter(model, tmp_path / "ours")

    # peft reads peftlab's folder ...
    theirs = _peft().PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)
    # ... peftlab reads it back, on the reference backend and through peft
    torch.testing.assert_close(_logits(peftlab.load_adapter(copy.deepcopy(base), tmp_path / "ours")), expected,
                               atol=1e-5, rtol=0)
    via_peft = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "ours", backend="peft")
    torch.testing.assert_close(_logits(via_peft), expected, atol=1e-5, rtol=0)

    # peft's own save_pretrained, read by peftlab
    theirs.save_pretrained(tmp_path / "peft-saved")
    loaded = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "peft-saved")
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=0)
    # the loaded adapter trains (as after adapt) and nothing else does
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n or ".copies.default." in n for n in trainable)


def test_adapter_from_peft_with_short_target_names(llama, tmp_path):
    """Hub adapters usually say target_modules=["q_proj", "v_proj"], not full paths."""
    peft = _peft()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    theirs = _randomise(peft.get_peft_model(copy.deepcopy(llama), config))
    theirs.save_pretrained(tmp_path / "hub-style")
    loaded = peftlab.load_adapter(copy.deepcopy(llama), tmp_path / "hub-style")
    assert len(adapted_layers(loaded)) == 4
    torch.testing.assert_close(_logits(loaded), _logits(theirs), atol=1e-5, rtol=0)


def test_save_peft_model_delegates_to_peft(llama, tmp_path):
    peft = _peft()
    pm = peftlab.adapt(copy.deepcopy(llama), "lora", backend="peft", r=4)
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if ".lora_" in name:  # both adapters, whichever is trainable now
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    pm.set_adapter("default")
    peftlab.save_adapter(pm, tmp_path / "default")
    out = peftlab.save_adapter(pm, tmp_path / "other", adapter_name="other")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))  # not in a subfolder
    assert not any(p.is_dir() for p in out.iterdir())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    loaded = peftlab.load_adapter(copy.deepcopy(llama), tmp_path / "default")
    torch.testing.assert_close(_logits(loaded), _logits(pm), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        peftlab.save_adapter(pm, tmp_path / "x", adapter_name="nope")


def test_several_adapters_save_active_or_named(llama, tmp_path):
    model = _adapted(llama, r=4, targets=("q_proj", "v_proj"))
    first = _logits(model)
    peftlab.adapt(model, "lora", adapter_name="second", r=2, targets=("q_proj", "v_proj"))
    _randomise(model, seed=3, only=".second.")
    second = _logits(model)
    peftlab.save_adapter(model, tmp_path / "active")  # the active one: "second"
    peftlab.save_adapter(model, tmp_path / "first", adapter_name="default")
    assert json.loads((tmp_path / "active/adapter_config.json").read_text())["r"] == 2
    torch.testing.assert_close(_logits(peftlab.load_adapter(copy.deepcopy(llama), tmp_path / "active")), second)
    torch.testing.assert_close(_logits(peftlab.load_adapter(copy.deepcopy(llama), tmp_path / "first")), first)

    # loading several adapters into one model: each under its own name, the last one active
    both = peftlab.load_adapter(copy.deepcopy(llama), tmp_path / "first")
    peftlab.load_adapter(both, tmp_path / "active", adapter_name="second")
    torch.testing.assert_close(_logits(both), second)
    with pytest.raises(ConfigError, match="already has an adapter named 'second'"):
        peftlab.load_adapter(both, tmp_path / "active", adapter_name="second")
    with pytest.raises(ConfigError, match="no adapter named 'third'"):
        peftlab.save_adapter(model, tmp_path / "x", adapter_name="third")


# --------------------------------------------------------------------------------------------
# errors: what was wrong, what was expected, what to try; the model is left as it was
# --------------------------------------------------------------------------------------------
@pytest.fixture
def saved(llama, tmp_path) -> Path:
    return peftlab.save_adapter(_adapted(llama, r=4), tmp_path / "saved")


def _assert_untouched(model: nn.Module) -> None:
    assert not any(isinstance(m, (AdaptedLayer, TrainableCopy)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # as a fresh transformers model
    assert not peftlab.api.records(model)


def test_missing_folder_and_files(llama, saved, tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        peftlab.load_adapter(llama, tmp_path / "nowhere")
    with pytest.raises(AdapterFileError, match="is a file.*Try its folder"):
        peftlab.load_adapter(llama, saved / "adapter_config.json")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="no adapter_model.safetensors"):
        peftlab.load_adapter(llama, saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match="has no adapter_config.json"):
        peftlab.load_adapter(llama, saved)
    _assert_untouched(llama)


def test_truncated_or_corrupt_files(llama, saved):
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        peftlab.load_adapter(llama, saved)
    weights.write_bytes(b"")
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        peftlab.load_adapter(llama, saved)
    config = saved / "adapter_config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        peftlab.load_adapter(llama, saved)
    config.write_text("{}")
    with pytest.raises(AdapterFileError, match="no 'peft_type'"):
        peftlab.load_adapter(llama, saved)
    _assert_untouched(llama)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_method_or_option_peftlab_lacks(llama, saved):
    _edit_config(saved, peft_type="POLY")
    with pytest.raises(AdapterFileError, match="cannot rebuild.*'POLY'.*backend='peft'"):
        peftlab.load_adapter(llama, saved)
    _edit_config(saved, peft_type="LORA", use_qalora=True)
    with pytest.raises(AdapterFileError, match="use_qalora.*backend='peft'"):
        peftlab.load_adapter(llama, saved)
    _edit_config(saved, use_qalora=False, layers_to_transform=[0])
    with pytest.raises(AdapterFileError, match="layers_to_transform"):
        peftlab.load_adapter(llama, saved)
    # a DoRA config over plain LoRA tensors: either "no DoRA" or "magnitude vectors missing"
    _edit_config(saved, layers_to_transform=None, use_dora=True)
    with pytest.raises(AdapterFileError, match="DoRA|lora_magnitude_vector"):
        peftlab.load_adapter(llama, saved)
    _assert_untouched(llama)


def test_adapter_for_a_base_with_other_shapes(llama, saved, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _edit_config(saved, base_model_name_or_path="tiny-llama")
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterFileError, match=r"layer 'model.layers.0.self_attn.q_proj' expects lora_A of "
                                               r"shape \(4, 96\) but the file has \(4, 64\).*trained on 'tiny-llama'"):
        peftlab.load_adapter(wider, saved)
    _assert_untouched(wider)
    # the model is still clean: the right adapter loads afterwards
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2))
    with pytest.raises(AdapterFileError, match="does not fit this model.*matched no module"):
        peftlab.load_adapter(other, saved)
    _assert_untouched(other)


def test_extra_tensor_in_file_is_an_error(llama, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="no place for.*lora_magnitude_vector"):
        peftlab.load_adapter(llama, saved)
    _assert_untouched(llama)


def test_failed_load_leaves_existing_adapters_alone(llama, saved):
    model = _adapted(llama, r=2, targets=("q_proj",))
    before = _logits(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    _edit_config(saved, r=8)  # the file's tensors are r=4: fails after the layers were wrapped
    with pytest.raises(AdapterFileError, match="expects lora_A of shape"):
        peftlab.load_adapter(model, saved, adapter_name="second")
    assert set(peftlab.api.records(model)) == {"default"}
    assert all(list(layer.adapters) == ["default"] and layer.active == ["default"]
               for layer in adapted_layers(model).values())
    assert len(adapted_layers(model)) == 2  # the v_proj layers it wrapped are plain Linear again
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(_logits(model), before)


def test_save_errors(llama, tmp_path, monkeypatch):
    model = _adapted(llama, r=2)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(AdapterFileError, match="is a file"):
        peftlab.save_adapter(model, tmp_path / "file.txt")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.md").write_text("keep me")
    with pytest.raises(AdapterFileError, match="holds other things.*notes.md"):
        peftlab.save_adapter(model, tmp_path / "project")
    assert (tmp_path / "project" / "notes.md").read_text() == "keep me"
    with pytest.raises(ConfigError, match="no peftlab adapter"):
        peftlab.save_adapter(copy.deepcopy(llama), tmp_path / "none")


def test_read_only_destination(llama, tmp_path, monkeypatch):
    model = _adapted(llama, r=2)
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:  # root ignores permissions: simulate below as well
        locked.chmod(0o500)
        try:
            with pytest.raises(AdapterFileError, match="permission denied.*Try a path"):
                peftlab.save_adapter(model, locked / "adapter")
        finally:
            locked.chmod(0o700)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io_files.tempfile, "mkdtemp", denied)
    with pytest.raises(AdapterFileError, match="permission denied.*Try a path") as info:
        peftlab.save_adapter(model, locked / "adapter")
    assert isinstance(info.value.__cause__, PermissionError)
    assert not (locked / "adapter").exists()


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def _write_version(folder: Path, version: int, size: int = 1 << 18) -> None:
    (folder / "a.bin").write_bytes(bytes([version]) * size)
    (folder / "b.txt").write_text(str(version))


def _read_version(folder: Path, size: int = 1 << 18) -> int:
    """The version a folder holds; fails unless both files are complete and agree."""
    data = (folder / "a.bin").read_bytes()
    assert len(data) == size and data == bytes([data[0]]) * size
    assert (folder / "b.txt").read_text() == str(data[0])
    return data[0]


def test_error_inside_the_block_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "ckpt"
    with io.atomic_dir(dest) as tmp:
        _write_version(tmp, 1)
    with pytest.raises(RuntimeError):
        with io.atomic_dir(dest) as tmp:
            (tmp / "a.bin").write_bytes(b"\2" * 10)
            raise RuntimeError("disk full, say")
    assert _read_version(dest) == 1
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replacing_swaps_whole_folders(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(io_files, "_exchange", lambda a, b: False)
    dest = tmp_path / "ckpt"
    for version in (1, 2, 3):
        with io.atomic_dir(dest) as tmp:
            _write_version(tmp, version)
            if version == 2:
                (tmp / "extra").write_text("only in v2")
        assert _read_version(dest) == version
    assert not (dest / "extra").exists()  # the folder is replaced, not merged into
    assert os.listdir(tmp_path) == ["ckpt"]


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    """The fallback swap has a moment with no folder at ``dest``; the old one is then kept
    aside, and the next writer (or the error of a reader) finds it."""
    dest = tmp_path / "ckpt"
    pid = os.fork()
    if pid == 0:  # a writer that dies at once: its pid is then free
        os._exit(0)
    os.waitpid(pid, 0)
    old = tmp_path / f".ckpt.old-{pid}-x"
    old.mkdir()
    _write_version(old, 7)
    (tmp_path / f".ckpt.tmp-{pid}-y").mkdir()  # the new folder it was writing, incomplete
    with pytest.raises(AdapterFileError, match="interrupted.*previous adapter"):
        peftlab.load_adapter(nn.Linear(2, 2), dest)
    with pytest.raises(RuntimeError):
        with io.atomic_dir(dest):
            raise RuntimeError
    assert _read_version(dest) == 7
    assert os.listdir(tmp_path) == ["ckpt"]


def _kill_while_writing(dest: Path, write, seed: int) -> None:
    """Fork a writer that replaces ``dest`` in a loop (versions 1, 2, 1, ...), wait until its
    first write is complete, then SIGKILL it at a random moment."""
    import select

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(ready_r)
            version = 1
            while True:
                write(dest, version)
                if ready_w is not None:
                    os.write(ready_w, b"1")
                    os.close(ready_w)
                    ready_w = None
                version = 3 - version
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        readable, _, _ = select.select([ready_r], [], [], 60)
        assert readable and os.read(ready_r, 1) == b"1", "the writer never finished its first write"
        time.sleep(random.Random(seed).uniform(0, 0.03))
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_sigkill_at_any_moment_leaves_old_or_new(tmp_path):
    def write(dest: Path, version: int) -> None:
        with io.atomic_dir(dest) as tmp:
            _write_version(tmp, version)

    for seed in range(12):
        _kill_while_writing(tmp_path / "dest", write, seed)
        assert _read_version(tmp_path / "dest") in (1, 2)  # complete and consistent every time
    write(tmp_path / "dest", 1)  # the next writer tidies up what the killed ones left
    assert os.listdir(tmp_path) == ["dest"]


def test_sigkill_during_save_adapter(llama, tmp_path):
    small, large = _adapted(llama, r=2, targets=("q_proj",)), _adapted(llama, seed=1, r=4, targets="all-linear")
    expected = {2: _logits(small), 4: _logits(large)}

    def write(dest: Path, version: int) -> None:
        peftlab.save_adapter(small if version == 1 else large, dest)

    for seed in range(3):
        _kill_while_writing(tmp_path / "dest", write, seed)
        r = json.loads((tmp_path / "dest/adapter_config.json").read_text())["r"]
        loaded = peftlab.load_adapter(copy.deepcopy(llama), tmp_path / "dest")
        torch.testing.assert_close(_logits(loaded), expected[r])
