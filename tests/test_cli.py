"""The `peftlab` command: train writes everything, user errors exit 2 without a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from peftlab.cli import build_parser, main, parse_targets, reproduce_command

TINY = ["train", "--model", "tiny-llama", "--data", "chatterbot-qa", "--batch-size", "2",
        "--seq-len", "96", "--no-progress"]


@pytest.fixture
def qa_file(tmp_path):
    """A 12-row question/answer .jsonl file: loads in milliseconds, unlike a bundled corpus."""
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}."} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_train_on_tiny_llama_writes_adapter_report_history_and_run(tmp_path, qa_file, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(qa_file), "--steps", "3", "--rank", "4", "--targets", "q_proj,v_proj", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("trainable params", "loss first -> last", "peak memory", "time"):
        assert label in printed
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-000003" / "trainer_state.pt").is_file()

    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3]
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["rank"] == 4 and run["args"]["steps"] == 3
    assert run["method_config"]["r"] == 4 and run["method_config"]["targets"] == ["q_proj", "v_proj"]
    assert run["summary"]["first_loss"] == history[0]["loss"]
    assert run["summary"]["last_loss"] == history[-1]["loss"]
    assert run["summary"]["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers, q and v
    assert run["command"].startswith("peftlab train --model tiny-llama")

    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("plotly.js v") == 1  # plotly.js embedded once, inline: opens offline
    assert report.count("Plotly.newPlot") >= 2  # loss and memory figures
    assert "Training loss" in report and "Memory" in report
    assert not re.search(r"<script[^>]*\bsrc=", report)  # nothing fetched from a CDN

    # the adapter loads back into a fresh base and the run can be reproduced from run.json
    import peftlab

    base, _ = peftlab.load_model("tiny-llama")
    loaded = peftlab.load_adapter(base, out / "adapter")
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora" in n) == run["summary"]["trainable_params"]
    assert build_parser().parse_args(run["command"].split()[1:]).rank == 4


def test_bad_method_exits_2_with_one_message_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab.cli", "train", "--model", "tiny-llama", "--method", "lorra",
         "--out", str(tmp_path / "x")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert "Unknown method 'lorra'" in proc.stderr and "Did you mean 'lora'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()  # failed before loading anything


def test_bad_hyperparameter_and_bad_model_exit_2(tmp_path, capsys):
    assert main([*TINY, "--set", "colour=blue", "--out", str(tmp_path)]) == 2
    assert "does not take the hyperparameter 'colour'" in capsys.readouterr().err
    assert main([*TINY, "--rank", "0", "--out", str(tmp_path)]) == 2
    assert "Rank r=0 is invalid" in capsys.readouterr().err
    assert main(["train", "--model", "tiny-lama", "--out", str(tmp_path)]) == 2
    assert "tiny-llama" in capsys.readouterr().err  # the message names the closest bundled model


def test_info_lists_models_datasets_and_methods(capsys):
    import peftlab

    assert main(["info", "--brief"]) == 0
    brief = capsys.readouterr().out
    for section in ("models:", "datasets:", "methods:", "tasks:"):
        assert section in brief
    for name in ("smollm2-135m", "tiny-llama", "chatterbot-qa", "rotten-tomatoes", "sentiment", "forgetting"):
        assert name in brief
    for method in peftlab.list_methods():
        assert f"  {method['name']} " in brief
    assert all(len(line) < 100 for line in brief.splitlines())

    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["methods"]] == [m["name"] for m in peftlab.list_methods()]
    assert {m["name"] for m in data["models"]} >= {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-bert"}


def test_bench_spectra_prints_a_table(capsys):
    assert main(["bench", "spectra", "--sizes", "64", "--ranks", "4", "--repeats", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "speedup" in table[0] and len(table) == 2 and table[1].split()[:2] == ["64", "4"]


@pytest.mark.skipif(importlib.util.find_spec("peftlab.bench") is not None,
                    reason="peftlab.bench exists: its own tests cover `peftlab bench train`")
def test_bench_train_without_the_bench_module_is_a_clear_error(capsys):
    assert main(["bench", "train"]) == 2
    assert "peftlab.bench" in capsys.readouterr().err


def test_targets_and_command_line_helpers():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    args = build_parser().parse_args(["train", "--out", "d", "--bf16", "--set", "use_rslora=true"])
    command = reproduce_command(args)
    assert "--bf16" in command and "--set use_rslora=true" in command
    assert build_parser().parse_args(command.split()[1:]).hyperparameters == ["use_rslora=true"]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train"])  # --out is required: argparse exits 2
    assert exc.value.code == 2


@pytest.mark.slow
def test_train_on_smollm2_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "smol"
    code = main(["train", "--model", "smollm2-135m", "--data", "chatterbot-qa", "--method", "lora",
                 "--rank", "8", "--steps", "2", "--batch-size", "2", "--seq-len", "64", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["steps"] == 2 and run["summary"]["peak_memory_mb"] > 500  # fp32 weights alone
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.html").is_file()
