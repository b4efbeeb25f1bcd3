"""Hooking the fused loss into ``model(input_ids=..., labels=...)``, what transformers' Trainer and
TRL call.

The model's forward is wrapped: it runs as always, with the LM head swapped for a stand-in that
only keeps its input (the final hidden states), and the loss is then
:func:`~peftlab.production.fused.cross_entropy.linear_cross_entropy` over the real head. With
labels, ``outputs.logits`` is then ``None`` (the point is never to build them); without labels the
model returns full logits as usual. Code that needs logits and loss from one call (TRL's
token-accuracy metrics, label smoothing in Trainer) should call :func:`remove_fused_loss` first.
"""

from __future__ import annotations

from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.production.fused.cross_entropy import IGNORE_INDEX, causal_lm_targets, linear_cross_entropy
from peftlab.production.fused.wrap import is_wrapped, unfused_forward, unwrap_forward, wrap_forward

# config fields of models whose logits are transformed after the head; the fused loss would be
# wrong there, so those models keep transformers' own loss
_POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_router_logits")


def install_fused_loss(model: nn.Module, chunk_size: int | None = None) -> nn.Module:
    """Make ``model(..., labels=...)`` compute its loss with :func:`linear_cross_entropy`.

    The model's forward runs as always, with the LM head swapped for a stand-in that only keeps
    its input (the final hidden states) and returns an empty logits tensor; the loss is then the
    chunked fused cross-entropy over the real head. ``outputs.logits`` is ``None`` when labels are
    given. Calls without labels, with ``logits_to_keep``, or with ``return_dict=False`` run the
    original forward unchanged.
    """
    if not loss_can_fuse(model):
        raise ConfigError(
            f"{type(model).__name__} has no plain linear LM head whose output is the logits, so "
            "the fused loss cannot replace its loss. Expected a causal LM (e.g. LlamaForCausalLM) "
            "with an nn.Linear head and no logit soft-capping; try fuse(model, loss=False)."
        )
    wrap_forward(model, _fused_loss_forward)
    model._peftlab_loss_chunk = chunk_size
    return model


def remove_fused_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`install_fused_loss`: the model computes full logits and its own loss again."""
    unwrap_forward(model)
    return model


def has_fused_loss(model: nn.Module) -> bool:
    """True while :func:`install_fused_loss`'s forward is installed on ``model``."""
    return is_wrapped(model)


def loss_can_fuse(model: nn.Module) -> bool:
    """True for a causal LM whose plain linear head's output is the logits (what the fused
    loss replaces); models with soft-capped or scaled logits keep their own loss."""
    if not type(model).__name__.endswith("ForCausalLM"):
        return False
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    config = getattr(model, "config", None)
    if any(getattr(config, f, None) for f in _POST_HEAD_FIELDS):
        return False
    if type(head) is not nn.Linear or "forward" in head.__dict__:
        return False  # an adapted, quantized or otherwise wrapped head keeps the ordinary path
    return not (head._forward_hooks or head._forward_pre_hooks)


def _fused_loss_forward(self: nn.Module, *args, **kwargs):
    """The wrapped forward (bound to the model): fused loss when labels are given."""
    original = unfused_forward(self)
    labels = kwargs.get("labels")
    if (labels is None or kwargs.get("return_dict") is False or kwargs.get("logits_to_keep")
            or not loss_can_fuse(self)):
        return original(*args, **kwargs)
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
    shift_labels = kwargs.get("shift_labels")
    num_items = kwargs.get("num_items_in_batch")
    head = self.get_output_embeddings()
    captured: list[Tensor] = []

    def keep_hidden(hidden: Tensor) -> Tensor:  # the stand-in head: no (tokens x vocab) matmul
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = keep_hidden  # an instance attribute shadows the class's forward
    try:
        outputs = original(*args, **{**kwargs, "labels": None})
    finally:
        del head.forward
    hidden = captured[-1]  # (B, T, H)
    targets = shift_labels if shift_labels is not None else causal_lm_targets(labels, ignore_index)
    loss = linear_cross_entropy(hidden, head.weight, targets.to(hidden.device), head.bias,
                                ignore_index=ignore_index, num_items_in_batch=num_items,
                                chunk_size=self._peftlab_loss_chunk)
    fields = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
    return type(outputs)(loss=loss, logits=None, **fields)


__all__ = ["install_fused_loss", "remove_fused_loss", "has_fused_loss", "loss_can_fuse"]
