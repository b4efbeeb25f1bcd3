"""Experiment tracking: peftlab.train(report_to=...) logs config, parameter count and every step's
metrics to TensorBoard event files and to trackio's local store, which `peftlab runs` reads back
in another process (a kernel restart). Tiny seeded Llama, two steps, CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peftlab
from peftlab.errors import ConfigError
from peftlab.tracking import REPORTERS, parse_report_to

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def qa():
    from datasets import Dataset

    return Dataset.from_list([{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(8)])


def test_report_to_is_parsed_like_transformers():
    assert parse_report_to(None) == () and parse_report_to("none") == ()
    assert parse_report_to("all") == REPORTERS
    assert parse_report_to("tensorboard, trackio") == ("tensorboard", "trackio")
    assert parse_report_to(["trackio"]) == ("trackio",)
    with pytest.raises(ConfigError, match="Did you mean 'tensorboard'"):
        parse_report_to("tensorbord")


def test_tensorboard_gets_config_parameter_count_and_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tokenizer = peftlab.load_model("tiny-llama")
    model = peftlab.adapt(model, "lora", r=4)
    result = peftlab.train(model, qa(), tokenizer=tokenizer, steps=2, batch_size=2, max_length=64, progress=False,
                           report_to="tensorboard", out_dir=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("lora-r4-")
    events = EventAccumulator(str(run))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in result.history]
    trainable = events.Scalars("model/trainable_parameters")[0].value
    assert trainable == peftlab.count_parameters(model).trainable == 2 * 4 * ((64 + 64) + (64 + 32))
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"adapter.r": 4' in config and '"train.lr": 0.0002' in config


TRAIN_TWO_RUNS = """
import json, peftlab
from datasets import Dataset
rows = Dataset.from_list([{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(8)])
out = {}
for r in (4, 8):
    model, tokenizer = peftlab.load_model("tiny-llama")
    model = peftlab.adapt(model, "lora", r=r)
    result = peftlab.train(model, rows, tokenizer=tokenizer, steps=2, batch_size=2, max_length=64,
                           progress=False, report_to="trackio", lr=1e-3 * r)
    out[r] = result.history[-1]["loss"]
print("RESULT", json.dumps(out))
"""

READ_BACK = """
import contextlib, io, json
from peftlab.cli import main
listing, compared, as_json = io.StringIO(), io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(as_json):
    assert main(["runs", "--json"]) == 0
names = [r["name"] for r in json.loads(as_json.getvalue())]
with contextlib.redirect_stdout(listing):
    assert main(["runs"]) == 0
with contextlib.redirect_stdout(compared):
    assert main(["runs", "--compare", *names]) == 0
print("RESULT", json.dumps({"json": json.loads(as_json.getvalue()), "list": listing.getvalue(),
                            "compare": compared.getvalue()}))
"""


def python(code: str, store: Path, store_env: str = "TRACKIO_DIR") -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRACKIO_DIR", None), env.pop("PEFTLAB_RUNS_DIR", None)
    env[store_env] = str(store)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # trackio prints its own lines (also at exit): the script marks its result
    return next(line for line in done.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT ")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """A trackio store holding two runs (r=4, r=8) trained in their own process; their final losses."""
    store = tmp_path_factory.mktemp("trackio")
    return store, {int(k): v for k, v in json.loads(python(TRAIN_TWO_RUNS, store)).items()}


def test_trackio_runs_survive_the_process_and_peftlab_runs_compares_them(two_runs):
    store, final = two_runs
    seen = json.loads(python(READ_BACK, store))  # a new process: what a kernel restart sees
    runs = seen["json"]
    assert [r["config"]["adapter.r"] for r in runs] == [4, 8]
    assert [r["last"]["loss"] for r in runs] == [pytest.approx(final[4]), pytest.approx(final[8])]
    assert [r["config"]["trainable_parameters"] for r in runs] == [3584 // 2, 3584]
    assert runs[0]["last"]["step"] == 2 and "lr" in runs[0]["last"]
    assert all(r["name"] in seen["list"] for r in runs) and "trainable" in seen["list"]
    compared = seen["compare"].splitlines()
    assert any(line.split()[:3] == ["adapter.r", "4", "8"] for line in compared)
    assert any(line.startswith("train.lr") for line in compared)
    assert not any(line.startswith("train.steps") for line in compared)  # the same in both: not shown
    assert any(line.startswith("final loss") for line in compared)


def test_peftlab_runs_on_an_empty_store_says_so(tmp_path):
    code = ("import contextlib, io\nfrom peftlab.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    main(['runs'])\nprint('RESULT', out.getvalue())")
    out = python(code, tmp_path / "empty")
    assert "no stored runs" in out



LAB_AFTER_RESTART = """
from peftlab.widgets import Lab
lab = Lab(task=None, model="tiny-llama", steps=2, batch_size=2, max_length=64, redraw_every_s=0.0,
          report_to="trackio")
before = lab.stored_table.value
assert lab.on_train() and lab.wait(120), lab.message.value
print("RESULT", json.dumps([before, lab.stored_table.value, lab.runs[0]["final_loss"]]))
"""


def test_the_labs_runs_table_is_backed_by_the_store(two_runs):
    store, final = two_runs
    before, after, loss = json.loads(python("import json\n" + LAB_AFTER_RESTART, store))
    assert "all sessions: 2" in before and f"{final[8]:.4f}" in before  # a new kernel sees the earlier runs
    assert "all sessions: 3" in after and f"{loss:.4f}" in after  # and its own run joins them


DEFAULT_LAB = """
import json
from peftlab.widgets import Lab
lab = Lab(task=None, model="tiny-llama", steps=2, batch_size=2, max_length=64, redraw_every_s=0.0)
assert lab.report_to == "trackio" and not lab.store_note, lab.report_to
if MODE == "train":
    assert lab.on_train() and lab.wait(120), lab.message.value
    print("RESULT", json.dumps({"loss": lab.runs[0]["final_loss"], "table": lab.stored_table.value}))
else:
    print("RESULT", json.dumps({"table": lab.stored_table.value, "runs": lab.runs}))
"""


LIST_RUNS = """
import contextlib, io, json
from peftlab.cli import main
listing, as_json = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(as_json):
    assert main(["runs", "--json"]) == 0
with contextlib.redirect_stdout(listing):
    assert main(["runs"]) == 0
print("RESULT", json.dumps({"json": json.loads(as_json.getvalue()), "list": listing.getvalue()}))
"""


def test_a_default_lab_keeps_its_runs_in_the_store_across_kernels(tmp_path):
    """No report_to: one process (a kernel) trains, a second one's fresh Lab lists that run with its
    loss, and so does `peftlab runs`; the store is $PEFTLAB_RUNS_DIR, not the home directory."""
    store = tmp_path / "runs-store"
    first = json.loads(python('MODE = "train"\n' + DEFAULT_LAB, store, "PEFTLAB_RUNS_DIR"))
    assert "all sessions: 1" in first["table"]
    second = json.loads(python('MODE = "look"\n' + DEFAULT_LAB, store, "PEFTLAB_RUNS_DIR"))
    assert second["runs"] == []  # a new kernel: nothing in memory...
    assert "all sessions: 1" in second["table"] and f"{first['loss']:.4f}" in second["table"]  # ...but stored
    listed = json.loads(python(LIST_RUNS, store, "PEFTLAB_RUNS_DIR"))
    (run,) = listed["json"]
    assert run["last"]["loss"] == pytest.approx(first["loss"]) and run["config"]["train.steps"] == 2
    assert run["name"] in listed["list"]
    assert any(store.glob("*.db"))  # the store is where it was pointed


def test_without_trackio_the_lab_says_its_runs_are_in_memory(monkeypatch):
    import peftlab.tracking as tracking
    from peftlab.widgets.lab import runs_store_choice

    monkeypatch.setattr(tracking, "trackio_available", lambda: False)
    report_to, note = runs_store_choice("auto", None)
    assert report_to is None and "in memory" in note and "pip install trackio" in note
    monkeypatch.setattr(tracking, "trackio_available", lambda: True)
    assert runs_store_choice("auto", None) == ("trackio", "")
    assert runs_store_choice(None, None) == (None, "")  # opting out stays possible


def test_the_store_cannot_move_once_trackio_has_read_it(tmp_path):
    import trackio.utils  # noqa: F401  (what a first run does)

    from peftlab.tracking import use_store

    assert use_store(trackio.utils.TRACKIO_DIR) == Path(trackio.utils.TRACKIO_DIR).resolve()
    with pytest.raises(ConfigError, match="PEFTLAB_RUNS_DIR"):
        use_store(tmp_path / "elsewhere")


@pytest.mark.parametrize("env, hidden", [({}, False), ({"TQDM_DISABLE": "1"}, True), ({"CI": "true"}, True),
                                         ({"TQDM_DISABLE": "0"}, False), ({"GITHUB_ACTIONS": "true"}, True)])
def test_progress_bars_are_quiet_in_ci_and_with_tqdm_disable(monkeypatch, env, hidden):
    from peftlab.progress import progress_bar, progress_disabled

    for key in ("TQDM_DISABLE", "CI", "GITHUB_ACTIONS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert progress_disabled() is hidden
    with progress_bar(3, desc="study", unit="cell") as bar:
        assert bar.disable is hidden
    assert progress_bar(3, desc="x", enabled=False).disable


def test_peftlab_train_report_to_writes_tensorboard_events(tmp_path):
    from peftlab.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", "chatterbot-qa", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--out", str(out), "--no-progress", "--report-to", "tensorboard"]) == 0
    (run,) = (out / "checkpoints" / "runs").iterdir()
    assert run.name.startswith("lora-r8-") and any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2


def test_a_missing_tracker_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_trackio(name, *args, **kwargs):
        if name == "trackio":
            raise ImportError("No module named 'trackio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trackio)
    model, _ = peftlab.load_model("tiny-llama")
    model = peftlab.adapt(model, "lora", r=4)
    from peftlab.tracking import start

    with pytest.raises(ConfigError, match="pip install trackio"):
        start("trackio", model, {"lr": 1e-3})
