"""LoRA-FA: A frozen at its random start, only B trained, B's gradient projected.

Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", https://arxiv.org/abs/2308.03303. With A fixed, a LoRA layer's update s B A can
only move W in the row space of A; B's gradient is ∂L/∂B = s (∂L/∂W) Aᵀ. The LoRA-FA optimiser
(peft 0.21.2's ``peft.optimizers.create_lorafa_optimizer``, whose rule this repeats) turns it into
the step that best follows full fine-tuning's gradient within that space,

        g̃_B = (1 / s²) · ∂L/∂B · (A Aᵀ + δ I)⁺          δ = 1e-8, ⁺ the pseudo-inverse

so that s g̃_B A = (∂L/∂W) Aᵀ (A Aᵀ)⁻¹ A, the projection of ∂L/∂W onto A's rows. B then takes an
AdamW step (the Hugging Face form: eps 1e-6, bias-corrected moments, weight decay applied after
the step as B -= lr · wd · B); every other trainable tensor takes the same AdamW step on its own
gradient. A is not trained, so neither its gradient nor its two moments are kept: that is the
memory LoRA-FA saves (for A: 3 · r · d_in numbers per layer).

peft computes g̃_B under bfloat16 autocast wherever accelerate reports bf16 support (any recent
x86 CPU), so its projected gradient is rounded to bf16; this one stays in the parameters' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError

PINV_DELTA = 1e-8  # peft's δ: A Aᵀ + δ I stays invertible when A's rows are (nearly) dependent
ADAMW_EPS = 1e-6  # the LoRA-FA optimiser's AdamW defaults (peft's, from transformers' AdamW)
ADAMW_BETAS = (0.9, 0.999)


def lora_factors(model: nn.Module) -> Iterator[tuple[Tensor, Tensor, float]]:
    """(A, B, scaling) of every LoRA on linear layers: peftlab's adapters and peft's layers."""
    from peftlab.inject import adapted_layers

    for layer in adapted_layers(model).values():
        for adapter in layer.adapters.values():
            if isinstance(getattr(adapter, "lora_A", None), Tensor):
                yield adapter.lora_A, adapter.lora_B, float(adapter.scaling)
    for module in model.modules():
        factors = getattr(module, "lora_A", None)
        if isinstance(factors, nn.ModuleDict) and isinstance(getattr(module, "scaling", None), dict):
            for name, a in factors.items():
                yield a.weight, module.lora_B[name].weight, float(module.scaling[name])


def freeze_lora_a(model: nn.Module) -> list[tuple[Tensor, Tensor, float]]:
    """Freeze every LoRA's A and return the (A, B, scaling) triples; a clear error where the model
    has none, or a LoRA LoRA-FA cannot project (a convolution's 4-D factors)."""
    triples = list(lora_factors(model))
    if not triples:
        raise ConfigError("lora_fa=True trains LoRA's B with A frozen, but the model has no LoRA adapter. "
                          "Expected a model adapted with a LoRA method; try peftlab.adapt(model, 'lora').")
    odd = [tuple(a.shape) for a, _, _ in triples if a.ndim != 2]
    if odd:
        raise ConfigError(f"lora_fa=True projects B's gradient with (A Aᵀ)⁻¹, which needs 2-D factors; this "
                          f"model has LoRA factors of shape {odd[0]} (a convolution). Expected LoRA on linear "
                          "layers only; try targets that name linear layers, or lora_fa=False.")
    for a, _, _ in triples:
        a.requires_grad_(False)
    return triples


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (Hugging Face form) on every trainable tensor, with each LoRA's B gradient projected
    as above. ``pairs``: the (A, B, scaling) triples of :func:`freeze_lora_a`."""

    def __init__(self, params: list[Tensor], pairs: list[tuple[Tensor, Tensor, float]], lr: float,
                 weight_decay: float = 0.0, betas: tuple[float, float] = ADAMW_BETAS, eps: float = ADAMW_EPS):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})
        self._a_of = {id(b): (a, s) for a, b, s in pairs}  # B -> (its A, its scaling)

    def _gradient(self, p: Tensor) -> Tensor:
        if id(p) not in self._a_of:
            return p.grad
        a, scaling = self._a_of[id(p)]
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return (p.grad @ torch.linalg.pinv(a @ a.T + PINV_DELTA * eye)) / scaling ** 2

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._gradient(p)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def lorafa_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> LoraFAOptimizer:
    """Freeze the model's LoRA A factors and make the LoRA-FA optimiser for what stays trainable."""
    pairs = freeze_lora_a(model)
    return LoraFAOptimizer([p for p in model.parameters() if p.requires_grad], pairs, lr, weight_decay)
