"""BitFit: train only the bias terms.

Ben Zaken, Ravfogel and Goldberg, 2021, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", https://arxiv.org/abs/2106.10199

Every weight matrix stays frozen; only the biases b of the linear layers and LayerNorms train
(about 0.1% of BERT's parameters, paper section 3):

        h = W0 x + b          W0 frozen, b trainable (starts at the pretrained b0)

        x ──── W0 ────(+)──▶ h
                       │
                       b  (trainable copy; the pretrained b0 stays in the base layer)

The reference keeps the pretrained b0 in the base layer and trains a copy b beside it, so the
adapter can be switched off (giving back the base model), several adapters can coexist, and a
saved adapter holds just the trained biases. Its forward swaps the bias: h = (W0 x + b0) - b0 + b.
The production path (``peftlab.production.merged.bitfit``) is what everyone writes by hand:
``requires_grad`` on the model's own biases, no wrapper at all; the two agree exactly.

Llama-family models (SmolLM2 included) have NO biases: their linear layers are built with
bias=False and RMSNorm has none. BitFit would then train nothing, so it refuses, and offers
``include_norms=True``: also train the weights (gains, γ) of the normalisation layers, which
exist in every transformer and are, like biases, a vector per layer. A norm layer with a trained
γ is recomputed with the adapter's copies (torch.func.functional_call), so any norm class works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from peftlab.errors import ConfigError
from peftlab.inject import (Adapter, TrainableCopy, base_of, candidate_modules, inject, is_linear,
                            matches, output_head_names)
from peftlab.methods.base import AdapterConfig, LayerActivations, SavedActivations


@dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    # Whose biases train: a regex (full match) or module names / name suffixes; ".*": every
    # module; "all-linear": linear layers only (no LayerNorm biases). Only a module's OWN bias.
    targets: str | tuple[str, ...] | None = ".*"
    include_norms: bool = False  # also train the weights (γ) of LayerNorm / RMSNorm layers


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and their model-specific classes (LlamaRMSNorm, T5LayerNorm, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def trainable_tensors(module: nn.Module, include_norms: bool) -> tuple[str, ...]:
    """Which of the module's own parameters BitFit trains: ("bias",), ("weight", "bias"), ..."""
    own = module._parameters  # the module's own tensors, not its children's
    names = []
    if include_norms and is_norm(module) and own.get("weight") is not None:
        names.append("weight")
    if own.get("bias") is not None:
        names.append("bias")
    return tuple(names)


def bitfit_targets(model: nn.Module, config: BitFitConfig) -> dict[str, tuple[str, ...]]:
    """{module name: names of its own tensors that train} for this config; a clear ConfigError
    when there is nothing to train (Llama has no biases at all)."""
    skip = tuple(config.modules_to_save or ())  # trained whole, as copies: not by BitFit
    heads = output_head_names(model)
    found: dict[str, tuple[str, ...]] = {}
    for name, module in candidate_modules(model).items():
        parts = name.split(".")
        inside_skipped = skip and any(matches(".".join(parts[:i]), skip) for i in range(1, len(parts) + 1))
        if isinstance(module, TrainableCopy) or inside_skipped:
            continue
        base = base_of(module)
        if config.targets == "all-linear":
            if not is_linear(base) or name in heads:
                continue
        elif not matches(name, config.targets):
            continue
        tensors = trainable_tensors(base, config.include_norms)
        if tensors:
            found[name] = tensors
    if not found:
        raise ConfigError(_nothing_to_train(model, config))
    return found


def _nothing_to_train(model: nn.Module, config: BitFitConfig) -> str:
    norms = [n for n, m in candidate_modules(model).items() if is_norm(m) and getattr(m, "weight", None) is not None]
    has_bias = any(n.endswith(".bias") or n == "bias" for n, _ in model.named_parameters())
    what = (f"the targets {config.targets!r} name no module with a bias" if has_bias else
            f"this model ({type(model).__name__}) has no bias parameters at all: its linear layers "
            "have bias=False and its norm layers have no bias (true of Llama, SmolLM2, Mistral)")
    if norms and not config.include_norms:
        count = sum(model.get_submodule(n).weight.numel() for n in norms)
        hint = (f" LayerNorm/RMSNorm weights could train instead: pass include_norms=True, which would "
                f"train the weights of {len(norms)} norm layers ({', '.join(norms[:3])}"
                f"{', ...' if len(norms) > 3 else ''}; {count:,} parameters).")
    else:
        hint = " Try targets='.*', or another method such as 'ia3' or 'lora'."
    return f"BitFit has nothing to train: {what}. Expected at least one bias.{hint}"


class BitFit(Adapter):
    """h = base(x) with the base layer's bias (and, for a norm layer, weight) replaced by
    trainable copies: h = W0 x + b."""

    delta_uses_base = True  # Δb = b - b0 depends on the base's b0

    def __init__(self, base: nn.Module, tensors: tuple[str, ...]) -> None:
        super().__init__()
        self.tensors = tensors  # names of the base tensors this adapter retrains
        for name in tensors:  # same names as in the base layer: "bias", "weight"
            self.register_parameter(name, nn.Parameter(getattr(base, name).detach().clone()))

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        if self.tensors == ("bias",):  # h = (W0 x + b0) - b0 + b: one vector add, no recompute
            return result + (self.bias - base.bias).to(result.dtype)
        # a norm layer with a trained γ: run its own forward with our tensors in place of its own
        return functional_call(base, {n: getattr(self, n) for n in self.tensors}, (x,))

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: nothing, not even x: a bias's gradient is the output's gradient."""
        return SavedActivations(keeps_input=False)

    def delta_weight(self, base: nn.Module) -> Tensor:
        if "weight" in self.tensors:
            return self.weight - base.weight
        return torch.zeros_like(base.weight)  # weights never change under BitFit

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        return self.bias - base.bias if "bias" in self.tensors else None


def build_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str) -> None:
    """Give every selected module trainable copies of its bias (and norm weight)."""
    selected = bitfit_targets(model, config)
    inject(model, selected, lambda name, base: BitFit(base, selected[name]), adapter_name)


def bitfit_parameter_count(model: nn.Module, config: BitFitConfig) -> int:
    """Closed form: the sum of the sizes of the selected biases (and norm weights)."""
    total = 0
    for name, tensors in bitfit_targets(model, config).items():
        base = base_of(model.get_submodule(name))
        total += sum(getattr(base, t).numel() for t in tensors)
    return total
