"""The weight bridge between peftlab and Hugging Face peft: a peftlab parameter name <-> the name
peft gives the same tensor, so that one set of adapter weights can be copied either way and both
implementations run with it (the config translation is ``hf_peft.py``'s).

Name mapping, e.g. for LoRA on ``model.layers.0.self_attn.q_proj`` with adapter "default":

    peftlab (in memory)  model.layers.0.self_attn.q_proj.adapters.default.lora_A
    peft    (in memory)  base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    peft    (on disk)    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

peft is imported inside the functions, so ``import peftlab`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from peftlab.inject import AdaptedLayer, TrainableCopy, overrides
from peftlab.methods import get_method
from peftlab.methods.base import AdapterConfig

PREFIX = "base_model.model."  # what peft puts before the base model's own parameter names


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
    "hira": lambda adapter: {"hira_A": "hira_A.{name}", "hira_B": "hira_B.{name}"},
    "c3a": lambda adapter: {"c3a_kernel": "c3a_kernel.{name}"},
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
