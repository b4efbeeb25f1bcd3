"""Switching a whole model to the fused backend and back: :func:`fuse`, :func:`unfuse`.

:func:`fuse` turns each ``AdaptedLayer`` into a
:class:`~peftlab.production.fused.layer.FusedAdaptedLayer` (same parameters, same names), gives
SwiGLU MLPs and RMSNorms their fused forwards, and wraps the model's forward for the fused loss;
:func:`unfuse` undoes all of it. ``peftlab.adapt(model, "lora", backend="fused")`` calls
:func:`check_fusable_method` first and :func:`fuse` after injecting.
"""

from __future__ import annotations

from torch import nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, adapted_layers
from peftlab.production.fused.layer import FusedAdaptedLayer
from peftlab.production.fused.loss_hook import install_fused_loss, loss_can_fuse, remove_fused_loss
from peftlab.production.fused.rmsnorm import fused_rms_norm_forward, is_rms_norm
from peftlab.production.fused.swiglu import fused_swiglu_forward, is_swiglu_mlp
from peftlab.production.fused.wrap import unwrap_forward, wrap_forward
from peftlab.state import state_of

# methods whose adapters have a fused kernel here (others would gain nothing from backend="fused")
FUSED_METHODS = ("lora", "dora")


def fuse(model: nn.Module, loss: bool = True, chunk_size: int | None = None) -> nn.Module:
    """Switch a reference-adapted model to the fused path, in place; returns the model.

    Every ``AdaptedLayer`` becomes a :class:`FusedAdaptedLayer` (LoRA and DoRA adapters run the
    fused Functions, anything else the reference forward); Llama-style SwiGLU MLPs recompute
    silu(gate) * up in backward instead of keeping it; Llama-style RMSNorms with a frozen weight
    run :class:`RMSNormFunction`. With ``loss=True`` and a causal LM,
    ``model(..., labels=...)`` also uses the fused cross-entropy (``outputs.logits`` is then None).
    """
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError(
            "This model has no peftlab adapter to fuse. Expected a model from "
            "peftlab.adapt(model, 'lora'); try peftlab.adapt(model, 'lora', backend='fused')."
        )
    for layer in layers.values():
        if type(layer) is AdaptedLayer:
            layer.__class__ = FusedAdaptedLayer  # same state, new forward
    for module in model.modules():
        if is_swiglu_mlp(module):
            wrap_forward(module, fused_swiglu_forward)
        elif is_rms_norm(module):
            wrap_forward(module, fused_rms_norm_forward)
    if loss and loss_can_fuse(model):
        install_fused_loss(model, chunk_size)
    state_of(model).backend = "fused"
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Back to the reference forward everywhere (the parameters are the same objects)."""
    for layer in adapted_layers(model).values():
        if type(layer) is FusedAdaptedLayer:
            layer.__class__ = AdaptedLayer
    for module in model.modules():
        if is_swiglu_mlp(module) or is_rms_norm(module):
            unwrap_forward(module)
    remove_fused_loss(model)
    state_of(model).backend = "reference"
    return model


def check_fusable_method(method: str) -> None:
    """Refuse ``backend="fused"`` for a method without a fused kernel here, saying what to use."""
    if method not in FUSED_METHODS:
        raise ConfigError(
            f"backend='fused' has kernels for {', '.join(FUSED_METHODS)}, not {method!r}. "
            "Expected one of those; try backend='reference' (or 'peft') for this method."
        )


__all__ = ["FUSED_METHODS", "fuse", "unfuse", "check_fusable_method"]
