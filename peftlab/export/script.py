"""Rendering the exported script: ``template.py`` with its placeholders filled in from a run.

:func:`render_script` reads the run's settings, picks the pieces that depend on them
(:mod:`peftlab.export.fragments`: how to load the model and the data, how to tokenize, the loss)
and fills every ``__NAME__`` of :data:`SCRIPT_TEMPLATE` with :func:`fill`. :func:`export_script`
writes the result next to the run.
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import ConfigError
from peftlab.export.fragments import (LOAD_BUNDLED_MODEL, LOAD_HUB_DATA, LOAD_HUB_MODEL, LOAD_PEFTLAB_DATA,
                                      LOSS_CAUSAL, LOSS_CLASSIFICATION, NF4_HUB_CONFIG, PREPARE_KBIT,
                                      TOKENIZE_CAUSAL, TOKENIZE_CLASSIFICATION)
from peftlab.export.peft_config import peft_config_source, string_literal

# Methods whose peft version needs more than "forward, loss, backward" in the loop; the exported
# loop would train them wrongly, so exporting them is refused with a clear message.
_NOT_EXPORTABLE = {
    "adalora": "AdaLoRA reallocates ranks during training (model.update_and_allocate(step) after "
               "every step) and adds an orthogonality loss that peft only adds when it computes the "
               "loss itself",
    "xlora": "X-LoRA needs trained LoRA experts to start from and a classifier-only training loop",
}

# --------------------------------------------------------------------------------------------
# The template and its placeholders
# --------------------------------------------------------------------------------------------
# __NAME__ alone on its line (group "alone", with its indentation) or inside a line ("inline")
_PLACEHOLDER = re.compile(r"^(?P<indent>[ ]*)__(?P<alone>[A-Z][A-Z0-9_]*)__$|__(?P<inline>[A-Z][A-Z0-9_]*?)__",
                          re.MULTILINE)
_HEADER_END = "# ---- the exported script starts below this line ----\n"


@dataclass(frozen=True)
class Block:
    """Lines of code for a placeholder that stands alone on its line, written unindented: each
    line is indented like the placeholder, and an empty block leaves an empty line."""

    code: str


def fill(template: str, values: dict[str, Any]) -> str:
    """``template`` with every ``__NAME__`` replaced by ``values["name"]``: ``str()`` of the value
    where it stands, or a :class:`Block` indented like its placeholder. A missing value raises
    KeyError (as ``string.Template.substitute`` does); values are not searched for placeholders."""

    def one(match: re.Match) -> str:
        indent = match["indent"] or ""
        value = values[(match["alone"] or match["inline"]).lower()]
        if not isinstance(value, Block):
            return indent + str(value)
        if match["alone"] is None:
            raise ValueError(f"The block for {match[0]} must stand alone on its line in the template; "
                             "pass its value as a str to fill it in the middle of a line.")
        return "\n".join(indent + line if line else line for line in value.code.split("\n"))

    return _PLACEHOLDER.sub(one, template)


def read_template() -> str:
    """The exported script with its ``__NAME__`` placeholders: ``template.py`` below its header."""
    text = importlib.resources.files("peftlab.export").joinpath("template.py").read_text(encoding="utf-8")
    return text.split(_HEADER_END, 1)[1]


SCRIPT_TEMPLATE = read_template()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def export_script(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write a standalone transformers + peft + accelerate script that repeats the run in ``run_dir``.

    Args:
        run_dir: a folder written by ``peftlab train --out DIR`` (it holds ``run.json``).
        path: where to write the script; default ``run_dir/train_<method>.py``.

    Returns:
        The path of the script written.

    Raises:
        ConfigError: ``run_dir`` holds no usable ``run.json``, or the run's method has no peft
            implementation (BitFit, bottleneck adapters) or needs a loop this script does not
            have (AdaLoRA, X-LoRA).
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    args = run["args"]
    target = Path(path) if path is not None else run_dir / f"train_{args['method']}.py"
    text = render_script(run, run_dir=run_dir, script_name=target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target


def read_run(run_dir: Path) -> dict[str, Any]:
    """``run_dir/run.json`` as a dict, with a clear error when it is missing or incomplete."""
    file = run_dir / "run.json"
    if not file.is_file():
        raise ConfigError(
            f"{run_dir} holds no run.json, so there is no run to export. Expected the folder "
            "given to `peftlab train --out DIR`; try `peftlab train ... --out DIR` first."
        )
    try:
        run = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON ({exc}). Expected the file peftlab train "
                          "wrote; re-run the training to write it again.") from exc
    missing = {"args", "method_config"} - set(run)
    if missing:
        raise ConfigError(f"{file} lacks {sorted(missing)}. Expected a run.json written by "
                          "`peftlab train`; re-run the training with this peftlab version.")
    return run


def render_script(run: dict[str, Any], *, run_dir: Path | str = "RUN_DIR",
                  script_name: str = "train.py") -> str:
    """The script's text for a run (the dict in ``run.json``): :data:`SCRIPT_TEMPLATE`, filled in."""
    import peftlab

    args = run["args"]
    method = args["method"]
    _refuse_unexportable(args)
    model_name, data_name = args["model"], args["data"]
    nf4 = args.get("quantization") == "nf4"
    classification = _is_classifier(run)
    peft_config, peft_class = peft_config_source(run, classification)
    load_model = _load_model_source(model_name, data_name, nf4, classification)
    load_data = _load_data_source(data_name)
    max_grad_norm = args.get("max_grad_norm")
    values = {
        "model_name": model_name,
        "method_name": method,
        "data_name": data_name,
        "run_dir": str(run_dir),
        "peftlab_version": peftlab.__version__,
        "date": datetime.date.today().isoformat(),
        "bnb_note": " + bitsandbytes (4-bit NF4 base, QLoRA)" if nf4 else "",
        "command": run.get("command", "(not recorded)"),
        "script_name": script_name,
        "grad_accum": args["grad_accum"],
        "max_grad_norm_yaml": max_grad_norm if max_grad_norm else "0",
        "peft_imports": f"{peft_class}, get_peft_model" + (", prepare_model_for_kbit_training" if nf4 else ""),
        "settings": Block(_settings_block(_settings_rows(args))),
        "output_dir_literal": string_literal(f"{Path(script_name).stem}-output"),
        "peft_config": peft_config,
        "load_model_function": Block(load_model.rstrip("\n")),
        "load_data_function": Block(load_data.rstrip("\n")),
        "tokenize_function": Block(TOKENIZE_CLASSIFICATION if classification else TOKENIZE_CAUSAL),
        "loss_function": Block((LOSS_CLASSIFICATION if classification else LOSS_CAUSAL).rstrip("\n") + "\n"),
        "prepare_kbit": Block(PREPARE_KBIT if nf4 else ""),
    }
    return fill(SCRIPT_TEMPLATE, values)


# --------------------------------------------------------------------------------------------
# The steps of render_script
# --------------------------------------------------------------------------------------------
def _refuse_unexportable(args: dict[str, Any]) -> None:
    """A clear error for a run the exported loop would train wrongly, or cannot train yet."""
    method = args["method"]
    if method in _NOT_EXPORTABLE:
        raise ConfigError(
            f"Cannot export a {method!r} run: {_NOT_EXPORTABLE[method]}. Expected a method whose "
            "peft model trains with a plain loop, e.g. lora, dora or ia3; train this one with "
            "peftlab or peft's own examples."
        )
    if args.get("task"):
        raise ConfigError(
            f"Cannot export a --task run ({args['task']}) yet: the exported script trains on a "
            "dataset, not on a task's framed rows. Expected a --data run; try peftlab train "
            "--data NAME ... and export that."
        )


def _is_classifier(run: dict[str, Any]) -> bool:
    """A sequence classifier (else a causal LM): a bundled model knows its task; a hub id or
    folder is a classifier exactly when the run's data had labels."""
    from peftlab.models import SEQUENCE_CLASSIFICATION, bundled_task

    model_name, data_name = run["args"]["model"], run["args"]["data"]
    if bundled_task(model_name) is not None:
        return bundled_task(model_name) == SEQUENCE_CLASSIFICATION
    return run.get("num_labels") is not None or _data_has_labels(data_name)


def _load_model_source(model_name: str, data_name: str, nf4: bool, classification: bool) -> str:
    """``load_model(accelerator)``: a bundled model through peftlab, anything else through the
    transformers Auto class of its task (with a BitsAndBytesConfig for a 4-bit base)."""
    from peftlab.models import bundled_task

    if bundled_task(model_name) is not None:
        load_kwargs = ', quantization="nf4", dtype=torch.bfloat16 if BF16 else torch.float32' if nf4 else ""
        if classification:
            load_kwargs += f", num_labels={_num_labels(data_name)}"
        nf4_note = ("\n    # quantization=\"nf4\": the frozen base in 4-bit NormalFloat via bitsandbytes "
                    "(QLoRA)." if nf4 else "")
        return fill(LOAD_BUNDLED_MODEL, {"model_name": model_name, "load_kwargs": load_kwargs,
                                         "nf4_note": nf4_note})
    auto_class = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
    hub_kwargs = ""
    if classification:
        hub_kwargs += f", num_labels={_num_labels(data_name)}"
    if nf4:
        hub_kwargs += ", quantization_config=quantization_config,\n        device_map={'': accelerator.device}"
    return fill(LOAD_HUB_MODEL, {"model_name": model_name, "auto_class": auto_class, "hub_kwargs": hub_kwargs,
                                 "nf4_config_lines": Block(NF4_HUB_CONFIG if nf4 else "")})


def _load_data_source(data_name: str) -> str:
    """``load_data()``: bundled corpora and local files through peftlab, else the hub's datasets."""
    from peftlab.data import BUNDLED_DATASETS

    uses_peftlab_data = data_name in BUNDLED_DATASETS or _looks_like_file(data_name)
    return fill(LOAD_PEFTLAB_DATA if uses_peftlab_data else LOAD_HUB_DATA, {"data_name": data_name})


def _settings_rows(args: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(NAME, value as source, comment) for the script's settings block."""
    max_grad_norm = args.get("max_grad_norm")
    return [
        ("MODEL", string_literal(args["model"]), "bundled name, hub id or local folder"),
        ("DATA", string_literal(args["data"]), "bundled name, data file or hub dataset id"),
        ("SEED", args["seed"], "fixes the adapter's initial weights, dropout and data order"),
        ("STEPS", args["steps"], "optimizer steps"),
        ("LR", repr(float(args["lr"])), "peak learning rate: linear warmup, then cosine to 0"),
        ("WARMUP_RATIO", repr(float(args["warmup_ratio"])), "share of the steps spent warming up"),
        ("BATCH_SIZE", args["batch_size"], "rows per micro-batch, per process"),
        ("GRAD_ACCUM", args["grad_accum"], "micro-batches per optimizer step (gradient accumulation)"),
        ("MAX_LENGTH", args["seq_len"], "tokens per row; longer rows are cut"),
        ("MAX_GRAD_NORM", repr(float(max_grad_norm)) if max_grad_norm else "None",
         "clip the global gradient norm to this (None: no clipping)"),
        ("WEIGHT_DECAY", repr(float(args["weight_decay"])), "AdamW weight decay"),
        ("BF16", repr(bool(args.get("bf16"))), "bfloat16 mixed precision"),
        ("GRADIENT_CHECKPOINTING", repr(bool(args.get("grad_checkpointing"))),
         "recompute activations in backward: less memory, more time"),
    ]


def _settings_block(rows: list[tuple[str, Any, str]]) -> str:
    """``NAME = value   # comment`` lines with the comments in one column."""
    width = max(len(f"{name} = {value}") for name, value, _ in rows)
    return "\n".join(f"{f'{name} = {value}':<{width}}  # {comment}" for name, value, comment in rows)


def _looks_like_file(name: str) -> bool:
    return Path(name).expanduser().suffix.lower() in {".csv", ".tsv", ".jsonl", ".json"} or \
        Path(name).expanduser().is_file()


def _data_has_labels(data_name: str) -> bool:
    import peftlab

    try:
        train = peftlab.load_dataset(data_name)["train"]
    except Exception:  # noqa: BLE001 (offline hub dataset: assume a causal LM, the default)
        return False
    return "label" in train.column_names


def _num_labels(data_name: str) -> int:
    import peftlab

    label = peftlab.load_dataset(data_name)["train"].features["label"]
    names = getattr(label, "names", None)
    if not names:
        raise ConfigError(f"The dataset {data_name!r} has a 'label' column without class names, so "
                          "the classifier's size is unknown. Expected a ClassLabel column.")
    return len(names)


__all__ = ["SCRIPT_TEMPLATE", "Block", "fill", "read_template", "export_script", "read_run", "render_script"]
