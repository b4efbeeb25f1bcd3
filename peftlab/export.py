"""From notebook to cluster: export a peftlab run as a plain transformers + peft training script.

    peftlab export runs/lora-r8 --to train_lora.py          # the command line
    peftlab.export.export_script("runs/lora-r8", "train_lora.py")   # the Lab's export button

``peftlab train --out DIR`` writes ``DIR/run.json`` (every argument and the resolved method
config). :func:`export_script` turns it into one readable Python file that repeats the run with
Hugging Face ``transformers`` + ``peft`` (+ ``bitsandbytes`` for QLoRA) and ``accelerate``: the same
data, hyperparameters and seed, runnable both as ``python script.py`` (one process) and as
``accelerate launch script.py`` (DDP; FSDP and DeepSpeed recipes are in the script's docstring).

The script leans on peftlab only to *find* the bundled model and data (``peftlab.load_model`` /
``peftlab.load_dataset`` for bundled names and local files); a run on a hub model and a hub
dataset gives a script that does not import peftlab at all. Everything else (tokenization with
the chat template and the loss on answer tokens only, the peft config, AdamW with warmup + cosine,
gradient accumulation, clipping, the seeded data order) is written out in the script itself.

How the script is made: :data:`SCRIPT_TEMPLATE` is the whole script as a ``string.Template`` with
named ``$placeholders``; a few small fragments (how to load the model, the data, how to tokenize)
are chosen by the run's settings and filled in. Read the template to see what every export
looks like.

References:
    accelerate, "Add Accelerate to your code": https://huggingface.co/docs/accelerate/basic_tutorials/migration
    accelerate, gradient accumulation: https://huggingface.co/docs/accelerate/usage_guides/gradient_accumulation
    FSDP with accelerate: https://huggingface.co/docs/accelerate/usage_guides/fsdp
    DeepSpeed with accelerate: https://huggingface.co/docs/accelerate/usage_guides/deepspeed
    peft + accelerate: https://huggingface.co/docs/peft/accelerate/fsdp
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import string
from pathlib import Path
from typing import Any

from peftlab.errors import ConfigError

# Methods whose peft version needs more than "forward, loss, backward" in the loop; the exported
# loop would train them wrongly, so exporting them is refused with a clear message.
_NOT_EXPORTABLE = {
    "adalora": "AdaLoRA reallocates ranks during training (model.update_and_allocate(step) after "
               "every step) and adds an orthogonality loss that peft only adds when it computes the "
               "loss itself",
    "xlora": "X-LoRA needs trained LoRA experts to start from and a classifier-only training loop",
}
# Fields of a peft config that are bookkeeping, not hyperparameters.
_PEFT_BOOKKEEPING = {"peft_type", "peft_version", "base_model_name_or_path", "revision",
                     "inference_mode", "auto_mapping"}
# Shown even when equal to peft's default: the numbers a reader looks for first.
_ALWAYS_SHOWN = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type",
                 "num_virtual_tokens")


# --------------------------------------------------------------------------------------------
# The template: the exported script, with $placeholders
# --------------------------------------------------------------------------------------------
SCRIPT_TEMPLATE = '''\
"""Fine-tune $model_name with $method_name on $data_name: a plain transformers + peft script.

Exported from the peftlab run in $run_dir by `peftlab export` (peftlab $peftlab_version,
$date). It repeats that run with Hugging Face transformers + peft$bnb_note: the same data,
hyperparameters and seed. The run's own command was:

    $command

Run it
------
    python $script_name                                        # one process: CPU or one GPU
    accelerate launch $script_name                             # as set by `accelerate config`
    accelerate launch --multi_gpu --num_processes 4 $script_name   # DDP on 4 GPUs

    # DDP on a machine without GPUs (gloo), to try it out. `--cpu` alone starts ONE process
    # (several only through mpirun); `--multi_gpu` + ACCELERATE_USE_CPU starts N CPU processes:
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 $script_name

What accelerate does here (DDP, Distributed Data Parallel)
----------------------------------------------------------
`accelerate launch` starts one process per device and `Accelerator()` connects them. Each
process holds a full copy of the model; `accelerator.prepare(...)` wraps the model for DDP, moves
it to this process's device and gives every process a different share of each epoch's batches.
`accelerator.backward(loss)` averages the gradients over the processes, so every copy takes the
same optimizer step and the copies stay identical. Losses are gathered for the log, and only the
main process writes files.

One process reproduces the peftlab run: the same batches in the same order, tokens, masking and
loss (step 1's loss is identical). The adapter's random initialisation and dropout now come from
peft, so later losses match closely, not bit for bit. N processes see N times as many rows per optimizer step
(BATCH_SIZE rows x GRAD_ACCUM micro-batches x N processes). Divide GRAD_ACCUM (or BATCH_SIZE) by N
to keep the effective batch of the original run.

Bigger models: FSDP or DeepSpeed
--------------------------------
DDP needs the whole model in every device's memory. When it no longer fits, shard it: nothing in
this script changes, only the launch. Answer `accelerate config` or write a yaml file and pass it
with `accelerate launch --config_file fsdp.yaml $script_name`.

FSDP (PyTorch's Fully Sharded Data Parallel: weights, gradients and optimizer state sharded):

    # fsdp.yaml
    compute_environment: LOCAL_MACHINE
    distributed_type: FSDP
    num_machines: 1
    num_processes: 4                 # GPUs on this machine
    mixed_precision: bf16
    fsdp_config:
      fsdp_version: 2
      fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP   # one shard unit per decoder layer
      fsdp_state_dict_type: FULL_STATE_DICT            # the saved adapter is one ordinary file
      fsdp_cpu_ram_efficient_loading: true
      fsdp_offload_params: false
      fsdp_use_orig_params: true     # needed when only some parameters train (the adapter)

DeepSpeed ZeRO (stage 2 shards gradients and optimizer state; stage 3 the weights too):

    # deepspeed.yaml
    compute_environment: LOCAL_MACHINE
    distributed_type: DEEPSPEED
    num_machines: 1
    num_processes: 4
    mixed_precision: bf16
    deepspeed_config:
      zero_stage: 2
      gradient_accumulation_steps: $grad_accum   # must equal GRAD_ACCUM below
      gradient_clipping: $max_grad_norm_yaml     # DeepSpeed clips itself
      offload_optimizer_device: none             # or cpu: optimizer state in host memory
      zero3_init_flag: false

Several machines: the same yaml with `num_machines`, `machine_rank`, `main_process_ip` and
`main_process_port`, launched once on every machine. 4-bit (QLoRA) bases work with DDP; with FSDP
they need `bnb_4bit_quant_storage` set to the compute dtype (see the peft docs).

References: https://huggingface.co/docs/accelerate/basic_tutorials/migration,
https://huggingface.co/docs/accelerate/usage_guides/fsdp,
https://huggingface.co/docs/accelerate/usage_guides/deepspeed, https://huggingface.co/docs/peft
"""

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from peft import $peft_config_class, get_peft_model$peft_extra_imports

# ---------------------------------------------------------------------------------------------
# The run's settings (from $run_dir/run.json). Change them here.
# ---------------------------------------------------------------------------------------------
$settings
OUTPUT_DIR = Path(os.environ.get("OUTPUT_DIR", $output_dir_literal))
IGNORE_INDEX = -100  # a label the cross-entropy skips: prompt tokens and padding

# The adapter, as a peft config ($method_name in peftlab; resolved from the run).
PEFT_CONFIG = $peft_config


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------
$load_model_function


$load_data_function


$tokenize_function


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the rows on the right to the longest one. Padding is masked out of attention (mask 0)
    and out of the loss (label -100), so it changes nothing but the shape."""
    longest = max(len(row["input_ids"]) for row in rows)

    def pad(values: list, fill: int) -> list:
        return list(values) + [fill] * (longest - len(values))

    batch = {
        "input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),  # (B, T)
        "attention_mask": torch.tensor([pad(r["attention_mask"], 0) for r in rows]),  # (B, T)
    }
    if isinstance(rows[0]["labels"], list):
        batch["labels"] = torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows])  # (B, T)
    else:
        batch["labels"] = torch.tensor([r["labels"] for r in rows])  # (B,): one class per row
    return batch


class SeededStream(torch.utils.data.Sampler):
    """Row indices for the whole run: epoch after epoch, each a permutation from its own seeded
    generator (the order peftlab's train() uses, so one process sees the same batches).
    With N processes accelerate hands every process every N-th batch of this stream."""

    def __init__(self, n_rows: int, n_samples: int, seed: int) -> None:
        self.n_rows, self.n_samples, self.seed = n_rows, n_samples, seed

    def __iter__(self):
        for i in range(self.n_samples):
            epoch, position = divmod(i, self.n_rows)
            if position == 0:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.n_rows, generator=generator).tolist()
            yield order[position]

    def __len__(self) -> int:
        return self.n_samples


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of LR at optimizer step `step` (0-based): linear warmup, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # the first step already learns (not lr = 0)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


$loss_function

# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def main() -> None:
    # One Accelerator per process. It reads what `accelerate launch` set up (how many processes,
    # which device is ours, DDP / FSDP / DeepSpeed); under plain `python` it is a single process.
    # It also counts micro-batches: gradients are synchronised (and the optimizer steps) only on
    # every GRAD_ACCUM-th one, inside `accelerator.accumulate(model)` below. (Not also at the end
    # of the data loader: the loop below fetches a step's micro-batches before using them.)
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=GRAD_ACCUM, sync_with_dataloader=False),
        mixed_precision="bf16" if BF16 else "no",
    )
    set_seed(SEED)  # python, numpy and torch on every process: identical adapter initialisation

    model, tokenizer = load_model(accelerator)
    if GRADIENT_CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output must carry gradients
$prepare_kbit
    model = get_peft_model(model, PEFT_CONFIG)  # freezes the base, adds the adapter
    if accelerator.is_main_process:
        model.print_trainable_parameters()

    # Tokenize on the main process first; the others then read the datasets cache it wrote.
    with accelerator.main_process_first():
        rows = tokenize(load_data(), tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = STEPS * GRAD_ACCUM * BATCH_SIZE * accelerator.num_processes
    loader = torch.utils.data.DataLoader(
        rows, batch_size=BATCH_SIZE, sampler=SeededStream(len(rows), samples, SEED),
        collate_fn=lambda batch: collate(batch, pad_id),
    )

    # AdamW on the adapter's weights only (the base is frozen: no gradients, no optimizer state).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    warmup_steps = int(WARMUP_RATIO * STEPS)
    # The schedule counts optimizer steps. It is deliberately NOT passed to prepare(): a prepared
    # scheduler advances once per process per step, which would end the schedule early under DDP.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, STEPS))

    # The one change that makes the loop distributed: wrap the model (DDP/FSDP/DeepSpeed), the
    # optimizer and the data loader (each process gets its own share of the batches).
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()  # dropout on
    history = []
    batches = iter(loader)
    for step in range(STEPS):
        micro_batches = [next(batches) for _ in range(GRAD_ACCUM)]
        # The step's loss is the mean over ALL its target tokens, so 2 micro-batches of 2 rows
        # give the same update as 1 micro-batch of 4 rows.
        step_targets = sum(count_targets(b) for b in micro_batches)
        loss_sum_step = torch.zeros((), device=accelerator.device)
        for batch in micro_batches:
            with accelerator.accumulate(model):  # no gradient sync until the last micro-batch
                with accelerator.autocast():
                    logits = model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
                    loss_sum = summed_loss(logits, batch["labels"])
                # accelerator.backward divides by GRAD_ACCUM (it assumes one mean per micro-batch);
                # multiplying back keeps our loss the mean over the step's tokens.
                accelerator.backward(loss_sum / step_targets * GRAD_ACCUM)
                grad_norm = None
                if accelerator.sync_gradients and MAX_GRAD_NORM:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()       # a no-op until the last micro-batch of the step
                optimizer.zero_grad()
            loss_sum_step += loss_sum.detach()
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()

        # Every process trained on different rows: add up their losses and token counts.
        totals = accelerator.reduce(torch.stack([
            loss_sum_step.float(), torch.tensor(float(step_targets), device=accelerator.device)]),
            reduction="sum")
        loss = (totals[0] / totals[1]).item()
        record = {"step": step + 1, "loss": loss, "lr": lr_used,
                  "grad_norm": None if grad_norm is None else float(grad_norm)}
        history.append(record)
        accelerator.print(f"step {step + 1:>4}/{STEPS}  loss {loss:.4f}  lr {lr_used:.2e}")

    # Save the adapter (a few MB, not the base model). get_state_dict gathers the weights from
    # every process (needed under FSDP / DeepSpeed ZeRO-3), so all processes call it; only the
    # main process writes.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(OUTPUT_DIR / "adapter", state_dict=state_dict,
                              is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        (OUTPUT_DIR / "history.json").write_text(json.dumps(history, indent=1))
        print(f"adapter saved to {OUTPUT_DIR / 'adapter'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
'''

# --------------------------------------------------------------------------------------------
# Fragments chosen by the run's settings
# --------------------------------------------------------------------------------------------
_LOAD_BUNDLED_MODEL = '''\
def load_model(accelerator):
    """The bundled model $model_name, found by peftlab (it ships inside a pip package, offline)."""
    import peftlab

    # peftlab.load_model returns a plain transformers model and its tokenizer (pad token set).$nf4_note
    model, tokenizer = peftlab.load_model(MODEL$load_kwargs, device=accelerator.device)
    return model, tokenizer
'''

_LOAD_HUB_MODEL = '''\
def load_model(accelerator):
    """$model_name from the Hugging Face hub (or a local folder), with transformers."""
    from transformers import $auto_class, AutoTokenizer
$nf4_config_lines
    model = $auto_class.from_pretrained(MODEL$hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    if tokenizer.pad_token is None:  # many causal LMs have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
'''

_NF4_HUB_CONFIG = '''\
    from transformers import BitsAndBytesConfig

    # QLoRA: the frozen base is stored as 4-bit NormalFloat with double quantization; the
    # adapter and the computation stay in higher precision (Dettmers et al. 2023).
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if BF16 else torch.float32,
    )
'''

_LOAD_PEFTLAB_DATA = '''\
def load_data():
    """The training split of $data_name, from peftlab (bundled corpora and local files, with the
    same seeded train/test split as the run). A plain datasets.Dataset."""
    import peftlab

    return peftlab.load_dataset(DATA)["train"]
'''

_LOAD_HUB_DATA = '''\
def load_data():
    """The training split of $data_name from the Hugging Face hub (datasets)."""
    from datasets import load_dataset

    # peftlab held out 10% as "test" (seed 0); the same split is made here.
    return load_dataset(DATA, split="train").train_test_split(test_size=0.1, seed=0)["train"]
'''

_TOKENIZE_CAUSAL = '''\
def tokenize(dataset, tokenizer):
    """input_ids, attention_mask and labels for a causal LM.

    Question/answer rows: the question is the user turn and the answer the assistant turn of the
    tokenizer's chat template. Prompt tokens get label -100, so the loss is only on the answer
    (the usual supervised fine-tuning recipe). Plain text rows: every token is a target.
    """
    def prompt_and_answer(question: str, answer: str) -> tuple[str, str]:
        if tokenizer.chat_template:
            user = [{"role": "user", "content": question}]
            prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": answer}], tokenize=False)
            if full.startswith(prompt):
                return prompt, full[len(prompt):]
            return prompt, answer + (tokenizer.eos_token or "")
        return f"Question: {question}\\nAnswer:", f" {answer}{tokenizer.eos_token or ''}"

    def encode(row: dict) -> dict:
        if "question" in row:
            prompt, answer = prompt_and_answer(row["question"], row["answer"])
            # tokenized apart, so the mask boundary falls exactly between prompt and answer
            prompt_ids = tokenizer(prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + answer_ids)[:MAX_LENGTH]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:MAX_LENGTH]
        else:
            ids = tokenizer(row["text"])["input_ids"][:MAX_LENGTH]
            labels = list(ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    tokens = dataset.map(encode, remove_columns=dataset.column_names)
    # a row whose prompt fills MAX_LENGTH has no answer token left to learn from
    return tokens.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"][1:]))
'''

_TOKENIZE_CLASSIFICATION = '''\
def tokenize(dataset, tokenizer):
    """input_ids, attention_mask and labels (the class id) for sequence classification."""
    def encode(row: dict) -> dict:
        encoded = tokenizer(row["text"], truncation=True, max_length=MAX_LENGTH)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": row["label"]}

    return dataset.map(encode, remove_columns=dataset.column_names)
'''

_LOSS_CAUSAL = '''\
def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy SUMMED over the batch's target tokens: position t predicts token t + 1."""
    logits = logits[:, -labels.shape[1]:]  # soft-prompt methods prepend virtual-token positions
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # (B * (T-1), V)
        labels[:, 1:].reshape(-1),  # (B * (T-1),)
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def count_targets(batch: dict) -> int:
    """How many tokens summed_loss adds up (labels that are not -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
'''

_LOSS_CLASSIFICATION = '''\
def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy SUMMED over the rows: logits (B, C), labels (B,)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def count_targets(batch: dict) -> int:
    """One target per row."""
    return int(batch["labels"].shape[0])
'''


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
    from peftlab.data import BUNDLED_DATASETS
    from peftlab.models import SEQUENCE_CLASSIFICATION, bundled_task

    args = run["args"]
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
    model_name, data_name = args["model"], args["data"]
    nf4 = args.get("quantization") == "nf4"
    bundled_model = bundled_task(model_name) is not None
    if bundled_model:
        classification = bundled_task(model_name) == SEQUENCE_CLASSIFICATION
    else:  # a hub id or folder: a classifier exactly when the run's data had labels
        classification = run.get("num_labels") is not None or _data_has_labels(data_name)
    peft_config, peft_class = peft_config_source(run, classification)

    tmpl = string.Template
    if bundled_model:
        load_kwargs = ', quantization="nf4", dtype=torch.bfloat16 if BF16 else torch.float32' if nf4 else ""
        if classification:
            load_kwargs += f", num_labels={_num_labels(data_name)}"
        nf4_note = ("\n    # quantization=\"nf4\": the frozen base in 4-bit NormalFloat via bitsandbytes "
                    "(QLoRA)." if nf4 else "")
        load_model = tmpl(_LOAD_BUNDLED_MODEL).substitute(
            model_name=model_name, load_kwargs=load_kwargs, nf4_note=nf4_note)
    else:
        auto_class = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
        hub_kwargs = ""
        if classification:
            hub_kwargs += f", num_labels={_num_labels(data_name)}"
        if nf4:
            hub_kwargs += ", quantization_config=quantization_config,\n        device_map={'': accelerator.device}"
        load_model = tmpl(_LOAD_HUB_MODEL).substitute(
            model_name=model_name, auto_class=auto_class, hub_kwargs=hub_kwargs,
            nf4_config_lines=_NF4_HUB_CONFIG if nf4 else "")

    uses_peftlab_data = data_name in BUNDLED_DATASETS or _looks_like_file(data_name)
    load_data = tmpl(_LOAD_PEFTLAB_DATA if uses_peftlab_data else _LOAD_HUB_DATA).substitute(
        data_name=data_name)

    prepare_kbit = ""
    peft_extra_imports = ""
    if nf4:
        peft_extra_imports = ", prepare_model_for_kbit_training"
        prepare_kbit = (
            "    # QLoRA: norms (and the head) in fp32 for stable training, input gradients on\n"
            "    model = prepare_model_for_kbit_training(\n"
            "        model, use_gradient_checkpointing=GRADIENT_CHECKPOINTING)\n"
        )

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
        "peft_config_class": peft_class,
        "peft_extra_imports": peft_extra_imports,
        "settings": _settings_block([
            ("MODEL", _string(model_name), "bundled name, hub id or local folder"),
            ("DATA", _string(data_name), "bundled name, data file or hub dataset id"),
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
        ]),
        "output_dir_literal": _string(f"{Path(script_name).stem}-output"),
        "peft_config": peft_config,
        "load_model_function": load_model.rstrip("\n"),
        "load_data_function": load_data.rstrip("\n"),
        "tokenize_function": (_TOKENIZE_CLASSIFICATION if classification else _TOKENIZE_CAUSAL),
        "loss_function": (_LOSS_CLASSIFICATION if classification else _LOSS_CAUSAL).rstrip("\n") + "\n",
        "prepare_kbit": prepare_kbit,
    }
    return tmpl(SCRIPT_TEMPLATE).substitute(values)


def _settings_block(rows: list[tuple[str, Any, str]]) -> str:
    """``NAME = value   # comment`` lines with the comments in one column."""
    width = max(len(f"{name} = {value}") for name, value, _ in rows)
    return "\n".join(f"{f'{name} = {value}':<{width}}  # {comment}" for name, value, comment in rows)


def peft_config_source(run: dict[str, Any], classification: bool) -> tuple[str, str]:
    """The run's adapter as peft config source code, e.g. ``LoraConfig(r=8, ...)``, and the class name.

    The peftlab config in ``run.json`` goes through :func:`peftlab.production.hf_peft.to_peft_config`
    (the same translation ``backend="peft"`` uses); fields left at peft's defaults are omitted,
    except the few a reader looks for first (rank, alpha, dropout, targets, task type).
    """
    from peftlab.api import make_config
    from peftlab.methods import get_method
    from peftlab.production.hf_peft import to_peft_config

    spec = get_method(run["args"]["method"])
    if spec.peft_type is None:
        raise ConfigError(
            f"peft has no {spec.name!r} method, so a transformers + peft script cannot repeat this "
            "run. Expected a method peft implements (lora, dora, loha, lokr, ia3, oft, vera, "
            "prompt tuning, ...); keep training it with peftlab."
        )
    config = make_config(spec, None, **run["method_config"])
    task = "SEQ_CLS" if classification else "CAUSAL_LM"
    peft_config = to_peft_config(spec, config, task_type=task)
    return _config_literal(peft_config), type(peft_config).__name__


def _config_literal(config: Any) -> str:
    """``LoraConfig(\\n    r=8,\\n    ...\\n)``: the fields that differ from the class defaults."""
    lines = []
    for field in dataclasses.fields(config):
        if not field.init or field.name in _PEFT_BOOKKEEPING:
            continue
        value = getattr(config, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if field.name not in _ALWAYS_SHOWN and _same(value, default):
            continue
        if field.name in _ALWAYS_SHOWN and value is None and default is None:
            continue
        lines.append(f"    {field.name}={_literal(value)},")
    return f"{type(config).__name__}(\n" + "\n".join(lines) + "\n)"


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 (tensors and odd types: show them)
        return False


def _literal(value: Any) -> str:
    """Python source for a config value: sets become sorted lists, enums their string value."""
    import enum

    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, (set, frozenset)):
        return _literal(sorted(value))
    if isinstance(value, tuple):
        return _literal(list(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return _string(value)
    return repr(value)


def _string(text: str) -> str:
    """A string literal in double quotes (the style of the rest of the script)."""
    return json.dumps(text) if text.isprintable() and "\\" not in text else repr(text)


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
