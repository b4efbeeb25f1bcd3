"""The Hugging Face peft production path: a peftlab config <-> a peft config
(``to_peft_config`` / ``from_peft_config``), for every method peft has, and ``adapt_with_peft``.

The weight bridge (a peftlab parameter name <-> peft's, copying adapter weights either way) is
``peft_weights.py``; its public names are re-exported here, where callers have always found them.

peft is imported inside the functions, so ``import peftlab`` stays light.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
from torch import nn

from peftlab.errors import ConfigError
from peftlab.inject import find_targets, is_conv1d
from peftlab.production.prompt_geometry import soft_prompt_geometry  # noqa: F401 (io imports it from here)
from peftlab.methods import Method, get_method
from peftlab.methods.base import AdapterConfig
from peftlab.methods.lora_init import changes_base, init_family
from peftlab.production.peft_weights import (  # noqa: F401 (re-exported: callers import them from here)
    PREFIX, PARAM_NAMES, PROMPT_LEARNING, SHARED_TENSORS, FILE_FORMS, state_to_file, state_from_file,
    shared_tensors, reference_to_peft_names, saved_name, reference_state_dict, load_reference_state_dict,
    copy_reference_to_peft, copy_peft_to_reference)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
# peftlab field -> peft field, per method; fields not listed keep their name; None: a peftlab
# field peft has no counterpart for (left out of the peft config).
_RENAMES: dict[str, dict[str, str | None]] = {
    "lora": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
    "oft": {"block_size": "oft_block_size", "dropout": "module_dropout"},
    "boft": {"block_size": "boft_block_size", "block_num": "boft_block_num",
             "n_butterfly_factor": "boft_n_butterfly_factor", "dropout": "boft_dropout"},
    "dora": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
    "vera": {"dropout": "vera_dropout"},
    "adalora": {"alpha": "lora_alpha", "dropout": "lora_dropout"},
    # LoftQ's settings only matter while peftlab initialises the weights (see to_peft_config)
    "loftq": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights",
              "loftq_bits": None, "loftq_iter": None},
    # PiSSA, OLoRA, LoRA-GA: the saved adapter is a LoRA on the residual base (see _INIT_TO_PEFT)
    "pissa": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
    "olora": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
    "lora_ga": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights",
                "direction": None, "scale": None, "stable_gamma": None, "data": None},
    "corda": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights",
              "corda_method": None, "data": None},
    # EVA: its settings only matter while the start is computed; rank_pattern / alpha_pattern stay
    "eva": {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights", "rho": None,
            "tau": None, "use_label_mask": None, "label_mask_value": None, "whiten": None,
            "adjust_scaling_factors": None, "data": None, "eva_state": None},
    # soft prompts adapt no layer (no target_modules); a tokenizer object is not config data
    "prompt_tuning": {"targets": None, "tokenizer": None},
    "prefix_tuning": {"targets": None},
    "p_tuning": {"targets": None},
    "miss": {"dropout": "miss_dropout"},
    "hira": {"dropout": "hira_dropout"},
    "vblora": {"dropout": "vblora_dropout"},
}
# peft config values that tell apart methods sharing one peft type: DoRA is peft's LoRA with
# use_dora=True. to_peft_config sets them; from_peft_config picks the method whose values match.
_PEFT_MARKERS: dict[str, dict[str, object]] = {"dora": {"use_dora": True}}
# The inits that choose A0, B0 from the layer (methods/lora_init.py) and subtract them from W are
# saved as what they are after the start: a plain LoRA (init True) on the residual base W - s B0 A0,
# peft's recipe for saving such adapters (and peftlab's for LoftQ). adapt_with_peft hands peft the
# real init (_peft_init). A peft folder saved with init_lora_weights="pissa"/"olora" is read back
# with that init, so that loading it re-derives W_res from the original W, as peft's loader does.
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "loftq": "loftq", "pissa": True, "olora": True,
                 "lora_ga": True, "eva": True, "corda": True}
_PEFT_TO_INIT = {True: "kaiming", "gaussian": "gaussian", "loftq": "loftq", "pissa": "pissa", "olora": "olora"}


def _peft_to_init(value: object) -> str:
    """peft's init_lora_weights as a peftlab init; "pissa_niter_K" stays itself."""
    if isinstance(value, str) and init_family(value) == "pissa":
        return value
    return _PEFT_TO_INIT.get(value, "kaiming")


def _peft_corda(config: AdapterConfig, model: nn.Module) -> dict:
    """peft's CorDA: its preprocess_corda runs the rows of ``config.data`` through the plain model."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from peftlab.methods.lora_data_init import check_data

    batches = check_data(config.data, "corda")
    kwargs = {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method=config.corda_method)}
    preprocess_corda(model, to_peft_config(get_method("corda"), config, model, **kwargs),
                     run_model=lambda: [model(**b) for b in batches])
    return kwargs


def _peft_init(config: AdapterConfig, model: nn.Module) -> dict:
    """peft's own init for a LoRA ``config`` (init_lora_weights and its settings), for get_peft_model:
    LoRA-GA's gradients are estimated here first, with peft's preprocess_loraga on ``config.data``."""
    init = getattr(config, "init", None)
    if init == "eva":  # peft's initialize_lora_eva_weights runs on the built model (adapt_with_peft)
        from peft import EvaConfig

        from peftlab.methods.lora_eva import check_eva_model

        check_eva_model(model)

        fields = ("rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors")
        return {"init_lora_weights": "eva", "eva_config": EvaConfig(**{f: getattr(config, f) for f in fields})}
    if init is None or not changes_base(init):
        return {}
    names = find_targets(model, config.targets, exclude=config.modules_to_save or ())
    if init == "olora" and any(is_conv1d(model.get_submodule(n)) for n in names):
        raise ConfigError("init='olora' on transformers' Conv1D (GPT-2 style) is refused: peft 0.21.2 decomposes "
                          "the stored (d_in, d_out) W and builds a B of the wrong shape. Expected nn.Linear "
                          "targets; try init='pissa', which handles Conv1D.")
    if init == "corda":
        return _peft_corda(config, model)
    if init != "lora_ga":
        return {"init_lora_weights": init}
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from peftlab.methods.lora_data_init import check_data

    batches = check_data(config.data, "lora_ga")
    kwargs = {"init_lora_weights": "lora_ga", "lora_ga_config": LoraGAConfig(**config.ga_settings)}
    peft_config = to_peft_config(get_method("lora_ga"), config, model, **kwargs)
    try:
        with warnings.catch_warnings():  # its backward hooks only count passes; torch warns about them
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            preprocess_loraga(model, peft_config, lambda: [model(**b).loss.backward() for b in batches])
    except RuntimeError as err:
        if "BackwardHookFunction" not in str(err):
            raise
        raise ConfigError("peft 0.21.2's LoRA-GA gradient estimate fails on this model: its full backward "
                          "hooks break where a layer's output is changed in place (e.g. Falcon's fused qkv). "
                          "Expected a model without such layers for backend='peft'; try backend='reference', "
                          "whose estimate counts passes without those hooks.") from err
    return kwargs


def _ia3_peft_kwargs(config: AdapterConfig, model: nn.Module | None) -> dict:
    """IA3: peft wants ``feedforward_modules`` as a subset of ``target_modules`` (its check, and
    what a saved adapter_config.json is read back with), so both become exact names together."""
    from peftlab.inject import is_conv, is_linear, matches

    targets, kwargs = config.targets, {}
    if model is not None:
        targets = find_targets(model, targets, accept=lambda m: is_linear(m) or is_conv(m),
                               exclude=config.modules_to_save or ())
        if any(is_conv1d(model.get_submodule(n)) for n in targets):
            kwargs["fan_in_fan_out"] = True  # GPT-2's Conv1D stores W as (d_in, d_out)
    feedforward = config.feedforward_modules or ()
    if not isinstance(targets, str):  # the targets that scale their input, by the same rule as ours
        feedforward = [t for t in targets if matches(t, feedforward)] if feedforward else []
    elif not isinstance(feedforward, str):
        feedforward = list(feedforward)
    return {**kwargs, "target_modules": targets if isinstance(targets, str) else list(targets),
            "feedforward_modules": feedforward, "init_ia3_weights": config.init_ia3_weights,
            "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None}


def _llama_adapter_peft_kwargs(config: AdapterConfig, model: nn.Module | None) -> dict:
    """AdaptionPrompt: target_modules is ONE attribute name ("self_attn") that peft looks for in
    every decoder layer, taking the top ``adapter_layers`` of them."""
    targets = config.targets if isinstance(config.targets, str) else config.targets[0]
    if config.modules_to_save:
        raise ConfigError(
            f"peft's AdaptionPrompt cannot train whole modules beside the prompts (modules_to_save="
            f"{config.modules_to_save!r}). Expected modules_to_save=(); train those with another adapter."
        )
    return {"target_modules": targets.rsplit(".", 1)[-1], "adapter_len": config.adapter_len,
            "adapter_layers": config.adapter_layers}


def _xlora_peft_kwargs(config: AdapterConfig, model: nn.Module | None) -> dict:
    """X-LoRA as a peft model (backend="peft"): refused where peft cannot load what it saves."""
    from peftlab.methods.xlora import check_one_stack, check_peft_can_load, peft_kwargs

    if model is not None:
        check_one_stack(model)
        check_peft_can_load(model)
    return peft_kwargs(config, model)


def _trainable_tokens_peft_kwargs(config: AdapterConfig, model: nn.Module | None) -> dict:
    """TrainableTokensConfig: token ids as a list (peft indexes the embedding with it: a tuple
    would index several dimensions), no modules_to_save (peft's config has no such field)."""
    targets = config.targets
    if model is not None:
        targets = find_targets(model, targets, accept=lambda m: isinstance(m, nn.Embedding),
                               exclude=config.modules_to_save or (), expected="an nn.Embedding")
    return {"target_modules": targets if targets is None or isinstance(targets, str) else list(targets),
            "token_indices": list(config.token_indices), "init_weights": config.init_weights}


def _llama_adapter_from_peft(kwargs: dict) -> dict:
    if isinstance(kwargs.get("targets"), str):  # peft's attribute name is a suffix, ours a regex
        kwargs["targets"] = (kwargs["targets"],)
    return kwargs


# Methods whose peft config is not a field-by-field rename: (config, model or None) -> peft
# kwargs, used instead of the renaming loop; and the way back, (our kwargs) -> our kwargs.
_PEFT_KWARGS: dict[str, Callable[[AdapterConfig, nn.Module | None], dict]] = {
    "ia3": _ia3_peft_kwargs, "llama_adapter": _llama_adapter_peft_kwargs, "xlora": _xlora_peft_kwargs,
    "trainable_tokens": _trainable_tokens_peft_kwargs}
_FROM_PEFT_KWARGS: dict[str, Callable[[dict], dict]] = {"llama_adapter": _llama_adapter_from_peft}


def task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model, from its class name."""
    from peftlab.models import is_causal_lm_class

    name = type(model).__name__
    if is_causal_lm_class(name):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForConditionalGeneration") and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"  # T5, BART: peft puts soft prompts before the encoder's input
    return None


def to_peft_config(spec: Method, config: AdapterConfig, model: nn.Module | None = None, **extra):
    """The peft config equivalent to a peftlab ``config`` (targets resolved to exact names when
    a model is given, so both paths adapt exactly the same layers)."""
    import_peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if spec.peft_type is None:
        raise ConfigError(
            f"peft has no {spec.name!r} method, so there is no peft backend for it. Expected a "
            "method peft implements; try backend='reference'."
        )
    renames = _RENAMES.get(spec.name, {})
    own = _PEFT_KWARGS.get(spec.name)  # a method whose peft config is more than renamed fields
    kwargs = own(config, model) if own else {}
    for field in () if own else dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in renames and renames[field.name] is None:
            continue
        if field.name == "targets":
            if model is not None:
                value = find_targets(model, value, exclude=config.modules_to_save or (), **_layer_kinds(spec))
                if any(is_conv1d(model.get_submodule(n)) for n in value):
                    _check_peft_takes_conv1d(spec, value, PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type])
                    kwargs["fan_in_fan_out"] = True  # GPT-2's Conv1D stores W as (d_in, d_out)
            kwargs["target_modules"] = value if isinstance(value, str) else list(value)
        elif field.name == "modules_to_save":
            kwargs["modules_to_save"] = list(value) if value else None
        elif field.name == "init":
            kwargs[renames["init"]] = _INIT_TO_PEFT[init_family(value)]
        else:
            kwargs[renames.get(field.name, field.name)] = value
    if kwargs.get("init_lora_weights") == "loftq":
        # peft's LoftQ runs while building the model and needs CUDA (and scipy); peftlab runs its
        # own LoftQ (peftlab/quant/loftq.py, see adapt_with_peft) and hands peft the finished
        # weights, which is also how peft's LoftQ recipe saves an adapter: init_lora_weights=True
        kwargs["init_lora_weights"] = True
    if model is not None and task_type(model):
        kwargs["task_type"] = task_type(model)
    if model is not None and spec.family == "soft prompt":
        kwargs.update(soft_prompt_geometry(spec, model))
    kwargs.update(_PEFT_MARKERS.get(spec.name, {}))
    kwargs.update(extra)
    return PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type](**kwargs)


# peft methods whose layers take transformers' Conv1D (GPT-2's linear layers, W stored as
# (d_in, d_out), told by fan_in_fan_out=True). peft 0.21's LoHa and LoKr have no such option, and
# its OFT and BOFT refuse the layer while building the model ("Target module Conv1D(...) is not
# supported. Currently, only `torch.nn.Linear`, `torch.nn.Conv2d` ... are supported").
PEFT_TAKES_CONV1D = frozenset({"LORA", "ADALORA", "IA3", "VERA", "XLORA", "FOURIERFT", "VBLORA", "HIRA"})


def takes_fan_in_fan_out(spec: Method) -> bool:
    """Whether peft's version of the method adapts transformers' Conv1D layers."""
    return spec.peft_type in PEFT_TAKES_CONV1D


# peft methods that adapt nn.Conv1d/2d/3d besides linear layers (which kinds, peft decides)
PEFT_TAKES_CONV = frozenset({"LORA", "LOHA", "LOKR", "IA3", "OFT", "ADALORA"})


def _layer_kinds(spec: Method) -> dict:
    """find_targets' accept/expected for the layers peft's version of the method takes."""
    from peftlab.inject import is_conv, is_linear

    if spec.peft_type == "LN_TUNING":  # norm layers, not linear ones
        from peftlab.methods.ln_tuning import NORM_TYPES, is_norm

        return {"accept": is_norm, "expected": NORM_TYPES}
    if spec.peft_type not in PEFT_TAKES_CONV:
        return {}
    attention = spec.name == "lora"  # peft's plain LoRA also adapts nn.MultiheadAttention
    return {"accept": lambda m: is_linear(m) or is_conv(m) or isinstance(m, nn.Embedding)
            or (attention and isinstance(m, nn.MultiheadAttention)),
            "expected": "a linear layer (nn.Linear, Conv1D), a convolution (nn.Conv1d/2d/3d) or an nn.Embedding"
            + (" (or, for lora, an nn.MultiheadAttention)" if attention else "")}


def _check_peft_takes_conv1d(spec: Method, targets, peft_config_class) -> None:
    if takes_fan_in_fan_out(spec):
        return
    raise ConfigError(
        f"peft cannot put {spec.name!r} on transformers' Conv1D layers (GPT-2 style, here "
        f"{', '.join(list(targets)[:3])}): its {peft_config_class.__name__} adapts nn.Linear and "
        "convolutions only, so a peft model cannot be built and a saved adapter does not load in "
        "peft. Expected backend='reference' (peftlab's own method adapts Conv1D; its adapter "
        "saves and loads with peftlab.save_adapter / load_adapter), or a method peft applies "
        "to Conv1D: lora, dora, adalora, vera, ia3, fourierft, vblora."
    )


def from_peft_config(peft_config) -> tuple[str, AdapterConfig]:
    """(peftlab method name, peftlab config) for a peft config object or its dict."""
    as_dict = peft_config if isinstance(peft_config, dict) else peft_config.to_dict()
    peft_type = str(as_dict.get("peft_type", "")).split(".")[-1].upper()
    same_type = [n for n, m in _methods().items() if m.peft_type == peft_type]
    same_type.sort(key=lambda n: -len(_PEFT_MARKERS.get(n, {})))  # most specific first
    method_name = next((n for n in same_type if all(as_dict.get(k) == v for k, v in
                                                    _PEFT_MARKERS.get(n, {}).items())), None)
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
            ours, value = "targets", value if value is None or isinstance(value, str) else tuple(sorted(value))
        if key == "modules_to_save":
            value = tuple(value) if value else ()
        if ours == "init":
            value = _peft_to_init(value)
        if ours in spec.config.field_names():
            kwargs[ours] = value
    if method_name in _FROM_PEFT_KWARGS:
        kwargs = _FROM_PEFT_KWARGS[method_name](kwargs)
    return method_name, spec.config(**kwargs)


def _methods() -> dict[str, Method]:
    from peftlab.methods import METHODS

    return METHODS


def import_peft():
    """``import peft``, without the log line bitsandbytes (which peft imports) prints on CPUs
    about an optional 'kernels-community' package that peftlab does not need."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import peft

    return peft


def adapt_with_peft(model: nn.Module, spec: Method, config: AdapterConfig, adapter_name: str):
    """``peft.get_peft_model`` with the peft config equivalent to ``config``."""
    peft = import_peft()

    peft_config = to_peft_config(spec, config, model, **_peft_init(config, model))
    peft_model = peft.get_peft_model(model, peft_config, adapter_name=adapter_name)
    if getattr(config, "init", None) == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        from peftlab.methods.lora_data_init import check_data

        from peftlab.methods.lora_eva import token_index

        # peftlab's token rule: peft's own masks by labels of any shape and fails on a classifier's
        initialize_lora_eva_weights(peft_model, dataloader=check_data(config.data, "eva"), adapter_name=adapter_name,
                                    prepare_model_inputs_fn=lambda batch, _c: token_index(batch, config),
                                    show_progress_bar=False)
    if spec.name == "adalora":  # peftlab.train's loss/step hooks (peft's own need labels and a manual call)
        from peftlab.methods.adalora import attach_peft_hooks

        attach_peft_hooks(peft_model)
    if getattr(config, "init", None) == "loftq":  # see to_peft_config: LoftQ is peftlab's, on any device
        from peftlab.quant.loftq import loftq_init_peft

        loftq_init_peft(peft_model, adapter_name, getattr(config, "loftq_bits", 4), getattr(config, "loftq_iter", 1))
    return peft_model
