# The script `peftlab export` writes, as a template (peftlab/export/script.py fills it in).
#
# Every __NAME__ (capitals between double underscores) is a placeholder, replaced by what the run
# says; where its value spans lines (a function, the settings block), the template indents only
# the first line and the value carries the indentation of the others. A placeholder alone on its
# line with an empty value leaves an empty line. Everything from the docstring on is the script;
# these comment lines are not part of it. tests/test_export.py compiles this file, so the
# template stays valid Python with the placeholders in it.
# ---- the exported script starts below this line ----
"""Fine-tune __MODEL_NAME__ with __METHOD_NAME__ on __DATA_NAME__: a plain transformers + peft script.

Exported from the peftlab run in __RUN_DIR__ by `peftlab export` (peftlab __PEFTLAB_VERSION__,
__DATE__). It repeats that run with Hugging Face transformers + peft__BNB_NOTE__: the same data,
hyperparameters and seed. The run's own command was:

    __COMMAND__

Run it
------
    python __SCRIPT_NAME__                                        # one process: CPU or one GPU
    accelerate launch __SCRIPT_NAME__                             # as set by `accelerate config`
    accelerate launch --multi_gpu --num_processes 4 __SCRIPT_NAME__   # DDP on 4 GPUs

    # DDP on a machine without GPUs (gloo), to try it out. `--cpu` alone starts ONE process
    # (several only through mpirun); `--multi_gpu` + ACCELERATE_USE_CPU starts N CPU processes:
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 __SCRIPT_NAME__

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
with `accelerate launch --config_file fsdp.yaml __SCRIPT_NAME__`.

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
      gradient_accumulation_steps: __GRAD_ACCUM__   # must equal GRAD_ACCUM below
      gradient_clipping: __MAX_GRAD_NORM_YAML__     # DeepSpeed clips itself
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
from peft import __PEFT_IMPORTS__

# ---------------------------------------------------------------------------------------------
# The run's settings (from __RUN_DIR__/run.json). Change them here.
# ---------------------------------------------------------------------------------------------
__SETTINGS__
OUTPUT_DIR = Path(os.environ.get("OUTPUT_DIR", __OUTPUT_DIR_LITERAL__))
IGNORE_INDEX = -100  # a label the cross-entropy skips: prompt tokens and padding

# The adapter, as a peft config (__METHOD_NAME__ in peftlab; resolved from the run).
PEFT_CONFIG = __PEFT_CONFIG__


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------
__LOAD_MODEL_FUNCTION__


__LOAD_DATA_FUNCTION__


__TOKENIZE_FUNCTION__


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


__LOSS_FUNCTION__

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
    __PREPARE_KBIT__
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
