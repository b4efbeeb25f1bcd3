"""Adapters on disk, in Hugging Face peft's format, written atomically.

A saved adapter is a folder of two files, exactly as ``peft.PeftModel.save_pretrained`` writes
them, so an adapter trained with peftlab loads in peft (and on the Hub) and the reverse:

    my-adapter/
    ├── adapter_config.json         peft's config fields: peft_type, task_type, r, lora_alpha,
    │                               target_modules, modules_to_save, base_model_name_or_path, ...
    └── adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, d_in)
                                    base_model.model.<module path>.lora_B.weight   (d_out, r)
                                    base_model.model.classifier.weight             (modules_to_save)

The adapter's *name* ("default", "other", ...) is not part of the keys: one folder holds one
adapter, and the name is chosen again when loading.

Methods peft lacks (BitFit, bottleneck adapters) are saved the same way, in a PEFT-like format:
the same two files, keys under ``base_model.model.``, and an adapter_config.json whose
``peft_type`` is ``PEFTLAB_<METHOD>`` (e.g. ``PEFTLAB_BITFIT``) with peftlab's own config fields;
peft cannot load those, peftlab's reference backend can.

An X-LoRA adapter is saved as peft's XLoraModel reads it: adapter_config.json (peft_type XLORA,
``adapters`` = {"0": <folder>/0, ...}), the router in adapter_model.safetensors, and each LoRA
expert in its own subfolder 0/, 1/, ... (peftlab/xlora_io.py, registered as the method's write_folder hook).

Writes are atomic. Both files go into a temporary folder next to the destination, are flushed to
disk (fsync), and only then is the folder swapped into place with one rename; so a crash, a full
disk or a SIGKILL at any moment leaves either the old complete adapter or the new complete one,
never a mix. :func:`atomic_dir` does this for any folder (training checkpoints, model caches);
it and the readers of a saved folder live in peftlab/io/files.py.

References:
- peft's save format: https://huggingface.co/docs/peft/developer_guides/checkpoint
- safetensors: https://huggingface.co/docs/safetensors
- rename(2) is atomic within one file system; renameat2(2) with RENAME_EXCHANGE swaps two
  existing paths in one step: https://man7.org/linux/man-pages/man2/rename.2.html
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from peftlab.errors import AdapterFileError, ConfigError
from peftlab.inject import is_conv1d, modules_to_save_paths
from peftlab.state import Snapshot, active_record, records

from peftlab.io.files import (CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, adapter_folder,  # noqa: F401
                              atomic_dir, read_adapter_config, read_adapter_weights)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter of ``model`` to the folder ``path`` in peft's format, atomically.

    Args:
        model: a model adapted with ``peftlab.adapt`` (either backend) or a ``peft.PeftModel``.
        path: the folder to write; created if missing, replaced as a whole if it exists.
        adapter_name: which adapter to save when the model has several; default the active one.

    Returns:
        The folder's path. ``peft.PeftModel.from_pretrained(base, path)`` and
        :func:`load_adapter` both read it.
    """
    _check_replaceable(Path(path))
    if _is_peft(model):
        name = adapter_name or model.active_adapter
        if name not in model.peft_config:
            raise ConfigError(
                f"The model has no adapter named {name!r}. Expected one of: "
                f"{', '.join(model.peft_config)}. Try adapter_name={next(iter(model.peft_config))!r}."
            )
        with atomic_dir(path) as tmp:
            _write_peft(model, tmp, name)
    else:
        name, spec, config = _reference_adapter(model, adapter_name)
        from peftlab.methods import method_hook

        write_folder = method_hook(spec, "write_folder")
        if write_folder is not None:  # a layout of the method's own (X-LoRA: experts in subfolders)
            with atomic_dir(path) as tmp:
                write_folder(model, tmp, name, Path(path).expanduser().resolve())
            return Path(path)
        peft_config = peft_config_for(model, spec, config, name)  # fails early, before any write
        with atomic_dir(path) as tmp:
            write_reference(model, tmp, name, peft_config)
    return Path(path)


_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, "README.md"}


def _saved_subfolders(folder: Path) -> set[str]:
    """Names of the subfolders a saved adapter lists as its own ("adapters": {key: folder}, each
    holding only adapter files: X-LoRA's experts); none for other folders."""
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    adapters = raw.get("adapters") if isinstance(raw, dict) else None
    if not isinstance(adapters, dict):
        return set()
    return {str(k) for k in adapters if (folder / str(k)).is_dir() and not (folder / str(k)).is_symlink()
            and all(p.name in _ADAPTER_FILES for p in (folder / str(k)).iterdir())}


def _check_replaceable(folder: Path) -> None:
    """The save replaces the folder as a whole: refuse a folder that holds anything else."""
    if folder.is_dir():
        experts = _saved_subfolders(folder)  # a saved X-LoRA adapter keeps its experts in subfolders
        others = sorted(p.name for p in folder.iterdir() if p.name not in _ADAPTER_FILES | experts)
        if others:
            raise AdapterFileError(
                f"{folder} already exists and holds other things than an adapter ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); saving would replace the whole folder. Expected "
                "a new folder or one holding a saved adapter. Try a subfolder, e.g. "
                f"{str(folder / 'my-adapter')!r}."
            )


def _reference_adapter(model: nn.Module, adapter_name: str | None):
    from peftlab.methods import get_method

    if adapter_name is None:
        name, record = active_record(model)
    else:
        recs = records(model)
        if adapter_name not in recs:
            raise ConfigError(
                f"The model has no adapter named {adapter_name!r}. Expected one of: "
                f"{', '.join(recs) or '(none)'}. Try one of these, or peftlab.adapt(...) first."
            )
        name, record = adapter_name, recs[adapter_name]
    spec = get_method(record.method)  # methods peft lacks are written in peftlab's PEFT-like format
    return name, spec, record.config


def base_model_name(model: nn.Module) -> str | None:
    """The base model's hub id or folder, as transformers remembers it (None when built from a config)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def peft_config_for(model: nn.Module, spec, config, adapter_name: str):
    """The peft config that describes this reference adapter exactly: targets as full module
    paths (so peft adapts the very same layers), plus the fields peft fills in when saving."""
    from peftlab.inject import adapted_layers
    from peftlab.production.hf_peft import soft_prompt_geometry, takes_fan_in_fan_out, task_type, to_peft_config

    layers = {n: m for n, m in adapted_layers(model).items()
              if adapter_name in m.adapters and not m.adapters[adapter_name].rides_along}
    if layers:
        config = dataclasses.replace(config, targets=tuple(layers))
    extra: dict = {"base_model_name_or_path": base_model_name(model), "inference_mode": True}
    if task_type(model):
        extra["task_type"] = task_type(model)
    if spec.peft_type is None:  # peft lacks the method: peftlab's own fields, under a peftlab type
        return {"peft_type": PEFTLAB_TYPE_PREFIX + spec.name.upper(), **extra, **_json_fields(config)}
    if any(is_conv1d(m.base_layer) for m in layers.values()) and takes_fan_in_fan_out(spec):
        extra["fan_in_fan_out"] = True  # GPT-2's Conv1D stores W transposed; peft wants to be told
    if spec.family == "soft prompt":  # dimensions peft cannot read from this model's config
        extra.update(soft_prompt_geometry(spec, model, for_peft_model=False))
    return to_peft_config(spec, config, None, **extra)


PEFTLAB_TYPE_PREFIX = "PEFTLAB_"  # peft_type of adapters whose method peft lacks: PEFTLAB_BITFIT


def _json_fields(config) -> dict:
    """A peftlab config's fields as JSON values (tuples become lists)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _peftlab_config(raw: dict, folder: Path):
    """(method, config) from a PEFTLAB_<METHOD> adapter_config.json (lists back to tuples)."""
    from peftlab.methods import METHODS

    method = str(raw["peft_type"])[len(PEFTLAB_TYPE_PREFIX):].lower()
    if method not in METHODS:
        raise AdapterFileError(
            f"{folder / CONFIG_NAME} names the peftlab method {method!r}, which this peftlab does not "
            f"have. Expected one of: {', '.join(m for m, s in METHODS.items() if s.peft_type is None)}."
        )
    spec = METHODS[method]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in spec.config.field_names()}
    try:
        return method, spec.config(**kwargs)
    except (TypeError, ConfigError) as err:
        raise AdapterFileError(f"{folder / CONFIG_NAME} has an invalid field: {err}") from err


def write_reference(model: nn.Module, folder: Path, adapter_name: str, peft_config) -> None:
    """Write one reference adapter into ``folder``: adapter_config.json and its tensors."""
    from safetensors.torch import save_file

    from peftlab.production.hf_peft import reference_state_dict

    # safetensors refuses tensors that share memory, and wants them contiguous and on the CPU
    tensors = reference_state_dict(model, adapter_name)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    if isinstance(peft_config, dict):  # a method peft lacks: peftlab's PEFT-like config
        (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    auto_mapping = None
    if peft_config.task_type is None:  # what peft records so AutoPeftModel can rebuild the base
        auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    peft_config.save_pretrained(str(folder), auto_mapping_dict=auto_mapping)


def _write_peft(model: nn.Module, folder: Path, adapter_name: str) -> None:
    """peft's own writer; it puts a non-default adapter in a subfolder, so lift its files up."""
    scratch = folder / "_peft"
    model.save_pretrained(str(scratch), selected_adapters=[adapter_name])
    source = scratch / adapter_name if adapter_name != "default" else scratch
    for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        if (source / name).exists():
            os.replace(source / name, folder / name)
        elif (scratch / name).exists():
            os.replace(scratch / name, folder / name)
    shutil.rmtree(scratch)


def _is_peft(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def _peft_type(raw: dict) -> str:
    """adapter_config.json's peft_type without an enum prefix: "LORA", "XLORA", "PEFTLAB_BITFIT"."""
    return str(raw.get("peft_type", "")).split(".")[-1].upper()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
# Fields of a peft LoraConfig whose non-default values change what the adapter computes in ways
# peftlab's reference LoRA does not reproduce: loading such a file must fail, not drift silently.
_LORA_FEATURES_NOT_IN_REFERENCE = {
    "use_dora": (False, "DoRA (use_dora=true)"),
    "layers_to_transform": (None, "a subset of layers (layers_to_transform)"),
    "exclude_modules": (None, "excluded modules (exclude_modules)"),
    "bias": ("none", "trained biases (bias)"),
    "lora_bias": (False, "a bias on lora_B (lora_bias=true)"),
    "use_qalora": (False, "QA-LoRA (use_qalora=true)"),
    "layer_replication": (None, "layer replication"),
    "trainable_token_indices": (None, "trainable tokens (trainable_token_indices)"),
    "target_parameters": (None, "parameter targets (target_parameters)"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
}


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    backend: str = "reference",
) -> nn.Module:
    """Apply a saved adapter (written by peftlab or by peft) to ``model``.

    Args:
        model: the base model the adapter was trained on (or a model already carrying adapters:
            the loaded one is added under ``adapter_name`` and becomes active).
        path: a folder holding adapter_config.json and adapter_model.safetensors.
        adapter_name: the name the loaded adapter gets.
        backend: "reference" (peftlab's modules; the same model object comes back) or "peft"
            (``peft.PeftModel.from_pretrained``; a PeftModel comes back).

    Returns:
        The adapted model, its adapter trainable (as after ``peftlab.adapt``).

    Raises:
        AdapterFileError: missing or corrupt files, a method or option peftlab lacks, or an
            adapter trained on a base model with other layers or shapes. On any error the model
            is left as it was.
    """
    folder = adapter_folder(path)
    raw_config = read_adapter_config(folder)
    if str(raw_config["peft_type"]).startswith(PEFTLAB_TYPE_PREFIX) and (backend == "peft" or _is_peft(model)):
        raise AdapterFileError(
            f"{folder} holds a {raw_config['peft_type']} adapter, a method peft does not have, so peft "
            "cannot load it. Expected backend='reference' on a plain transformers model; try "
            "peftlab.load_adapter(model, path)."
        )
    if backend == "peft" or _is_peft(model):  # a PeftModel takes further adapters through peft
        return _load_with_peft(model, folder, adapter_name)
    if backend != "reference":
        raise ConfigError(f"Unknown backend {backend!r}. Expected 'reference' or 'peft'.")
    read_folder = folder_hook(raw_config, "read_folder")
    if read_folder is not None:  # a layout of the method's own (X-LoRA: a router file, a subfolder per expert)
        return read_folder(model, folder, raw_config, adapter_name)
    method, config = saved_config(raw_config, folder)
    state = read_adapter_weights(folder)
    from peftlab.methods import get_method

    as_saved = get_method(method).as_saved
    if as_saved is not None:
        config = as_saved(config, state)
    hyperparameters = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    hyperparameters["modules_to_save"] = modules_to_save_paths(model, _heads_peft_trains(raw_config, config, state))
    trained_on = raw_config.get("base_model_name_or_path")
    hint = f" The adapter was trained on {trained_on!r}." if trained_on else ""

    from peftlab.api import adapt

    if adapter_name in records(model):
        raise ConfigError(
            f"The model already has an adapter named {adapter_name!r}. Expected a new name; try "
            f"load_adapter(model, path, adapter_name='other')."
        )
    undo = Snapshot(model)
    try:
        adapt(model, method, adapter_name=adapter_name, **hyperparameters)
        # name the method the config claims: a config from another method is a common mix-up
        load_state(model, state, adapter_name, f" {CONFIG_NAME} says the method is {method!r}.{hint}")
    except ConfigError as err:
        undo.restore(adapter_name)
        raise AdapterFileError(
            f"The adapter in {folder} does not fit this model: {err}{hint} Expected the base model "
            "it was trained on; load that one."
        ) from err
    except BaseException:
        undo.restore(adapter_name)
        raise
    return model


def _heads_peft_trains(raw: dict, config, state: dict) -> tuple[str, ...]:
    """The modules_to_save of a saved adapter, with the head a peft SEQ_CLS model always trains:
    peft adds "classifier" / "score" even when the saved list is empty, as its prompt methods
    save it (adapter_config.json: modules_to_save null, the head's tensors in the file). Taken
    only when the file holds that head's tensors (an X-LoRA expert's folder holds none)."""
    entries = tuple(config.modules_to_save or ())
    if raw.get("task_type") == "SEQ_CLS":
        entries += tuple(e for e in ("classifier", "score")
                         if e not in entries and any(f".{e}." in key for key in state))
    return entries


def saved_config(raw: dict, folder: Path):
    """(method, config) of a saved adapter_config.json, refusing options the reference lacks."""
    from peftlab.production.hf_peft import from_peft_config

    if str(raw.get("peft_type")).startswith(PEFTLAB_TYPE_PREFIX):  # a method peft lacks
        return _peftlab_config(raw, folder)
    try:
        method, config = from_peft_config(raw)
    except ConfigError as err:
        raise AdapterFileError(
            f"{folder / CONFIG_NAME} describes an adapter peftlab cannot rebuild: {err} "
            "Try load_adapter(..., backend='peft') to load it with peft itself."
        ) from err
    except TypeError as err:  # a field of the right name with a value of the wrong type
        raise AdapterFileError(f"{folder / CONFIG_NAME} has an invalid field: {err}.") from err
    if str(raw.get("peft_type")).split(".")[-1].upper() == "LORA":  # lora and its variants (dora)
        from peftlab.methods import get_method
        from peftlab.production import hf_peft

        handled = getattr(hf_peft, "_PEFT_MARKERS", {}).get(method, {})  # e.g. dora: use_dora=True
        implemented = set(get_method(method).config.field_names())  # e.g. lora's trainable_token_indices
        for key, (default, what) in _LORA_FEATURES_NOT_IN_REFERENCE.items():
            if key in handled or key in implemented:
                continue
            value = raw.get(key, default)
            if value != default and (value or default):  # {} vs None etc. both mean "off"
                raise AdapterFileError(
                    f"{folder / CONFIG_NAME} uses {what} = {value!r}, which peftlab's reference "
                    f"{method} does not implement, so it would compute something else. Expected a "
                    "LoRA adapter without it. Try load_adapter(..., backend='peft')."
                )
    return method, config


def load_state(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, hint: str) -> None:
    """Copy a file's tensors (peft's on-disk names) into ``adapter_name`` of an adapted model;
    ``hint`` ends the error when the file does not fit (which method the config says, say)."""
    from peftlab.production.hf_peft import (PREFIX, load_reference_state_dict, reference_to_peft_names,
                                            saved_name, shared_tensors, state_from_file)

    state = state_from_file(model, adapter_name, state)  # a file's own form (VB-LoRA's top-k) -> tensors

    expected = {saved_name(n, adapter_name) for n in reference_to_peft_names(model, adapter_name).values()}
    # tensors all layers share (VeRA's random A, B, when saved) belong to the adapter too
    expected |= {saved_name(n, adapter_name) for n in shared_tensors(model, adapter_name, on_disk=True)}
    params = dict(model.named_parameters(remove_duplicate=False))
    base_weights = {}  # full base tensors peft saves beside the adapter when embeddings were resized
    for key in sorted(set(state) - expected):
        ours = key.removeprefix(PREFIX)
        if key.startswith(PREFIX) and ours in params and params[ours].shape == state[key].shape:
            base_weights[ours] = state[key]
            continue
        raise AdapterFileError(
            f"The adapter file holds a tensor this model's adapter has no place for: {key!r}.{hint} "
            "Expected exactly the tensors of the adapter's target layers; the file comes from a "
            "different method or base model. Check adapter_config.json, or load it with backend='peft'."
        )
    try:
        load_reference_state_dict(model, state, adapter_name)
    except AdapterFileError as err:
        raise AdapterFileError(f"{err}{hint}") from err
    with torch.no_grad():
        for ours, tensor in base_weights.items():
            params[ours].copy_(tensor.to(params[ours].dtype))


def folder_hook(raw_config: dict, hook: str):
    """The ``hook`` (Method.hooks) of the method an adapter_config.json names, if it has one."""
    from peftlab.methods import METHODS, method_hook

    peft_type = _peft_type(raw_config)
    spec = next((m for m in METHODS.values() if peft_type and m.peft_type == peft_type), None)
    return None if spec is None else method_hook(spec, hook)


def _load_with_peft(model: nn.Module, folder: Path, adapter_name: str) -> nn.Module:
    from peftlab.production.hf_peft import import_peft

    peft = import_peft()
    # peft refuses is_trainable=True for soft prompts (prompt tuning, prefix tuning, P-tuning): the
    # file holds the prompt an encoder computed, not the encoder. It loads that prompt as a plain
    # table, which can train on: it is made trainable below, as the reference backend does.
    prompt_learning = peft.PeftConfig.from_pretrained(str(folder)).is_prompt_learning
    config = None
    from_folder = folder_hook(read_adapter_config(folder), "peft_config_from_folder")
    if from_folder is not None and not _is_peft(model):
        config = from_folder(model, folder)  # X-LoRA: experts from the subfolders, wherever the folder is now
    if _is_peft(model):
        model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=not prompt_learning)
        model.set_adapter(adapter_name)
    else:
        model = peft.PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                               is_trainable=not prompt_learning, config=config)
    if prompt_learning:
        model.prompt_encoder[adapter_name].requires_grad_(True)
    return model


# an adapted model's save_pretrained (Trainer, TRL, push_to_hub) writes through save_adapter:
# peftlab.io.hub hands that writer to peftlab.api when imported
from peftlab.io import hub  # noqa: E402,F401
