"""Activations traced on the meta device: for the architectures and methods the formula of
peftlab/memory/activations.py does not model term by term."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftlab.memory.ledger import SavedTensors, is_classifier


def traced_activation_bytes(model: nn.Module, batch: int, seq_len: int, checkpointing: bool = False,
                            attn: str = "sdpa", padded: bool = False) -> tuple[int, dict[str, int]]:
    """Activations of one step of the meta-device ``model``, counted as :func:`measure_memory`
    counts them: its forward runs on meta tensors (shapes only, no arithmetic) under the same
    ``saved_tensors_hooks``, and the distinct storages the graph still holds at the end are
    summed. Any architecture transformers builds from a config works, and any method.

    Two things differ from a CPU run and are put right: on the meta device, SDPA would take its
    "math" path (which keeps the attention probabilities), so each call takes the kernel the CPU
    picks for the same shapes, dtype, mask and dropout (``torch._fused_sdp_choice``, FlashAttention
    for the CPU in most cases); and transformers' mask code reads values (is the mask all ones? are
    the rows packed?), which meta tensors do not have, so it is told that it is being traced, as
    under torch.compile: it then builds the mask a padded batch gets (``padded``) and takes the
    rows as unpacked (they are: one sequence each)."""
    from unittest import mock

    from transformers import masking_utils

    def key(t: Tensor) -> int:  # meta storages have no address; their StorageImpl is the identity
        return t.untyped_storage()._cdata

    saved = SavedTensors(key, {key(p) for p in model.parameters()} | {key(b) for b in model.buffers()})
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta") if is_classifier(model) else ids
    mask = torch.ones(batch, seq_len, dtype=torch.long, device="meta") if padded else None  # values unread
    was_training, impl = model.training, getattr(model.config, "_attn_implementation", None)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        if attn == "eager" and impl is not None:  # "sdpa" is the default; models that cannot
            model.config._attn_implementation = attn  # use it (Gemma 2's soft-capping) chose eager
        real = getattr(masking_utils, "is_tracing", None)
        tracing = mock.patch.object(masking_utils, "is_tracing", lambda t=None: (
            isinstance(t, Tensor) and t.device.type == "meta") or real(t)) if real else mock.patch.dict({})
        with tracing, _CpuAttentionOnMeta(), saved.hooks():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # holds the graph
        total = saved.held_bytes()
        del loss
    finally:
        model.train(was_training)
        if impl is not None:
            model.config._attn_implementation = impl
    return total, {"traced": total}


class _CpuAttentionOnMeta(torch.overrides.TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors runs the kernel the CPU would choose."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention or args[0].device.type != "meta":
            return func(*args, **kwargs)
        q, k, v = args[:3]
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        options = dict(zip(names, args[3:])) | kwargs
        mask, p = options.get("attn_mask"), float(options.get("dropout_p", 0.0))
        causal, scale, gqa = bool(options.get("is_causal", False)), options.get("scale"), options.get("enable_gqa", False)

        def standin(t: Tensor) -> Tensor:  # same heads, head size and dtype; two positions
            return torch.zeros(1, *t.shape[1:-2], 2, t.shape[-1], dtype=t.dtype, requires_grad=t.requires_grad)

        small_mask = None if mask is None else torch.ones((1,) * (mask.dim() - 2) + (2, 2), dtype=mask.dtype)
        choice = torch._fused_sdp_choice(standin(q), standin(k), standin(v), small_mask, p, causal,
                                         scale=scale, enable_gqa=gqa)
        if choice == torch.nn.attention.SDPBackend.FLASH_ATTENTION.value:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, p, causal, attn_mask=mask, scale=scale)[0]
        return func(*args, **kwargs)
