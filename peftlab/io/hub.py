"""An adapted model's ``save_pretrained``, and Trainer checkpoints that load back into it.

The Hugging Face tools save a model by calling ``model.save_pretrained(folder)``:
``Trainer.save_model``, every checkpoint, TRL's trainers and ``model.push_to_hub``. For a model
that ``peftlab.adapt`` edited in place, transformers' own ``save_pretrained`` would write the whole
model under the wrappers' parameter names (``...q_proj.adapters.default.lora_B``), which
``from_pretrained`` then loads with the adapted layers' base weights missing and the adapter
dropped. So ``peftlab.adapt`` gives the model object (not its class) a ``save_pretrained`` that
writes what a ``peft.PeftModel`` writes, into the folder, beside whatever else is there:

    checkpoint-2/
    ├── adapter_config.json          the "default" adapter (or the only one), as peftlab.save_adapter
    ├── adapter_model.safetensors    writes it: peft.PeftModel.from_pretrained and
    │                                peftlab.load_adapter both read it
    ├── other/adapter_config.json    a second adapter "other", in a subfolder (as peft does)
    ├── trainer_state.json, optimizer.pt, ...   the Trainer's own files, untouched
    └── tokenizer.json, ...

Resuming is the other half. ``Trainer._load_from_checkpoint`` loads adapter files only into a
``peft.PeftModel`` (an ``isinstance`` test no other model can pass); for any other model it loads
a sharded checkpoint: ``model.safetensors.index.json`` names the tensors and their shard files,
and each shard goes through ``model.load_state_dict(shard, strict=False)``. So the folder also gets
that index, listing only the model's trainable and adapter tensors (under the model's own names)
and one small shard holding them, ``trainable.safetensors``: never the frozen base weights.

    ├── model.safetensors.index.json  {"weight_map": {"...q_proj.adapters.default.lora_A":
    └── trainable.safetensors                           "trainable.safetensors", ...}}

and a plain ``trainer.train(resume_from_checkpoint=...)`` restores the adapter (the Trainer
restores the optimizer, scheduler and RNG state beside it). transformers then logs that the base
weights were "missing" from the checkpoint: they were never meant to be in it, and the model keeps
its own. ``AutoModelForCausalLM.from_pretrained(folder)`` still sees ``adapter_config.json`` first
and loads base + adapter through peft. :func:`adapter_checkpoints` remains for what the index
cannot do (``load_best_model_at_end`` looks for full weights or a PeftModel):

    trainer = peftlab.adapter_checkpoints(Trainer(model, args, train_dataset=data))
    trainer.train()                                  # with load_best_model_at_end=True

References:
- peft's save_pretrained (subfolders for non-default adapters):
  https://huggingface.co/docs/peft/package_reference/peft_model#peft.PeftModel.save_pretrained
- transformers' Trainer checkpoints: https://huggingface.co/docs/transformers/main_classes/trainer
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.api import register_save_pretrained
from peftlab.errors import AdapterFileError, ConfigError
from peftlab.io import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, load_state, read_adapter_weights, save_adapter
from peftlab.state import records


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    selected_adapters: list[str] | None = None,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """Write ``model``'s adapters into ``save_directory`` in peft's format (the module docstring).

    Args:
        model: a model adapted with ``peftlab.adapt`` (reference or fused backend).
        save_directory: the folder; created if missing. Files other than the adapter's are kept.
        is_main_process: False on the other ranks of a distributed run: they write nothing.
        state_dict: what the Trainer gathered (FSDP, DeepSpeed); the adapter's own tensors are
            read from the model, so only None or the model's own state is accepted.
        selected_adapters: the adapters to write (default all), as in peft.
        push_to_hub: also upload the folder, with ``model.push_to_hub`` (``repo_id`` from kwargs,
            default the folder's name).
        **kwargs: transformers' other options (max_shard_size, safe_serialization, ...): an
            adapter is one small safetensors file, so they change nothing.
    """
    names = list(records(model))
    if not names:  # every adapter deleted since: the model is a plain model again
        type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                    state_dict=state_dict, push_to_hub=push_to_hub, **kwargs)
        return
    _check_state_dict(model, state_dict)
    chosen = names if selected_adapters is None else list(selected_adapters)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ConfigError(
            f"selected_adapters names {unknown}, which this model does not have. Expected some of: "
            f"{', '.join(names)}."
        )
    if not is_main_process:
        return
    folder = Path(save_directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".peftlab-") as scratch:
        for name in chosen:
            target = folder if name == "default" else folder / name
            written = save_adapter(model, Path(scratch) / name, adapter_name=name)
            _move_into(written, target)
        _move_into(_write_trainable_shard(model, Path(scratch) / ".resume"), folder)
    if push_to_hub:
        model.push_to_hub(kwargs.pop("repo_id", folder.resolve().name), token=kwargs.get("token"))


RESUME_INDEX = "model.safetensors.index.json"  # the name Trainer's sharded-checkpoint loader reads
RESUME_SHARD = "trainable.safetensors"


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict entries a run changes: every trainable parameter and every tensor of
    an adapter (its frozen buffers too), under the model's own names; the frozen base is left out."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().to("cpu", copy=True).contiguous()  # copies: tied tensors save apart
            for name, t in model.state_dict().items() if name in trainable or ".adapters." in name}


def _write_trainable_shard(model: nn.Module, scratch: Path) -> Path:
    """Write the index + shard that let ``Trainer`` resume (the module docstring) into ``scratch``."""
    from safetensors.torch import save_file

    scratch.mkdir()
    tensors = trainable_tensors(model)
    save_file(tensors, str(scratch / RESUME_SHARD), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, "written_by": "peftlab (trainable tensors only)"},
             "weight_map": {name: RESUME_SHARD for name in tensors}}
    (scratch / RESUME_INDEX).write_text(json.dumps(index, indent=2))
    return scratch


def _check_state_dict(model: nn.Module, state_dict: dict | None) -> None:
    """A gathered state dict (FSDP, DeepSpeed) holds other tensors than the model's own: refuse it
    rather than write the model's (possibly sharded, empty) parameters in its place."""
    if state_dict is None:
        return
    own = model.state_dict()
    if any(k not in own or own[k].data_ptr() != v.data_ptr() for k, v in state_dict.items()):
        raise ConfigError(
            "save_pretrained got a state_dict that is not this model's own tensors (an FSDP or "
            "DeepSpeed gather); peftlab writes the adapter from the model's parameters. Expected "
            "state_dict=None on one process; try peftlab.save_adapter(model, folder) after training, "
            "or backend='peft' for sharded training."
        )


def _move_into(written: Path, target: Path) -> None:
    """Move a saved adapter's files (and subfolders: X-LoRA's experts) into ``target``, each
    replacing its namesake; a file swap is one atomic rename."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in written.iterdir():
        dest = target / entry.name
        if entry.is_dir():
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(entry), str(dest))
        else:
            os.replace(entry, dest)


register_save_pretrained(save_pretrained)  # peftlab.api gives adapted models this writer


# --------------------------------------------------------------------------------------------
# Checkpoints back into the model
# --------------------------------------------------------------------------------------------
def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Copy the adapters a checkpoint holds into the same-named adapters of ``model``, in place.

    The inverse of :func:`save_pretrained`: "default" from the folder itself, another adapter from
    its subfolder. Every adapter of ``model`` must be found there (with the same method, layers and
    shapes); the optimizer and scheduler state are the Trainer's to restore.
    """
    folder = Path(checkpoint).expanduser()
    names = list(records(model))
    if not names:
        raise ConfigError(
            "This model has no peftlab adapter to load a checkpoint into. Expected a model from "
            "peftlab.adapt(...) with the same method and hyperparameters as the checkpoint's; try "
            "peftlab.load_adapter(base_model, checkpoint) to build it from the files."
        )
    for name in names:
        source = folder if name == "default" else folder / name
        if not (source / CONFIG_NAME).is_file():
            raise AdapterFileError(
                f"{folder} holds no adapter {name!r} (no {source / CONFIG_NAME}). Expected a folder written "
                "by model.save_pretrained (a Trainer checkpoint); check the path, or that the model was "
                "adapted the same way before training."
            )
        load_state(model, read_adapter_weights(source), name, f" (checkpoint {source})")
    return model


def holds_adapter(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved adapter (at its top or in a subfolder)."""
    path = Path(folder)
    if not path.is_dir():
        return False
    tops = [path] + [p for p in path.iterdir() if p.is_dir()]
    return any((p / WEIGHTS_NAME).is_file() or (p / LEGACY_WEIGHTS_NAME).is_file() for p in tops)


def adapter_checkpoints(trainer: Any) -> Any:
    """Make ``trainer`` (a ``transformers.Trainer`` or a TRL trainer) load a peftlab model's
    adapters from its checkpoints: ``train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end``. Returns the trainer.

    Only this trainer object changes: its two checkpoint loaders (``_load_from_checkpoint``,
    ``_load_best_model``) first try :func:`load_checkpoint` when the model carries peftlab
    adapters and the folder holds adapter files, and otherwise do what they did before.
    """
    load_from_checkpoint = trainer._load_from_checkpoint
    load_best_model = trainer._load_best_model

    def adapted_model(model: nn.Module | None) -> nn.Module:
        return trainer.accelerator.unwrap_model(model if model is not None else trainer.model)

    def load_from(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = adapted_model(model)
        if records(target) and holds_adapter(resume_from_checkpoint):
            load_checkpoint(target, resume_from_checkpoint)
            return
        load_from_checkpoint(resume_from_checkpoint, model)

    def load_best() -> None:
        best = trainer.state.best_model_checkpoint
        target = adapted_model(None)
        if best and records(target) and holds_adapter(best):
            load_checkpoint(target, best)
            return
        load_best_model()

    trainer._load_from_checkpoint = load_from
    trainer._load_best_model = load_best
    return trainer


__all__ = ["save_pretrained", "load_checkpoint", "adapter_checkpoints", "holds_adapter"]
