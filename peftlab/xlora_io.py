"""X-LoRA's experts on disk and in peft: the plumbing around peftlab/methods/xlora.py.

The method file holds the paper's equation, the config, the mixer and the router. What X-LoRA
needs from the layers above the methods lives here, registered as the method's hooks so that
``peftlab.adapt``, ``save_adapter`` and ``load_adapter`` reach it through the registry:

- ``prepare``: before the build, the experts go on the model - ``n_experts`` fresh LoRA adapters,
  or each saved adapter of ``experts={name: folder}`` loaded from its folder;
- ``write_folder`` / ``read_folder``: the whole adapter in peft's XLoraModel folder layout
  (router at the top, each expert in a numbered subfolder);
- ``peft_config_from_folder``: peft's XLoraConfig for such a folder, wherever it is now;
- :func:`to_peft_config`: save a reference X-LoRA's experts and return peft's config for them
  (with :func:`copy_router_to_peft`, a peft XLoraModel equal to the reference one).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torch import nn

from peftlab import inject
from peftlab.api import adapt
from peftlab.errors import AdapterFileError, ConfigError
from peftlab.io import (CONFIG_NAME, WEIGHTS_NAME, base_model_name, load_adapter, load_state, peft_config_for,
                        read_adapter_weights, save_adapter, write_reference)
from peftlab.methods import get_method, register_hooks
from peftlab.methods.xlora import (ROUTER_OPTIONS, XLoRAConfig, expert_names, fresh_expert_names, remove_router,
                                   router_of, turn_off_cache)
from peftlab.production.hf_peft import PREFIX, import_peft, reference_state_dict
from peftlab.production.xlora_bridge import copy_xlora_router, xlora_peft_config
from peftlab.state import Snapshot, active_name, records, state_of

copy_router_to_peft = copy_xlora_router  # the name lesson 11 and the tests use
ROUTER_KEY = "base_model.internal_xlora_classifier."  # peft's names for the router's tensors
PEFT_FIELDS = ("hidden_size", "use_trainable_adapters", *ROUTER_OPTIONS)  # read back from adapter_config.json


def prepare(model: nn.Module, config: XLoRAConfig, adapter_name: str) -> XLoRAConfig:
    """The method's prepare hook (peftlab.adapt runs it before the build): put the experts on
    the model - n fresh LoRA adapters, or each saved one from its folder - and return the config
    unchanged (the build names the experts from it); experts already on the model are checked there."""
    previous = active_name(model)
    if config.experts is None:
        for name in fresh_expert_names(config, adapter_name):
            # no heads of their own: a classifier head trains once, with the X-LoRA adapter
            adapt(model, "lora", adapter_name=name, r=config.r, alpha=config.alpha, targets=config.targets,
                  modules_to_save=())
    elif isinstance(config.experts, dict):
        for name, path in config.experts.items():
            load_adapter(model, path, adapter_name=name)
    if previous is not None:
        state_of(model).active = previous
    return config


def to_peft_config(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default"):
    """Save the experts to ``folder/0``, ``folder/1``, ... (peft's XLoraModel names its experts
    by position and needs them on disk) and return the equivalent ``peft.XLoraConfig``.
    (To save the whole X-LoRA adapter, router included, use ``peftlab.save_adapter``.)"""
    names = expert_names(model, adapter_name)
    paths = [str(save_adapter(model, Path(folder) / str(i), adapter_name=name)) for i, name in enumerate(names)]
    return xlora_peft_config(model, adapter_name, paths)


# --------------------------------------------------------------------------------------------
# On disk: peft's X-LoRA folder
# --------------------------------------------------------------------------------------------
def write_folder(model: nn.Module, folder: Path, adapter_name: str, final: Path) -> None:
    """Write one X-LoRA adapter into ``folder`` the way peft's XLoraModel reads it; ``final`` is
    where the folder ends up (peftlab.save_adapter writes it elsewhere, then renames it there):

        final/
        ├── adapter_config.json        peft's XLoraConfig: hidden_size, the router's options, and
        │                              adapters = {"0": "<final>/0", "1": "<final>/1", ...}
        ├── adapter_model.safetensors  the router (base_model.internal_xlora_classifier.layers.*)
        │                              and any trained head (base_model.model.<module>.weight)
        ├── 0/                         expert 0, the router's first column: a LoRA adapter folder
        └── 1/ ...

    peft names its experts "0", "1", ... and activates them by those keys, so the keys are
    positions, in router order; the file's metadata keeps peftlab's names for the experts.
    """
    from safetensors.torch import save_file

    names, recs = expert_names(model, adapter_name), records(model)
    experts = [peft_config_for(model, get_method(recs[n].method), recs[n].config, n) for n in names]  # fail early
    config = xlora_peft_config(model, adapter_name, [str(final / str(i)) for i in range(len(names))],
                         base_model_name_or_path=base_model_name(model), inference_mode=True)
    for i, (name, expert) in enumerate(zip(names, experts)):
        (folder / str(i)).mkdir()
        write_reference(model, folder / str(i), name, expert)
    router = {ROUTER_KEY + k: v for k, v in router_of(model, adapter_name).state_dict().items()}
    tensors = {**router, **reference_state_dict(model, adapter_name)}  # + the adapter's modules_to_save
    heads = recs[adapter_name].config.modules_to_save or ()
    metadata = {"format": "pt", "peftlab_experts": json.dumps(names), "peftlab_modules_to_save": json.dumps(heads)}
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, folder / WEIGHTS_NAME,
              metadata=metadata)
    auto_mapping = None if config.task_type else {"base_model_class": type(model).__name__,
                                                   "parent_library": type(model).__module__}
    config.save_pretrained(str(folder), auto_mapping_dict=auto_mapping)
    # peft sorts every key, and so would put expert "10" before "2": keep the router's order
    raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    raw["adapters"] = dict(config.adapters)
    (folder / CONFIG_NAME).write_text(json.dumps({k: raw[k] for k in sorted(raw)}, indent=2) + "\n", encoding="utf-8")


def read_folder(model: nn.Module, folder: Path, raw: dict, adapter_name: str = "default") -> nn.Module:
    """Load what :func:`write_folder` (or peft's XLoraModel) wrote into ``model``: each expert from
    its subfolder (else from the path adapter_config.json gives), then the router and any head.
    On any error the model is left as it was."""
    adapters = raw.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise AdapterFileError(
            f"{folder / CONFIG_NAME} lists no experts ('adapters' is {adapters!r}). Expected "
            "{'0': <folder of expert 0>, ...}, as peft's XLoraConfig saves it; save the X-LoRA adapter again.")
    metadata = _metadata(folder / WEIGHTS_NAME)
    names = json.loads(metadata.get("peftlab_experts", "null"))  # peftlab's names (a folder peft wrote has none)
    names = names or [f"{adapter_name}_expert{i}" for i in range(len(adapters))]
    experts = {}
    for name, (key, stored) in zip(names, adapters.items()):
        path = _expert_folder(folder, key, stored)
        if not (path / CONFIG_NAME).is_file():
            raise AdapterFileError(
                f"Expert {key!r} of the X-LoRA adapter in {folder} is neither in {folder / str(key)} nor in "
                f"{stored}. Expected each expert's LoRA adapter in a subfolder named by its key, as peftlab.save_adapter writes "
                "it; copy the whole folder, subfolders included.")
        experts[name] = str(path)
    taken = [n for n in (adapter_name, *names) if n in records(model)]
    if taken:
        raise ConfigError(
            f"The model already has adapters named {taken}, and loading this X-LoRA adapter adds adapters "
            f"{[adapter_name, *names]} (it and its experts). Expected new names; try another adapter_name, "
            "or a model without these adapters (peftlab.compose.delete_adapter).")
    state = read_adapter_weights(folder)
    router = {k[len(ROUTER_KEY):]: v for k, v in state.items() if k.startswith(ROUTER_KEY)}
    heads = {k: v for k, v in state.items() if not k.startswith(ROUTER_KEY)}
    if not router:
        raise AdapterFileError(
            f"{folder / WEIGHTS_NAME} holds no router tensors ({ROUTER_KEY}*). Expected the X-LoRA "
            "classifier's weights, as peftlab.save_adapter writes them (a folder from peft's own "
            "save_pretrained can lack them); save the X-LoRA model again.")
    saved_heads = json.loads(metadata.get("peftlab_modules_to_save", "null"))
    if saved_heads is None:  # written by peft: the heads are the modules the extra tensors belong to
        saved_heads = sorted({k.removeprefix(PREFIX).rsplit(".", 1)[0] for k in heads})
    options = {f: raw[f] for f in PEFT_FIELDS if f in raw}
    trained_on = raw.get("base_model_name_or_path")
    hint = f" The adapter was trained on {trained_on!r}." if trained_on else ""
    undo = Snapshot(model)
    try:
        adapt(model, "xlora", adapter_name=adapter_name, experts=experts,
              modules_to_save=inject.modules_to_save_paths(model, tuple(saved_heads)), **options)
        try:
            router_of(model, adapter_name).load_state_dict(router)
        except RuntimeError as err:  # missing, extra or misshapen tensors
            raise AdapterFileError(f"The router in {folder / WEIGHTS_NAME} does not fit adapter_config.json "
                                   f"(hidden_size, xlora_depth, experts, layers): {err}") from err
        load_state(model, heads, adapter_name, hint)
    except BaseException as err:
        for name in (adapter_name, *names):
            undo.restore(name)
        if adapter_name in getattr(getattr(model, "xlora_router", None), "adapters", {}):
            remove_router(model, adapter_name)
        if isinstance(err, ConfigError):
            raise AdapterFileError(f"The X-LoRA adapter in {folder} does not fit this model: {err}{hint} "
                                   "Expected the base model it was trained on; load that one.") from err
        raise
    return model


def peft_config_from_folder(model: nn.Module, folder: Path):
    """peft's XLoraConfig from a saved folder, each expert read from the folder's own subfolder
    (peft itself reads the absolute paths saved in it, which break when the folder moves); the
    model's key/value cache goes off, which peft's X-LoRA refuses."""
    turn_off_cache(model)
    config = import_peft().XLoraConfig.from_pretrained(str(folder))
    config.adapters = {k: str(_expert_folder(folder, k, v)) for k, v in config.adapters.items()}
    return config


def _expert_folder(folder: Path, key: str, stored: str) -> Path:
    """Expert ``key``'s folder: the saved folder's own subfolder, else the path stored with it."""
    here = folder / str(key)
    return here if (here / CONFIG_NAME).is_file() else Path(str(stored))


def _metadata(file: Path) -> dict[str, str]:
    if file.suffix != ".safetensors" or not file.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


register_hooks("xlora", prepare=prepare, write_folder=write_folder, read_folder=read_folder,
               peft_config_from_folder=peft_config_from_folder)
