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
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, TrainableCopy, find_targets, is_conv1d, overrides
from peftlab.production.prompt_geometry import soft_prompt_geometry  # noqa: F401 (io imports it from here)
from peftlab.methods import Method, get_method
from peftlab.methods.base import AdapterConfig
from peftlab.methods.lora_init import changes_base, init_family

PREFIX = "base_model.model."

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
PEFT_TAKES_CONV1D = frozenset({"LORA", "ADALORA", "IA3", "VERA", "XLORA", "FOURIERFT", "VBLORA"})


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


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def _lora_names(adapter: nn.Module) -> dict[str, str]:
    if overrides(adapter, "peft_names"):  # LoRA on parameters (peft's nested ParamWrappers)
        return adapter.peft_names()
    if adapter.rides_along:  # LoRA's trainable tokens; a tied head saves none of its own
        return {} if adapter._tied_to else {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta.{name}"}
    if getattr(adapter, "is_embedding", False):
        return {"lora_A": "lora_embedding_A.{name}", "lora_B": "lora_embedding_B.{name}"}
    names = {"lora_A": "lora_A.{name}.weight", "lora_B": "lora_B.{name}.weight"}
    if getattr(adapter, "lora_B_bias", None) is not None:  # lora_bias: peft's lora_B has a bias
        names["lora_B_bias"] = "lora_B.{name}.bias"
    return names


# method -> (adapter module -> {peftlab parameter name: peft name template})
PARAM_NAMES: dict[str, Callable[[nn.Module], dict[str, str]]] = {"lora": _lora_names,
    "oft": lambda adapter: {"oft_R": ("oft_embedding_R" if getattr(adapter, "is_embedding", False) else "oft_R")
                            + ".{name}.weight"},  # peft: OFTRotationModule.weight (embeddings: their own dict)
    "boft": lambda adapter: {"boft_R": "boft_R.{name}", "boft_s": "boft_s.{name}"},  # ParameterDicts
    "dora": lambda adapter: {**_lora_names(adapter), "magnitude": "lora_magnitude_vector.{name}.weight"},
    # LyCORIS methods and VeRA keep ParameterDicts: "<param>.<adapter name>"
    "loha": lambda adapter: {n: n + ".{name}" for n, _ in adapter.named_parameters()},
    "lokr": lambda adapter: {n: n + ".{name}" for n, _ in adapter.named_parameters()},
    "vera": lambda adapter: {n: n + ".{name}" for n, _ in adapter.named_parameters()},
    # AdaLoRA keeps ParameterDicts; its ranknum is a constant (init_r), which peft does not save
    "adalora": lambda adapter: {"lora_A": "lora_A.{name}", "lora_E": "lora_E.{name}", "lora_B": "lora_B.{name}"},
    "loftq": _lora_names,
    "pissa": _lora_names,
    "olora": _lora_names,
    "lora_ga": _lora_names,
    "eva": _lora_names,
    "corda": _lora_names,
    # soft prompts: peft keeps their modules on the PeftModel itself, as prompt_encoder.<name>
    "prompt_tuning": lambda adapter: {n: "prompt_encoder.{name}." + n for n, _ in adapter.named_parameters()},
    "prefix_tuning": lambda adapter: {n: "prompt_encoder.{name}." + n for n, _ in adapter.named_parameters()},
    "p_tuning": lambda adapter: {n: "prompt_encoder.{name}." + n for n, _ in adapter.named_parameters()},
    "ia3": lambda adapter: {"ia3_l": "ia3_l.{name}"},  # a ParameterDict: (d_out, 1) or (1, d_in)
    # peft's AdaptedAttention holds the prompt and gate directly, without the adapter name
    "llama_adapter": lambda adapter: {"adaption_prompt": "adaption_prompt", "adaption_gate": "adaption_gate"},
    # not in peft (files in peftlab's PEFT-like format): BitFit's tensors keep the base model's
    # own names, e.g. base_model.model.<layer>.bias; a bottleneck's are <layer>.bottleneck_up.weight
    "bitfit": lambda adapter: {t: t for t in adapter.tensors},
    "bottleneck": lambda adapter: {f"{p}.{t}": f"bottleneck_{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")},
    # X-LoRA's mixers hold no weights (the experts are LoRA adapters under their own names, the
    # router sits on the model): see peftlab.xlora_io.to_peft_config / copy_router_to_peft
    "xlora": lambda adapter: {},
    # peft keeps these in ParameterDicts: "<param>.<adapter name>"
    "hra": lambda adapter: {"hra_u": "hra_u.{name}"},
    "road": lambda adapter: {"road_theta": "road_theta.{name}", "road_alpha": "road_alpha.{name}"},
    "miss": lambda adapter: {"miss_block": "miss_block.{name}"},
    "fourierft": lambda adapter: {"fourierft_spectrum": "fourierft_spectrum.{name}"},
    "shira": lambda adapter: {"shira_weight": "shira_weight.{name}"},  # its mask: SHARED_TENSORS
    "vblora": lambda adapter: {"vblora_logits_A": "vblora_logits_A.{name}",  # its bank: SHARED_TENSORS
                               "vblora_logits_B": "vblora_logits_B.{name}"},
    # peft trains a whole copy of the norm module: ln_tuning_layers.<adapter name>.<its tensor>
    "ln_tuning": lambda adapter: {t: "ln_tuning_layers.{name}." + t for t in adapter.tensors},
    # standalone trainable tokens: a ParameterDict on the embedding; a tied head holds none of its own
    "trainable_tokens": lambda adapter: {} if adapter._tied_to else {"trainable_tokens_delta": "trainable_tokens_delta.{name}"},
}
# peft's "prompt learning" types: their modules hang off the PeftModel (prompt_encoder.<name>),
# the transformers model sits directly at base_model (no tuner wrapper, so modules_to_save live
# under "base_model.", not PREFIX), and the file holds the prompt they compute, "prompt_embeddings".
PROMPT_LEARNING = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}


def _vera_shared(model: nn.Module, adapter_name: str, on_disk: bool) -> dict[str, Tensor]:
    from peftlab.state import records
    from peftlab.methods.vera import shared_projection

    if on_disk and not records(model)[adapter_name].config.save_projection:
        return {}  # peft saves the random A, B only with save_projection=True
    projection = shared_projection(model, adapter_name)
    return {f"base_model.vera_A.{adapter_name}": projection.vera_A,
            f"base_model.vera_B.{adapter_name}": projection.vera_B}


def _shira_masks(model: nn.Module, adapter_name: str, on_disk: bool) -> dict[str, Tensor]:
    from peftlab.methods.shira import shira_masks

    # peft keeps each layer's mask in a dict attribute, shira_indices[adapter name], and saves it
    return {f"{PREFIX}{path}.shira_indices.{adapter_name}": mask for path, mask in shira_masks(model, adapter_name).items()}


def _vblora_bank(model: nn.Module, adapter_name: str, on_disk: bool) -> dict[str, Tensor]:
    from peftlab.methods.vblora import vector_bank

    return {f"base_model.vblora_vector_bank.{adapter_name}": vector_bank(model, adapter_name)}


def _tied_token_rows(model: nn.Module, adapter_name: str, on_disk: bool) -> dict[str, Tensor]:
    from peftlab.methods.trainable_tokens import tied_rows

    # peft's tied layers (an LM head; T5's and BART's encoder/decoder embeddings) hold the source's ParameterDict
    return {f"{PREFIX}{path}.trainable_tokens_delta.{adapter_name}": rows for path, rows in tied_rows(model, adapter_name).items()}


# method -> (model, adapter name, on_disk) -> {peft in-memory name: tensor} for tensors outside
# PARAM_NAMES' per-layer templates: those all layers share (VeRA's frozen random A, B; VB-LoRA's
# trained vector bank: peft keeps them once, on its base model) and per-layer buffers (SHiRA's
# mask indices) and the rows a tied head reads (standalone trainable tokens: peft saves them twice).
SHARED_TENSORS: dict[str, Callable[[nn.Module, str, bool], dict[str, Tensor]]] = {
    "vera": _vera_shared, "shira": _shira_masks, "vblora": _vblora_bank, "trainable_tokens": _tied_token_rows}


def _peft_tensor(peft_model: nn.Module, name: str) -> Tensor:
    """The tensor a peft model keeps under an in-memory ``name``: a buffer (VeRA's), a parameter
    (VB-LoRA's bank), or an entry of a layer's dict attribute, "<layer>.<attribute>.<adapter
    name>" (SHiRA's indices)."""
    for get in (peft_model.get_buffer, peft_model.get_parameter):
        try:
            return get(name)
        except AttributeError:
            pass
    path, attribute, adapter_name = name.rsplit(".", 2)
    return getattr(peft_model.get_submodule(path), attribute)[adapter_name]


def _vblora_file(direction: str) -> Callable[[AdapterConfig, dict[str, Tensor]], dict[str, Tensor]]:
    def convert(config: AdapterConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        from peftlab.methods import vblora

        return getattr(vblora, direction)(config, state)

    return convert


# method -> ((config, state) -> what the file holds, (config, file) -> state): a method whose file
# holds other tensors than its parameters (VB-LoRA's save_only_topk_weights: top-k indices and weights)
FILE_FORMS: dict[str, tuple[Callable, Callable]] = {"vblora": (_vblora_file("to_topk_file"), _vblora_file("from_topk_file"))}


def _file_form(model: nn.Module, adapter_name: str, state: dict[str, Tensor], way: int) -> dict[str, Tensor]:
    from peftlab.state import records

    record = records(model)[adapter_name]
    forms = FILE_FORMS.get(record.method)
    return forms[way](record.config, state) if forms else state


def state_to_file(model: nn.Module, adapter_name: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter's tensors (peft's on-disk names) as its file holds them (FILE_FORMS)."""
    return _file_form(model, adapter_name, state, 0)


def state_from_file(model: nn.Module, adapter_name: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A file's tensors as the adapter's parameters hold them, under peft's on-disk names (the
    inverse of state_to_file; a state already in that form is returned as it is)."""
    return _file_form(model, adapter_name, state, 1)


def shared_tensors(model: nn.Module, adapter_name: str = "default", on_disk: bool = False) -> dict[str, Tensor]:
    """The reference model's shared tensors of one adapter under peft's in-memory names."""
    from peftlab.state import records

    hook = SHARED_TENSORS.get(records(model)[adapter_name].method)
    return hook(model, adapter_name, on_disk) if hook else {}


def reference_to_peft_names(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """{peftlab parameter name: peft in-memory parameter name} for one adapter of a reference
    model (adapter parameters and trainable copies)."""
    from peftlab.state import records

    method = records(model)[adapter_name].method
    prompt_learning = get_method(method).peft_type in PROMPT_LEARNING
    prefix = "base_model." if prompt_learning else PREFIX
    mapping = {}
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
            adapter = module.adapters[adapter_name]
            for ours, template in PARAM_NAMES[method](adapter).items():
                theirs = template.format(name=adapter_name)
                mapping[f"{path}.adapters.{adapter_name}.{ours}"] = (
                    theirs if prompt_learning else PREFIX + path + "." + theirs
                )
        elif isinstance(module, TrainableCopy) and adapter_name in module.copies:
            for pname, _ in module.copies[adapter_name].named_parameters():
                mapping[f"{path}.copies.{adapter_name}.{pname}"] = (
                    f"{prefix}{path}.modules_to_save.{adapter_name}.{pname}"
                )
    return mapping


def saved_name(peft_name: str, adapter_name: str = "default") -> str:
    """peft's on-disk key for an in-memory parameter name: the adapter name is dropped."""
    if peft_name == f"prompt_encoder.{adapter_name}.embedding.weight":
        return "prompt_embeddings"  # a soft prompt's table (see reference_state_dict)
    return (
        peft_name.replace(f".lora_magnitude_vector.{adapter_name}.weight", ".lora_magnitude_vector")
        .replace(f".modules_to_save.{adapter_name}.", ".")
        .replace(f".{adapter_name}.", ".")
        .removesuffix(f".{adapter_name}")
    )


def reference_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under peft's on-disk names, ready for adapter_model.safetensors."""
    from peftlab.state import records

    params = dict(model.named_parameters())
    names = reference_to_peft_names(model, adapter_name)
    state = {}
    if get_method(records(model)[adapter_name].method).peft_type in PROMPT_LEARNING:
        # peft saves the prompt a soft prompt computes, not the encoder that computes it
        from peftlab.methods.soft_prompt import soft_prompt_of

        state["prompt_embeddings"] = soft_prompt_of(model, adapter_name).prompt().detach()
        names = {ours: theirs for ours, theirs in names.items() if not theirs.startswith("prompt_encoder.")}
    state.update({saved_name(theirs, adapter_name): params[ours].detach() for ours, theirs in names.items()})
    for theirs, tensor in shared_tensors(model, adapter_name, on_disk=True).items():
        state[saved_name(theirs, adapter_name)] = tensor.detach()
    return state_to_file(model, adapter_name, state)


@torch.no_grad()
def load_reference_state_dict(
    model: nn.Module, state: dict[str, Tensor], adapter_name: str = "default"
) -> None:
    """Copy tensors stored under peft's on-disk names into a reference model's adapter."""
    from peftlab.errors import AdapterFileError

    params = dict(model.named_parameters())
    names = reference_to_peft_names(model, adapter_name)
    state = state_from_file(model, adapter_name, state)
    for theirs, tensor in shared_tensors(model, adapter_name, on_disk=True).items():
        params[theirs], names[theirs] = tensor, theirs  # shared buffers (VeRA) load like parameters
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
    for name, tensor in shared_tensors(reference, adapter_name).items():
        _peft_tensor(peft_model, name).copy_(tensor)


@torch.no_grad()
def copy_peft_to_reference(peft_model: nn.Module, reference: nn.Module, adapter_name: str = "default") -> None:
    """Give a reference model exactly the peft model's adapter weights."""
    theirs = dict(peft_model.named_parameters())
    for ours, name in reference_to_peft_names(reference, adapter_name).items():
        reference.get_parameter(ours).copy_(theirs[name])
    for name, tensor in shared_tensors(reference, adapter_name).items():
        tensor.copy_(_peft_tensor(peft_model, name))
