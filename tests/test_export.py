"""`peftlab export`: a run becomes a plain transformers + peft script that accelerate can launch.

The script is run for real, on the bundled tiny-llama: once as `python script.py` (one process,
which must reproduce the run's first loss exactly: same data, tokenization and loss) and once as
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` (DDP over gloo; plain
`--cpu --num_processes 2` starts a single process). Both must lower the loss and save an
adapter that peftlab and peft load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.errors import ConfigError
from peftlab.export import export_script, render_script

VENV_BIN = Path(sys.executable).parent
ACCELERATE = VENV_BIN / "accelerate"


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """12 question/answer rows in a .jsonl file: loads and tokenizes in milliseconds."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}."} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, qa_file):
    """A finished `peftlab train` run on tiny-llama (peft backend), 6 steps of 2 x 2 rows.
    Shared by the tests of this file: they only read it."""
    out = tmp_path_factory.mktemp("export") / "run"
    status = main(["train", "--model", "tiny-llama", "--data", str(qa_file), "--method", "lora",
                   "--backend", "peft", "--rank", "4", "--targets", "q_proj,v_proj", "--steps", "6",
                   "--lr", "0.02", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "64",
                   "--no-progress", "--out", str(out)])
    assert status == 0
    return out


def _script_env(tmp_path: Path) -> dict[str, str]:
    """No network, no user accelerate config (HF_HOME is a fresh folder), quiet, 1 thread each."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), TQDM_DISABLE="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_adapter(adapter: Path, trainable: int) -> None:
    """The saved adapter loads in peftlab and in peft, with the run's parameter count."""
    from peft import PeftModel

    import peftlab

    assert (adapter / "adapter_config.json").is_file()
    base, _ = peftlab.load_model("tiny-llama")
    loaded = peftlab.load_adapter(base, adapter)
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora" in n) == trainable
    base, _ = peftlab.load_model("tiny-llama")
    peft_model = PeftModel.from_pretrained(base, adapter)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) == trainable
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # trained: B left its zero init


def test_script_holds_the_run_literally(tiny_run, tmp_path, capsys):
    target = tmp_path / "train_tiny.py"
    assert main(["export", str(tiny_run), "--to", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    text = target.read_text()
    compile(text, str(target), "exec")  # valid Python
    run = json.loads((tiny_run / "run.json").read_text())
    for needle in ("LoraConfig(", "r=4,", "lora_alpha=8.0,", 'target_modules=["q_proj", "v_proj"]',
                   'task_type="CAUSAL_LM"', "SEED = 0", "STEPS = 6", "LR = 0.02", "GRAD_ACCUM = 2",
                   "BATCH_SIZE = 2", "MAX_LENGTH = 64", "MAX_GRAD_NORM = 1.0", "torch.optim.AdamW(",
                   "math.cos(", "accelerator.clip_grad_norm_(", "accelerator.backward(",
                   "accelerator.prepare(model, optimizer, loader)", "accelerator.reduce(",
                   "distributed_type: FSDP", "distributed_type: DEEPSPEED", run["command"],
                   "peftlab.load_model(MODEL", "peftlab.load_dataset(DATA)", "apply_chat_template"):
        assert needle in text, needle
    assert "$" not in text  # every placeholder was filled
    # the default path: next to the run, named after the method
    default = export_script(tiny_run)
    assert default == tiny_run / "train_lora.py" and default.read_text().startswith('"""Fine-tune')
    default.unlink()


def test_the_template_is_a_python_file_that_compiles():
    """peftlab/export/template.py is the exported script itself, placeholders and all: valid
    Python (so it is read and linted as code), and SCRIPT_TEMPLATE is its text below the header."""
    import importlib.resources

    from peftlab.export import SCRIPT_TEMPLATE

    template = importlib.resources.files("peftlab.export").joinpath("template.py")
    source = template.read_text(encoding="utf-8")
    compile(source, str(template), "exec")
    assert source.endswith(SCRIPT_TEMPLATE) and SCRIPT_TEMPLATE.startswith('"""Fine-tune __MODEL_NAME__')


def test_every_placeholder_is_filled(tiny_run):
    """No ``__NAME__`` of the template or its fragments survives into a script, for a causal LM,
    a 4-bit base and a hub model."""
    import re

    run = json.loads((tiny_run / "run.json").read_text())
    for change in ({}, {"quantization": "nf4"}, {"model": "HuggingFaceTB/SmolLM2-360M-Instruct",
                                                 "data": "someone/qa-pairs", "quantization": "nf4"}):
        text = render_script({**run, "args": {**run["args"], **change}})
        assert not re.search(r"__[A-Z][A-Z0-9_]*__", text), re.search(r"__[A-Z][A-Z0-9_]*__", text)


def test_qlora_and_hub_runs_render_their_own_loading_code(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    run["args"]["quantization"] = "nf4"
    text = render_script(run)
    assert 'quantization="nf4"' in text and "prepare_model_for_kbit_training(" in text
    compile(text, "qlora.py", "exec")

    run["args"].update(model="HuggingFaceTB/SmolLM2-360M-Instruct", data="someone/qa-pairs")
    text = render_script(run)
    compile(text, "hub.py", "exec")
    assert "import peftlab" not in text  # hub model + hub data: no peftlab needed at all
    assert "BitsAndBytesConfig(" in text and "AutoModelForCausalLM.from_pretrained(MODEL" in text


def test_unexportable_runs_are_clear_errors(tiny_run, tmp_path, capsys):
    run = json.loads((tiny_run / "run.json").read_text())
    run["args"]["method"], run["method_config"] = "bitfit", {}
    with pytest.raises(ConfigError, match="peft has no 'bitfit'"):
        render_script(run)
    run["args"]["method"] = "adalora"
    with pytest.raises(ConfigError, match="update_and_allocate"):
        render_script(run)
    assert main(["export", str(tmp_path / "nowhere"), "--to", str(tmp_path / "x.py")]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_exported_script_runs_as_python_script_and_repeats_the_run(tiny_run, tmp_path):
    """`python script.py`: one process reproduces the run's first loss, lowers the loss, and saves
    an adapter that peftlab and peft load."""
    script = export_script(tiny_run, tmp_path / "train_tiny.py")
    run = json.loads((tiny_run / "run.json").read_text())
    history = json.loads((tiny_run / "history.json").read_text())
    out = tmp_path / "single"
    done = subprocess.run([sys.executable, str(script)], env={**_script_env(tmp_path), "OUTPUT_DIR": str(out)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [r["loss"] for r in json.loads((out / "history.json").read_text())]
    assert len(losses) == 6
    # step 1 runs before any update: same rows, tokens, masking and loss as the peftlab run
    assert losses[0] == pytest.approx(history[0]["loss"], rel=1e-5)
    assert losses[-1] < losses[0] - 0.1
    _check_adapter(out / "adapter", run["summary"]["trainable_params"])


@pytest.mark.slow
def test_exported_script_trains_under_accelerate_launch_ddp_on_cpu(tiny_run, tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo), no accelerate config file.

    Note: `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up
    (accelerate 1.15's simple launcher); `--multi_gpu` with ACCELERATE_USE_CPU=1 starts two
    torch.distributed processes on the CPU.
    """
    if not ACCELERATE.exists():
        pytest.skip("accelerate's launcher is not installed next to this Python")
    script = export_script(tiny_run, tmp_path / "train_tiny.py")
    run = json.loads((tiny_run / "run.json").read_text())
    history = json.loads((tiny_run / "history.json").read_text())
    out = tmp_path / "ddp"
    env = {**_script_env(tmp_path), "OUTPUT_DIR": str(out), "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(
        [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         str(script)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step    6/6") == 1  # only the main process prints
    losses = [r["loss"] for r in json.loads((out / "history.json").read_text())]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    # two processes, two different shares of the data: the gathered first loss covers rows the
    # single-process run's first step never saw, so it differs from the run's
    assert losses[0] != pytest.approx(history[0]["loss"], rel=1e-6)
    _check_adapter(out / "adapter", run["summary"]["trainable_params"])
