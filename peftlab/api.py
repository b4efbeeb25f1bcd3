"""``peftlab.adapt`` and the whole-model operations around it.

``adapt(model, "lora", r=8)`` adds an adapter to a model and returns it ready to train: only the
adapter's parameters (and any ``modules_to_save``) require gradients. The ``backend`` picks the
implementation:

- ``"reference"``: peftlab's from-scratch modules (peftlab/methods/), edited into the model in
  place; the returned object is the same model, so ``model(...)`` and ``generate`` work as before.
- ``"peft"``: Hugging Face peft's implementation of the same method, same hyperparameters; the
  result is a ``peft.PeftModel``.
- ``"fused"``: the reference modules with peftlab's hand-written autograd kernels for LoRA and DoRA
  (plus Llama-style SwiGLU MLPs and RMSNorms, and a chunked fused cross-entropy in
  ``model(..., labels=...)``), peftlab/production/fused/.

With "reference" and "fused", the adapted model object also gets its own ``save_pretrained``: what
``Trainer.save_model``, its checkpoints, TRL and ``push_to_hub`` call then writes the adapter in
peft's format (adapter_config.json + adapter_model.safetensors, peftlab/io/hub.py) instead of the
whole model under the wrappers' names. That one attribute on the object is the only addition.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from peftlab import inject
from peftlab.errors import ConfigError, closest
from peftlab.methods import METHODS, Method, get_method, method_for, method_hook
from peftlab.methods.base import AdapterConfig
from peftlab.routing import enable_adapter_names
from peftlab.state import AdapterRecord, Snapshot, active_record, add_record, records  # noqa: F401 (public here too)

BACKENDS = ("reference", "peft", "fused")


def adapt(
    model: nn.Module,
    method: str = "lora",
    *,
    backend: str = "reference",
    adapter_name: str = "default",
    **hyperparameters,
) -> nn.Module:
    """Add a ``method`` adapter to ``model`` and freeze everything else.

    Args:
        model: a transformers model (or any nn.Module with linear layers).
        method: a registered method name, see ``peftlab.list_methods()``.
        backend: "reference" (peftlab's own modules), "peft" (Hugging Face peft) or "fused"
            (the reference modules run by fused kernels; lora and dora only).
        adapter_name: name of this adapter; several can live on one model.
        **hyperparameters: fields of the method's config, e.g. ``r=16, alpha=32, dropout=0.05,
            targets=("q_proj", "v_proj")`` or ``targets="all-linear"``.

    Returns:
        The adapted model: the same object for "reference" and "fused", a ``peft.PeftModel``
        for "peft".
    """
    spec = method_for(method, hyperparameters)  # "lora" with init="eva": the eva method
    config = make_config(spec, model, **hyperparameters)
    if backend == "fused":
        from peftlab.production import fused

        fused.check_fusable_method(spec.name)
        model = adapt(model, spec.name, backend="reference", adapter_name=adapter_name,
                      **hyperparameters)
        return fused.fuse(model)
    if backend == "reference":
        # a check that fails on the 3rd layer (rank too large for k_proj) must not leave the
        # first two wrapped: take everything this call added back out, then re-raise
        undo = Snapshot(model)
        try:
            prepare = method_hook(spec, "prepare")
            if prepare is not None:  # what the build needs first (X-LoRA's experts)
                config = prepare(model, config, adapter_name)
            spec.build(model, config, adapter_name)
        except BaseException:
            undo.restore(adapter_name)
            raise
        inject.wrap_modules_to_save(model, config.modules_to_save or (), adapter_name)
        inject.set_active(model, adapter_name)  # the new adapter is the one that runs and trains
        inject.freeze_all_but_adapters(model, adapter_name)
        add_record(model, adapter_name, spec.name, config)
        enable_adapter_names(model)  # model(..., adapter_names=[...]): one adapter per example
        give_save_pretrained(model)  # model.save_pretrained writes the adapter (Trainer, TRL, the Hub)
        return model
    if backend == "peft":
        from peftlab.production.hf_peft import adapt_with_peft

        check_peft_on_4bit(model, spec.name)

        return adapt_with_peft(model, spec, config, adapter_name)
    raise unknown_backend(backend)


# An adapted transformers model's ``save_pretrained`` (what Trainer.save_model, its checkpoints, TRL
# and push_to_hub call) writes the adapter in peft's format, not the whole model under the wrappers'
# names. The writer is peftlab/io/hub.py's: io sits above api, so it hands it down when imported
# (as xlora_io hands X-LoRA's hooks to the methods); the facade and peftlab.io import it.
_SAVE_PRETRAINED: dict[str, Callable] = {}


def register_save_pretrained(writer: Callable) -> None:
    """Set the function an adapted model's ``save_pretrained`` calls (peftlab.io.hub's)."""
    _SAVE_PRETRAINED["writer"] = writer


def give_save_pretrained(model: nn.Module) -> None:
    """Give this model object (not its class) a ``save_pretrained`` that writes its adapters in
    peft's format; a model without a ``save_pretrained`` of its own (a plain nn.Module) is left alone."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = SaveAdapters(model)


class SaveAdapters:
    """An adapted model's ``save_pretrained``: its adapters in peft's format. An object rather
    than a bound method, so that a deepcopy or a pickle of the model carries one that saves the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, **kwargs) -> None:
        writer = _SAVE_PRETRAINED.get("writer")
        if writer is None:
            raise ConfigError(
                "model.save_pretrained of a peftlab model writes its adapter with peftlab.io.hub, which has "
                "not been imported. Expected it imported; try `import peftlab.io`, or peftlab.save_adapter."
            )
        writer(self.model, save_directory, **kwargs)


def unknown_backend(backend: str) -> ConfigError:
    """The error for a ``backend`` that is not one of :data:`BACKENDS`."""
    return ConfigError(
        f"Unknown backend {backend!r}.{closest(str(backend), BACKENDS)} Expected one of: "
        f"{', '.join(BACKENDS)}."
    )


# peft methods that build their update from the base weight's stored shape: on a 4-bit base that
# is the packed uint8 tensor, so peft 0.21 fails later with a bare shape error.
PEFT_FAILS_ON_4BIT = ("loha", "lokr")


def check_peft_on_4bit(model: nn.Module, method: str) -> None:
    """Refuse, with a clear message, a peft method that cannot run on a 4-bit (NF4) base."""
    if method in PEFT_FAILS_ON_4BIT and any(inject.is_quantized(p) for p in model.parameters()):
        raise ConfigError(
            f"peft's {method} cannot run on a 4-bit (NF4) base: peft reads the packed 4-bit "
            "weight's shape and fails with a shape error. Expected a full-precision base for "
            f"method={method!r} with backend='peft'. Try backend='reference' (peftlab's {method} "
            "works on NF4), method='lora' (QLoRA), or load the model without quantization."
        )


# peft's (and the papers') names for peftlab's fields: too far apart for a fuzzy match
PEFT_ALIASES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
                "alpha_pattern": None, "init_lora_weights": "init"}


def make_config(spec: Method, model: nn.Module | None = None, **hyperparameters) -> AdapterConfig:
    """The method's config from keyword arguments, with targets and modules_to_save resolved for
    ``model``. Unknown keywords are an error that lists the ones the method takes."""
    accepted = spec.config.field_names()
    for key in hyperparameters:
        if key not in accepted:
            alias = PEFT_ALIASES.get(key)
            hint = (f" Did you mean {alias!r}? (peft's name is {key!r}.)" if alias in accepted
                    else closest(key, accepted))
            raise ConfigError(
                f"Method {spec.name!r} does not take the hyperparameter {key!r}.{hint} "
                f"Expected some of: {', '.join(accepted)}."
            )
    targets = hyperparameters.get("targets")
    if isinstance(targets, (list, set)):
        hyperparameters["targets"] = tuple(targets)
    if isinstance(hyperparameters.get("modules_to_save"), (list, set)):
        hyperparameters["modules_to_save"] = tuple(hyperparameters["modules_to_save"])
    config = spec.config(**hyperparameters)
    if model is None:
        return config
    if config.targets is None:  # with only target_parameters given, no module is a target (as in peft)
        targets = () if getattr(config, "target_parameters", None) else spec.targets_for(model)
        config = dataclasses.replace(config, targets=targets)
    entries = inject.default_modules_to_save(model) if config.modules_to_save is None else config.modules_to_save
    config = dataclasses.replace(config, modules_to_save=inject.modules_to_save_paths(model, entries))
    if spec.resolve is not None:  # model-dependent defaults and early checks (IA3, LLaMA-Adapter)
        config = spec.resolve(model, config)
    return config


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights; outputs stay the same."""
    if _is_peft(model):
        model.merge_adapter()
        return model
    return inject.merge(model)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`."""
    if _is_peft(model):
        model.unmerge_adapter()
        return model
    return inject.unmerge(model)


def set_disabled(model: nn.Module, disabled: bool = True) -> None:
    """Turn the adapters off (the model is then exactly the base model) or back on."""
    if _is_peft(model):
        (model.base_model.disable_adapter_layers if disabled else model.base_model.enable_adapter_layers)()
        return
    inject.set_disabled(model, disabled)


def _is_peft(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def delta_weights(model: nn.Module, adapter_name: str | None = None) -> dict[str, "object"]:
    """{layer name: ΔW} for every adapted layer of a reference-backend model."""
    return {
        name: layer.delta_weight(adapter_name)
        for name, layer in inject.adapted_layers(model).items()
        if layer.adapters[adapter_name or layer.active[0]].mergeable
    }


__all__ = [
    "adapt",
    "make_config",
    "merge",
    "unmerge",
    "set_disabled",
    "delta_weights",
    "records",
    "active_record",
    "METHODS",
]
