"""Nothing is lost to faults: training that ends badly, and processes killed while writing.

Training faults (each with ``out_dir``: what is on disk afterwards must be the last completed step)
  * a NaN or inf loss: training stops without applying that step; the adapter keeps the last
    good values and the history its good steps, in memory and in the checkpoint;
  * an exception in a user callback: a TrainingError naming it, the result on the exception;
  * KeyboardInterrupt in the middle of a step, and the stop flag set in the middle of a step;
  * resuming from the interrupted run's checkpoint gives the uninterrupted run's loss curve.
Kills (SIGKILL, no chance to clean up)
  * while ``save_adapter`` replaces an adapter: the old adapter stays whole and loads;
  * while the bundled SmolLM2 is converted into the cache (real conversion, ``slow``): the cache
    never looks complete, other cache folders stay intact, and the next load converts and works.

Related: tests/test_io.py kills writers at random moments in a loop (atomic_dir, save_adapter);
tests/test_models.py kills a fake conversion; tests/test_qlora_trap.py holds the 4-bit trap
(train -> generate -> train still learns on NF4 with AVX512-BF16), not repeated here.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab import io
from peftlab.errors import TrainingError

FAST = dict(batch_size=4, max_length=32, lr=1e-2, progress=False)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    from peftlab.models import load_model

    return load_model("tiny-llama")[0]


def _rows(n: int = 8):
    """A tokenized causal-LM dataset of n fixed rows (6-10 tokens)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 2000, (6 + i % 5,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return Dataset.from_list(rows)


def _lora(base, **hp):
    torch.manual_seed(0)  # the adapter's initial weights
    return peftlab.adapt(copy.deepcopy(base), "lora", **{"r": 4, **hp})


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.arange(3, 19).reshape(2, 8)).logits


class _OnForward:
    """A forward hook on the LM head that runs ``action`` during the ``at``-th training forward
    (1-based; one forward per step here), i.e. in the middle of that step."""

    def __init__(self, model, at: int, action):
        self.calls, self.at, self.action = 0, at, action
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                return self.action(output)
        return None


def _assert_saved(out_dir: Path, step: int, model, history: list[dict], base) -> None:
    """out_dir's newest checkpoint is ``step``, holds this history, and its adapter/ folder loads
    to exactly the model's current adapter."""
    checkpoints = sorted(p.name for p in out_dir.iterdir())
    assert checkpoints[-1] == f"checkpoint-{step:06d}", checkpoints
    assert not [name for name in checkpoints if name.startswith(".")], "temporary folder left behind"
    ckpt = out_dir / checkpoints[-1]
    assert json.loads((ckpt / "history.json").read_text()) == history
    assert len(history) == step
    loaded = peftlab.load_adapter(copy.deepcopy(base), ckpt / "adapter")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# training faults
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_the_last_good_adapter(base, tmp_path, bad):
    model = _lora(base)
    good = {}

    def poison(output):
        good.update(_adapter(model))  # step 3 has not been applied yet: this is step 2's adapter
        return output * bad

    _OnForward(model, at=3, action=poison)
    with pytest.warns(RuntimeWarning, match=r"Step 3 gave a non-finite loss.*Try a lower lr"):
        result = peftlab.train(model, _rows(), steps=6, out_dir=tmp_path, **FAST)
    assert result.stop_reason == "nan" and "keeps the values of step 2" in result.message
    assert len(result.history) == 2 and all(math.isfinite(r["loss"]) for r in result.history)
    for name, value in _adapter(model).items():
        assert torch.equal(value, good[name]), name
    _assert_saved(tmp_path, 2, model, result.history, base)


def test_exception_in_a_user_callback(base, tmp_path):
    model = _lora(base)

    def live_plot(record, model):
        if record["step"] == 2:
            raise ZeroDivisionError("bad axis range")

    with pytest.raises(TrainingError, match=r"Callback .*live_plot raised ZeroDivisionError: bad axis range "
                                            r"\(after step 2\).*resume with train\(\.\.\., resume_from") as info:
        peftlab.train(model, _rows(), steps=5, callbacks=[live_plot], out_dir=tmp_path, **FAST)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    result = info.value.result
    assert result.stop_reason == "callback_error" and result.model is model
    _assert_saved(tmp_path, 2, model, result.history, base)


def test_keyboard_interrupt_in_the_middle_of_a_step(base, tmp_path):
    """Ctrl-C lands inside step 3's forward: steps 1-2 are kept, in memory and on disk."""
    model = _lora(base)
    after_two = {}

    def interrupt(output):
        after_two.update(_adapter(model))
        raise KeyboardInterrupt

    _OnForward(model, at=3, action=interrupt)
    result = peftlab.train(model, _rows(), steps=6, out_dir=tmp_path, **FAST)
    assert result.stop_reason == "interrupted" and len(result.history) == 2
    for name, value in _adapter(model).items():
        assert torch.equal(value, after_two[name]), name
    assert not any(p.grad is not None for p in model.parameters())  # the half step's gradients are gone
    _assert_saved(tmp_path, 2, model, result.history, base)


def test_stop_flag_set_in_the_middle_of_a_step(base, tmp_path):
    """The flag is set (as a widget's Stop button would, from another thread) during step 3:
    step 3 completes, then training ends; the checkpoint on disk is step 3."""
    model = _lora(base)
    stop = threading.Event()

    def press_stop(output):
        threading.Thread(target=stop.set).start()
        time.sleep(0.05)  # the setter runs while the step goes on
        return None

    _OnForward(model, at=3, action=press_stop)
    result = peftlab.train(model, _rows(), steps=6, stop=stop, out_dir=tmp_path, **FAST)
    assert result.stop_reason == "stopped" and len(result.history) == 3
    _assert_saved(tmp_path, 3, model, result.history, base)


def test_interrupted_run_resumes_to_the_same_loss_curve(base, tmp_path):
    kwargs = dict(steps=6, **FAST)
    straight = peftlab.train(_lora(base, dropout=0.1), _rows(), **kwargs)  # dropout: RNG state matters

    interrupted = _lora(base, dropout=0.1)

    def interrupt(output):
        raise KeyboardInterrupt

    hook = _OnForward(interrupted, at=4, action=interrupt)
    first = peftlab.train(interrupted, _rows(), out_dir=tmp_path, **kwargs)
    assert first.stop_reason == "interrupted" and len(first.history) == 3
    hook.handle.remove()

    fresh = peftlab.adapt(copy.deepcopy(base), "lora", r=4, dropout=0.1)  # other init: resume overwrites it
    resumed = peftlab.train(fresh, _rows(), resume_from=tmp_path, **kwargs)
    assert resumed.stop_reason == "completed" and len(resumed.history) == 6
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    assert resumed.history[:3] == first.history


# --------------------------------------------------------------------------------------------
# SIGKILL while writing
# --------------------------------------------------------------------------------------------
def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the child exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkill_while_save_adapter_replaces_an_adapter(base, tmp_path):
    """A child process replaces a saved adapter with another; its safetensors write is made slow
    (half the bytes, then a pause), and it is SIGKILLed mid-file. The old adapter stays whole."""
    dest = tmp_path / "adapter"
    old_model = _lora(base)
    with torch.no_grad():
        for p in old_model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    peftlab.save_adapter(old_model, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    script = (
        "import sys, time, torch, peftlab, safetensors.torch as st\n"
        "real = st.save_file\n"
        "def slow_save(tensors, filename, metadata=None):\n"
        "    real(tensors, filename, metadata=metadata)\n"
        "    data = open(filename, 'rb').read()\n"
        "    with open(filename, 'wb') as f:\n"
        "        f.write(data[: len(data) // 2]); f.flush()\n"
        "        print('HALF', flush=True); time.sleep(60); f.write(data[len(data) // 2:])\n"
        "st.save_file = slow_save\n"
        # any adapted model will do (no transformers import: the child starts faster)
        "model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))\n"
        "peftlab.save_adapter(peftlab.adapt(model, 'lora', r=64, targets='all-linear'), sys.argv[1])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(dest)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        assert proc.stdout.readline().strip() == "HALF", proc.stderr.read() if proc.poll() is not None else ""
        leftovers = list(tmp_path.glob(".adapter.tmp-*"))
        assert leftovers and (leftovers[0] / io.WEIGHTS_NAME).stat().st_size > 0  # killed mid-file
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    torch.testing.assert_close(_logits(peftlab.load_adapter(copy.deepcopy(base), dest)), _logits(old_model))
    # the next save replaces it and tidies up what the killed writer left
    new_model = _lora(base, r=2)
    peftlab.save_adapter(new_model, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    torch.testing.assert_close(_logits(peftlab.load_adapter(copy.deepcopy(base), dest)), _logits(new_model))


@pytest.mark.slow
def test_sigkill_during_the_real_smollm2_conversion(tmp_path, monkeypatch):
    """The real GGUF -> HF conversion in a child process, SIGKILLed while it writes the cache
    folder: no complete cache appears, the tokenizer cache beside it is untouched, and the next
    load_model converts again and works (~40-90 s on 2 cores)."""
    from peftlab import models

    fp32 = models._smollm2_folder_name()
    tok_name = models._smollm2_folder_name("tokenizer")
    cache = tmp_path / "cache"
    cache.mkdir()
    real_tok = models._cache_root() / tok_name
    if (real_tok / models._COMPLETE).exists():  # saves the ~10 s tokenizer parse; else it is built
        shutil.copytree(real_tok, cache / tok_name)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import peftlab; peftlab.load_model('smollm2-135m')"],
        env=dict(os.environ, PEFTLAB_CACHE=str(cache), HF_HUB_OFFLINE="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:  # wait until the conversion writes inside its temporary folder, then kill it mid-write
        _wait_for(lambda: any(p.is_file() for p in cache.glob(f"{fp32}.tmp-*/*")), proc,
                  "the conversion started writing", timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cache / fp32 / models._COMPLETE).exists()
    assert not (cache / fp32).exists()  # only a hidden-by-name temporary folder is left
    assert list(cache.glob(f"{fp32}.tmp-*"))
    tok_folder = cache / tok_name
    assert (tok_folder / models._COMPLETE).exists()
    assert len(__import__("transformers").AutoTokenizer.from_pretrained(tok_folder)) > 49000

    monkeypatch.setenv("PEFTLAB_CACHE", str(cache))
    model, tokenizer = models.load_model("smollm2-135m")
    assert (cache / fp32 / models._COMPLETE).exists() and not list(cache.glob(f"{fp32}.tmp-*"))
    assert sum(p.numel() for p in model.parameters()) > 130e6
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
