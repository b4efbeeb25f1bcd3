"""The LoRA starts that need data: LoRA-GA's gradients, CorDA's covariances (math: methods/lora_init.py).

LoRA-GA (Wang et al. 2024, https://arxiv.org/abs/2407.05000) starts each adapter along the
mean gradient of the loss with respect to the frozen weight, over a few batches:

        G = (1 / n) Σ_batches ∂ loss / ∂ W         (d_out, d_in), only the target layers' W
        G ≈ U S Vᵀ  ->  A0 = V[:, :r]ᵀ,  B0 = U[:, r:2r] diag(S[r:2r]) · d_out^¼ / √γ
        W_res = W - s B0 A0                          (frozen: the output at init is unchanged)

so that the first LoRA step moves W as a step of full fine-tuning would. As in peft 0.21.2
(``preprocess_loraga``, ``estimate_gradients``): the model runs in train mode, only the target
weights require gradients, gradients add up over the batches and are divided by the number of
passes through each layer. Usage::

    batches = [{"input_ids": ..., "attention_mask": ..., "labels": ...}, ...]  # what model(**b).loss takes
    model = peftlab.adapt(model, "lora_ga", data=batches)   # or "lora" with init="lora_ga" is refused:
                                                            # plain LoRAConfig carries no data

CorDA (Yang et al. 2024, https://arxiv.org/abs/2406.05223) reads instead the covariance of each
target layer's inputs, one row of data per forward as peft's ``preprocess_corda`` expects:

        C = (1 / n) Σ_rows X̂ᵀ X̂,   X̂ = X / |max X|       (X: the row's tokens x d_in at the layer)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import find_targets, inject, is_linear
from peftlab.methods.base import check_range
from peftlab.methods.lora import LoRA, LoRAConfig
from peftlab.methods.lora_init import CORDA_METHODS, LORA_GA_DIRECTIONS, LORA_GA_SCALES, init_from_weight


@dataclass(frozen=True)
class LoraGAConfig(LoRAConfig):
    """LoRA started along the loss gradient (LoRA-GA); peft: init_lora_weights="lora_ga" + LoraGAConfig."""

    init: str = "lora_ga"
    direction: str = "ArB2r"  # which of the gradient's 2r singular vectors go to A and to B
    scale: str = "stable"  # "stable" (B · d_out^¼/√γ), "weight_svd", "gd_scale" or "unit"
    stable_gamma: float = 16  # γ of the "stable" scale
    # batches (dicts for model(**batch), with labels so that the model returns .loss): the
    # gradient estimate; only read while the adapter is built, never saved
    data: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "lora_ga":
            raise ConfigError(f"The lora_ga method is LoRA with init='lora_ga'; got init={self.init!r}. "
                              "Expected init='lora_ga'; for another init use method 'lora'.")
        if self.direction not in LORA_GA_DIRECTIONS:
            raise ConfigError(f"direction={self.direction!r} is not known. Expected one of {LORA_GA_DIRECTIONS}; "
                              "try 'ArB2r' (peft's default).")
        if self.scale not in LORA_GA_SCALES:
            raise ConfigError(f"scale={self.scale!r} is not known. Expected one of {LORA_GA_SCALES}; try 'stable'.")
        check_range("stable_gamma", self.stable_gamma, low=0.0, low_open=True)

    @property
    def ga_settings(self) -> dict:
        return {"direction": self.direction, "scale": self.scale, "stable_gamma": self.stable_gamma}


def check_data(data: object, init: str) -> list:
    """``data`` as a non-empty list of batches, or a clear error saying what to pass."""
    if data is None:
        raise ConfigError(
            f"LoRA init={init!r} learns its start from data, and none was given. Expected a few batches "
            "(dicts such as {'input_ids': ..., 'attention_mask': ..., 'labels': ...}); try "
            f"peftlab.adapt(model, {init!r}, data=batches) (or peftlab.adapt(model, 'lora', init={init!r}, "
            "data=batches))."
        )
    if isinstance(data, dict) or not isinstance(data, Iterable):
        raise ConfigError(f"data={type(data).__name__} is not a sequence of batches. Expected a list (or a "
                          "DataLoader) of dicts for model(**batch); try data=[batch].")
    batches = list(data)
    if not batches:
        raise ConfigError(f"data for init={init!r} is empty. Expected at least one batch.")
    return batches


def mean_gradients(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, Tensor]:
    """{layer name: mean ∂loss/∂W} over ``batches`` for the named linear layers (peft's estimate_gradients)."""
    modules = {n: model.get_submodule(n) for n in names}
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    counts = dict.fromkeys(names, 0)
    # peft counts backward passes with full backward hooks, which fail on layers whose output is
    # then changed in place (Falcon's fused qkv); a forward in train mode is one backward, so count those
    hooks = [m.register_forward_hook(lambda *_, n=n: counts.__setitem__(n, counts[n] + 1))
             for n, m in modules.items()]
    try:
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                out = model(**batch)
                if getattr(out, "loss", None) is None:
                    raise ConfigError("LoRA-GA needs a loss per batch, and the model returned none. Expected "
                                      "batches with 'labels'; try batch['labels'] = batch['input_ids'] for a causal LM.")
                out.loss.backward()
        grads = {n: m.weight.grad.detach() / counts[n] for n, m in modules.items()
                 if counts[n] > 0 and m.weight.grad is not None}
    finally:
        for hook in hooks:
            hook.remove()
        for m in modules.values():
            m.weight.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return grads


def build_lora_ga(model: nn.Module, config: LoraGAConfig, adapter_name: str) -> None:
    """LoRA-GA on the target linear layers: gradients from ``config.data``, then A0, B0 and W_res."""
    batches = check_data(config.data, "lora_ga")
    names = find_targets(model, config.targets, accept=is_linear, exclude=config.modules_to_save or (),
                         expected="a linear layer (nn.Linear, Conv1D): LoRA-GA starts from W's gradient")
    grads = mean_gradients(model, names, batches)

    def make(name: str, base: nn.Module) -> LoRA:
        adapter = LoRA(base, config.for_layer(name))
        if name in grads:  # a layer no batch reached keeps LoRA's usual start (as in peft)
            init_from_weight(base, adapter, "lora_ga", grad=grads[name], ga=config.ga_settings)
        return adapter

    inject(model, names, make, adapter_name)


@dataclass(frozen=True)
class CordaConfig(LoRAConfig):
    """LoRA started from the SVD of W C, C its inputs' covariance (CorDA); peft: init_lora_weights="corda"."""

    init: str = "corda"
    corda_method: str = "ipm"  # "ipm": the r largest triplets of W C; "kpm": the r smallest
    data: Any = field(default=None, compare=False, repr=False)  # rows, one per batch, for model(**batch)
    rows_per_batch: ClassVar[int] = 1  # what peftlab.train.start_data hands it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "corda":
            raise ConfigError(f"The corda method is LoRA with init='corda'; got init={self.init!r}. "
                              "Expected init='corda'; for another init use method 'lora'.")
        if self.corda_method not in CORDA_METHODS:
            raise ConfigError(f"corda_method={self.corda_method!r} is not known. Expected 'ipm' or 'kpm'.")


@torch.no_grad()
def input_covariances(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, Tensor]:
    """{layer: mean over forwards of X̂ᵀ X̂ (d_in, d_in)}, X̂ its input scaled by its largest value."""
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def keep(name: str):
        def hook(_module: nn.Module, args: tuple, _output: Any) -> None:
            x = args[0].detach().squeeze(0).float()  # (tokens, d_in): one row per forward
            if x.dim() != 2:
                raise ConfigError(f"CorDA reads one row per batch (as peft's preprocess_corda), but layer {name!r} "
                                  f"got an input of shape {tuple(args[0].shape)}. Expected batches of one row; "
                                  "try data=[{k: v[i:i + 1] for k, v in batch.items()} for i in range(n)].")
            x = x / torch.max(x).abs()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] += 1
        return hook

    training = model.training
    model.eval()
    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return {n: sums[n] / counts[n] for n in names if counts[n]}


def build_corda(model: nn.Module, config: CordaConfig, adapter_name: str) -> None:
    """CorDA on the target linear layers: covariances from ``config.data``, then A0, B0 and W_res."""
    batches = check_data(config.data, "corda")
    names = find_targets(model, config.targets, accept=is_linear, exclude=config.modules_to_save or (),
                         expected="a linear layer (nn.Linear, Conv1D): CorDA reads its inputs")
    covariances = input_covariances(model, names, batches)

    def make(name: str, base: nn.Module) -> LoRA:
        adapter = LoRA(base, config.for_layer(name))
        init_from_weight(base, adapter, "corda", covariance=covariances[name], mode=config.corda_method)
        return adapter

    inject(model, names, make, adapter_name)
