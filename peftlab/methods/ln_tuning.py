"""LN tuning: train only the normalisation layers.

Zhao et al., 2023, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning,
https://arxiv.org/abs/2312.11420

Every weight matrix stays frozen; each targeted LayerNorm / RMSNorm trains its own gain γ (and
bias β where it has one):

        LayerNorm:  h = γ ⊙ (x - μ) / σ + β        RMSNorm:  h = γ ⊙ x / rms(x)
                    └ trainable copies of γ, β; the pretrained γ0, β0 stay in the base layer ┘

A few thousand numbers per model (2 · d per LayerNorm), which the paper finds enough to turn an
LLM into a multi-modal one. peft's version copies the whole norm module and trains the copy;
peftlab trains copies of its tensors and runs the layer's own forward with them
(torch.func.functional_call, as BitFit does for norm gains), so every norm class works and
merging is γ0 <- γ (W += Δ with Δ = γ - γ0). The copies start at γ0, β0: the model starts at the
pretrained one. Default targets are peft's (Llama: input_layernorm, post_attention_layernorm,
norm); for architectures peft has no default for (BERT, Phi-3, ...) every normalisation layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn
from torch.func import functional_call

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, base_of, candidate_modules, find_targets, inject, output_head_names
from peftlab.methods.base import AdapterConfig
from peftlab.methods.bitfit import is_norm

# peft's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING (the architectures peftlab names)
LN_TUNING_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
    "gemma": ("input_layernorm", "post_attention_layernorm", "norm"),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"),
    "gemma3_text": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"),
    "qwen2": ("post_attention_layernorm",),
    "qwen3": ("post_attention_layernorm",),
    "phi": ("input_layernorm", "final_layernorm"),
    "falcon": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "gptj": ("ln_1", "ln_f"),
    "t5": ("layer_norm", "final_layer_norm"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
}
NORM_TYPES = "a normalisation layer (nn.LayerNorm, an RMSNorm, T5LayerNorm, ...)"


@dataclass(frozen=True)
class LNTuningConfig(AdapterConfig):
    """No hyperparameters beyond which norm layers train (``targets``) and ``modules_to_save``."""


class LNTuning(Adapter):
    """h = norm(x; γ, β) with trainable copies γ, β of the base layer's own tensors."""

    delta_uses_base = True  # Δγ = γ - γ0 depends on the base's γ0
    layer_types = NORM_TYPES

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        return is_norm(module)

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.tensors = tuple(name for name, p in base.named_parameters(recurse=False) if p is not None)
        for name in self.tensors:  # same names as in the base layer: "weight", "bias"
            self.register_parameter(name, nn.Parameter(getattr(base, name).detach().clone()))

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # the norm's own forward with γ, β in place of γ0, β0 (result, from γ0, β0, is not needed)
        return functional_call(base, {n: getattr(self, n) for n in self.tensors}, (x,))

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.weight - base.weight

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        return self.bias - base.bias if "bias" in self.tensors else None


def resolve_ln_tuning(model: nn.Module, config: LNTuningConfig) -> LNTuningConfig:
    """"all-linear" (the default where peft names no norm layers for the architecture) means,
    for a method that adapts norm layers, every normalisation layer with a weight."""
    if config.targets != "all-linear":
        return config
    heads = output_head_names(model) | set(config.modules_to_save or ())
    norms = tuple(n for n, m in candidate_modules(model).items()
                  if is_norm(base_of(m)) and getattr(base_of(m), "weight", None) is not None
                  and not any(n == h or n.startswith(h + ".") for h in heads))
    if not norms:
        raise ConfigError(f"LN tuning found no normalisation layer with a weight in {type(model).__name__}. "
                          f"Expected {NORM_TYPES}; try another method such as 'ia3' or 'lora'.")
    return dataclasses.replace(config, targets=norms)


def ln_tuning_targets(model: nn.Module, config: LNTuningConfig) -> list[str]:
    return find_targets(model, config.targets, accept=is_norm, exclude=config.modules_to_save or (),
                        expected=NORM_TYPES)


def build_ln_tuning(model: nn.Module, config: LNTuningConfig, adapter_name: str) -> None:
    """Trainable copies of each targeted norm layer's tensors."""
    inject(model, ln_tuning_targets(model, config), lambda _name, base: LNTuning(base), adapter_name)


def ln_tuning_parameter_count(model: nn.Module, config: LNTuningConfig) -> int:
    """The sizes of the targeted norm layers' own tensors (d per RMSNorm, 2 · d per LayerNorm)."""
    return sum(p.numel() for name in ln_tuning_targets(model, config)
               for p in base_of(model.get_submodule(name)).parameters(recurse=False))
