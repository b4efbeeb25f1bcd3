"""The Hugging Face peft production path and the weight bridge between it and peftlab.

Two translations live here, for every method peft has:

- configs: a peftlab config <-> a peft config (``to_peft_config`` / ``from_peft_config``);
- weights: a peftlab parameter name <-> the name peft gives the same tensor, so that one set of
  adapter weights can be copied either way and both implementations run with it.

Name mapping, e.g. for LoRA on ``model.layers.0.self_attn.q_proj`` with adapter "default":

    peftlab (in memory)  model.layers.0.self_attn.q_proj.adapters.default.lora_A
    peft    (in memory)  base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    peft    (on disk)    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

peft is imported inside the functions, so ``import peftlab`` stays light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, TrainableCopy, find_targets
from peftlab.methods import Method, get_method
from peftlab.methods.base import AdapterConfig

PREFIX = "base_model.model."

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
# peftlab field -> peft field, per method; fields not listed keep their name.
_RENAMES: dict[str, dict[str, str]] = {
    "lora": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "loftq": "loftq"}
_PEFT_TO_INIT = {True: "kaiming", "gaussian": "gaussian", "loftq": "loftq"}


def task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model, from its class name."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def to_peft_config(spec: Method, config: AdapterConfig, model: nn.Module | None = None, **extra):
    """The peft config equivalent to a peftlab ``config`` (targets resolved to exact names when
    a model is given, so both paths adapt exactly the same layers)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if spec.peft_type is None:
        raise ConfigError(
            f"peft has no {spec.name!r} method, so there is no peft backend for it. Expected a "
            "method peft implements; try backend='reference'."
        )
    renames = _RENAMES.get(spec.name, {})
    kwargs = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "targets":
            if model is not None:
                value = find_targets(model, value, exclude=config.modules_to_save or ())
            kwargs["target_modules"] = value if isinstance(value, str) else list(value)
        elif field.name == "modules_to_save":
            kwargs["modules_to_save"] = list(value) if value else None
        elif field.name == "init":
            kwargs[renames["init"]] = _INIT_TO_PEFT[value]
        else:
            kwargs[renames.get(field.name, field.name)] = value
    if model is not None and task_type(model):
        kwargs["task_type"] = task_type(model)
    kwargs.update(extra)
    return PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type](**kwargs)


def from_peft_config(peft_config) -> tuple[str, AdapterConfig]:
    """(peftlab method name, peftlab config) for a peft config object or its dict."""
    as_dict = peft_config if isinstance(peft_config, dict) else peft_config.to_dict()
    peft_type = str(as_dict.get("peft_type", "")).split(".")[-1].upper()
    method_name = next((n for n, m in _methods().items() if m.peft_type == peft_type), None)
    if method_name is None:
        raise ConfigError(
            f"peft adapter type {peft_type!r} has no peftlab reference implementation yet. "
            f"Expected one of: {', '.join(m.peft_type for m in _methods().values() if m.peft_type)}."
        )
    spec = get_method(method_name)
    inverse = {v: k for k, v in _RENAMES.get(method_name, {}).items()}
    kwargs = {}
    for key, value in as_dict.items():
        ours = inverse.get(key, key)
        if key == "target_modules":
            ours, value = "targets", value if isinstance(value, str) else tuple(sorted(value))
        if key == "modules_to_save":
            value = tuple(value) if value else ()
        if ours == "init":
            value = _PEFT_TO_INIT.get(value, "kaiming")
        if ours in spec.config.field_names():
            kwargs[ours] = value
    return method_name, spec.config(**kwargs)


def _methods() -> dict[str, Method]:
    from peftlab.methods import METHODS

    return METHODS


def adapt_with_peft(model: nn.Module, spec: Method, config: AdapterConfig, adapter_name: str):
    """``peft.get_peft_model`` with the peft config equivalent to ``config``."""
    import peft

    return peft.get_peft_model(model, to_peft_config(spec, config, model), adapter_name=adapter_name)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def _lora_names(adapter: nn.Module) -> dict[str, str]:
    if getattr(adapter, "is_embedding", False):
        return {"lora_A": "lora_embedding_A.{name}", "lora_B": "lora_embedding_B.{name}"}
    return {"lora_A": "lora_A.{name}.weight", "lora_B": "lora_B.{name}.weight"}


# method -> (adapter module -> {peftlab parameter name: peft name template})
PARAM_NAMES: dict[str, Callable[[nn.Module], dict[str, str]]] = {"lora": _lora_names}


def reference_to_peft_names(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """{peftlab parameter name: peft in-memory parameter name} for one adapter of a reference
    model (adapter parameters and trainable copies)."""
    from peftlab.api import records

    method = records(model)[adapter_name].method
    mapping = {}
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
            adapter = module.adapters[adapter_name]
            for ours, template in PARAM_NAMES[method](adapter).items():
                mapping[f"{path}.adapters.{adapter_name}.{ours}"] = (
                    PREFIX + path + "." + template.format(name=adapter_name)
                )
        elif isinstance(module, TrainableCopy) and adapter_name in module.copies:
            for pname, _ in module.copies[adapter_name].named_parameters():
                mapping[f"{path}.copies.{adapter_name}.{pname}"] = (
                    f"{PREFIX}{path}.modules_to_save.{adapter_name}.{pname}"
                )
    return mapping


def saved_name(peft_name: str, adapter_name: str = "default") -> str:
    """peft's on-disk key for an in-memory parameter name: the adapter name is dropped."""
    return (
        peft_name.replace(f".modules_to_save.{adapter_name}.", ".")
        .replace(f".{adapter_name}.", ".")
        .removesuffix(f".{adapter_name}")
    )


def reference_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under peft's on-disk names, ready for adapter_model.safetensors."""
    params = dict(model.named_parameters())
    return {
        saved_name(theirs, adapter_name): params[ours].detach()
        for ours, theirs in reference_to_peft_names(model, adapter_name).items()
    }


@torch.no_grad()
def load_reference_state_dict(
    model: nn.Module, state: dict[str, Tensor], adapter_name: str = "default"
) -> None:
    """Copy tensors stored under peft's on-disk names into a reference model's adapter."""
    from peftlab.errors import AdapterFileError

    params = dict(model.named_parameters())
    names = reference_to_peft_names(model, adapter_name)
    missing = [saved_name(t, adapter_name) for t in names.values() if saved_name(t, adapter_name) not in state]
    if missing:
        raise AdapterFileError(
            f"The adapter file lacks {len(missing)} tensor(s) this model needs, first {missing[0]!r}. "
            "Expected an adapter trained with the same method and targets on this base model; "
            "check the base model and the adapter_config.json targets."
        )
    for ours, theirs in names.items():
        tensor = state[saved_name(theirs, adapter_name)]
        if tensor.shape != params[ours].shape:
            layer = ours.split(".adapters.")[0].split(".copies.")[0]
            raise AdapterFileError(
                f"The adapter does not fit this base model: layer {layer!r} expects {ours.rsplit('.', 1)[-1]} "
                f"of shape {tuple(params[ours].shape)} but the file has {tuple(tensor.shape)}. "
                "Expected an adapter trained on a base with the same layer shapes; load the base "
                "model it was trained on."
            )
        params[ours].copy_(tensor.to(params[ours].dtype))


@torch.no_grad()
def copy_reference_to_peft(reference: nn.Module, peft_model: nn.Module, adapter_name: str = "default") -> None:
    """Give a peft model exactly the reference model's adapter weights."""
    theirs = dict(peft_model.named_parameters())
    for ours, name in reference_to_peft_names(reference, adapter_name).items():
        theirs[name].copy_(reference.get_parameter(ours))


@torch.no_grad()
def copy_peft_to_reference(peft_model: nn.Module, reference: nn.Module, adapter_name: str = "default") -> None:
    """Give a reference model exactly the peft model's adapter weights."""
    theirs = dict(peft_model.named_parameters())
    for ours, name in reference_to_peft_names(reference, adapter_name).items():
        reference.get_parameter(ours).copy_(theirs[name])
