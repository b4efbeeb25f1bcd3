"""The registry of PEFT methods: name -> Method (config dataclass, builder, facts for learners).

Adding a method is one file in this folder plus one entry in ``METHODS`` below; nothing
registers itself on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from peftlab.errors import UnknownNameError, closest
from peftlab.inject import Adapter, find_targets, inject
from peftlab.methods.base import AdapterConfig
from peftlab.methods.lora import LoRA, LoRAConfig

# Where each method goes by default, by `model.config.model_type` (peft's defaults for LoRA).
ATTENTION_QV = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "opt": ("q_proj", "v_proj"),
}


@dataclass(frozen=True)
class Method:
    name: str
    config: type[AdapterConfig]
    # build(model, config, adapter_name): adds the adapter to the model in place
    build: Callable[[nn.Module, AdapterConfig, str], None]
    family: str  # reparameterisation, orthogonal, adaptive, additive, selective, soft prompt, mixture
    description: str  # one line for learners
    paper: str  # citation with link
    formula: str  # trainable parameters, in words a learner can check
    # trainable parameters of one adapted layer of shape (d_in, d_out): the contract tests'
    # closed form; None for methods whose count is not per layer
    params_per_layer: Callable[[int, int, AdapterConfig], int] | None
    mergeable: bool
    peft_type: str | None  # the peft method it bridges to, None where peft lacks it
    default_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: ATTENTION_QV)

    def targets_for(self, model: nn.Module) -> str | tuple[str, ...]:
        """This method's default targets for the model's architecture ("all-linear" if unknown)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return self.default_targets.get(model_type, "all-linear")


def layer_method(adapter: type[Adapter]) -> Callable[[nn.Module, AdapterConfig, str], None]:
    """Builder for a method that wraps layers: find the targets, attach ``adapter`` to each."""

    def build(model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        # adapt() has already replaced targets=None by the method's default for this model
        names = find_targets(model, config.targets, exclude=config.modules_to_save or ())
        inject(model, names, lambda _name, base: adapter(base, config), adapter_name)

    return build


METHODS: dict[str, Method] = {
    "lora": Method(
        name="lora",
        config=LoRAConfig,
        build=layer_method(LoRA),
        family="reparameterisation",
        description="Learn a low-rank update B A beside each frozen weight: W0 + (alpha/r) B A.",
        paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, https://arxiv.org/abs/2106.09685",
        formula="r · (d_in + d_out) per adapted layer",
        params_per_layer=lambda d_in, d_out, c: c.r * (d_in + d_out),
        mergeable=True,
        peft_type="LORA",
    ),
}


def get_method(name: str) -> Method:
    """The registered method called ``name``; a clear error suggesting the closest name."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in METHODS:
        raise UnknownNameError(
            f"Unknown method {name!r}.{closest(str(key), METHODS)} Expected one of: "
            f"{', '.join(METHODS)}. See peftlab.list_methods() for what each does."
        )
    return METHODS[key]


def list_methods() -> list[dict]:
    """Each method's name, family, one-line description, paper, parameter formula, mergeability."""
    return [
        {
            "name": m.name,
            "family": m.family,
            "description": m.description,
            "paper": m.paper,
            "trainable_parameters": m.formula,
            "mergeable": m.mergeable,
            "in_peft": m.peft_type is not None,
        }
        for m in METHODS.values()
    ]
