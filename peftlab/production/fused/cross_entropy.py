"""The chunked fused linear + cross-entropy loss of a causal LM's last step.

A causal LM's last step turns (tokens, hidden) into (tokens, vocabulary) logits: for SmolLM2 and
4 x 128 tokens that is 512 x 49,152 floats (100 MB), then its softmax and its gradient as big
again. :func:`linear_cross_entropy` walks the tokens in chunks and, inside the forward loop, forms
each chunk's logits, its loss AND its gradient (softmax - one-hot), turns that into
d(hidden) = dlogits · W_head right away, and drops the chunk: no full logits tensor, and no second
pass over the 49k-wide head in backward (Liger Kernel's "fused linear cross-entropy",
https://arxiv.org/abs/2410.10989). Since the loss is a scalar, backward only multiplies the stored
d(hidden) by the incoming gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from peftlab.errors import ConfigError
from peftlab.production.fused.matmul import dense_linear

IGNORE_INDEX = -100  # transformers' and PyTorch's label value for "no target here"
# fp32 logits per loss chunk: 8M floats = 32 MB (plus as much again inside logsumexp)
DEFAULT_CHUNK_ELEMENTS = 2**23


class LinearCrossEntropyFunction(torch.autograd.Function):
    """scale · Σ_i CE(h_i Wᵀ + b, t_i) over rows i, logits built a chunk of rows at a time.

    The gradients are formed inside the forward loop (the loss is a scalar, so backward only
    rescales them): d(logits) = scale · (softmax - one-hot), dh = d(logits) W, dW = d(logits)ᵀ h.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                scale: Tensor, chunk_rows: int) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = db = None
        if need_w:  # a trainable head (rare with adapters): dW accumulates in fp32
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_b:
            db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows]  # (c, H)
            t = targets[start:start + chunk_rows]  # (c,)
            logits = dense_linear(h, weight, bias).float()  # (c, V): upcast as transformers does
            lse = torch.logsumexp(logits, dim=1)  # (c,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:  # scale · softmax = exp(logits - lse + log scale)
                grad = logits.sub_((lse - scale.log())[:, None]).exp_()  # in the logits' buffer
                grad[torch.arange(t.numel(), device=t.device), t] -= scale  # minus scale · one-hot
                grad = grad.to(weight.dtype)
                if need_h:
                    dh[start:start + chunk_rows] = dense_linear(grad, weight.T)  # (c, H)
                if need_w:
                    dw.addmm_(grad.T.float(), h.float())
                if need_b:
                    db += grad.sum(0, dtype=torch.float32)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(dh, dw, db)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        """The chain rule, its inner part done in forward. With ℓ = h Wᵀ + b (the chunk's logits),
        L = scale · Σ_i (logsumexp(ℓ_i) - ℓ_i[t_i]) and γ = grad_loss (a scalar):

            dL/dℓ = scale · (softmax(ℓ) - one-hot(t))   formed chunk by chunk in forward
            dh    = γ · (dL/dℓ) W                       (rows, H)
            dW    = γ · (dL/dℓ)ᵀ h                      (V, H), only for a trainable head
            db    = γ · Σ_rows dL/dℓ                    (V,)

        so backward only multiplies the stored dh, dW, db by γ (and casts to the inputs' dtypes).
        """
        dh, dw, db = ctx.saved_tensors
        dh = None if dh is None else dh * grad_loss.to(dh.dtype)
        dw = None if dw is None else (dw * grad_loss).to(ctx.dtypes[0])
        db = None if db is None else (db * grad_loss).to(ctx.dtypes[1])
        return dh, dw, db, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets)`` without the full logits tensor.

    Args:
        hidden: (..., H) final hidden states, one row per target.
        weight: (V, H) output embedding (the LM head); bias (V,) if it has one.
        targets: (...) token ids; ``ignore_index`` rows are skipped entirely (no matmul).
        num_items_in_batch: as in transformers' loss: divide the summed loss by this instead of
            by the number of targets (gradient accumulation over micro-batches).
        chunk_size: rows per chunk; default ~8M logits per chunk (e.g. 170 rows for 49k vocab).

    Returns:
        The mean (or summed / num_items_in_batch) loss, a float32 scalar.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).to(flat_h.device)
    if flat_t.numel() != flat_h.shape[0]:
        raise ConfigError(
            f"linear_cross_entropy got {flat_h.shape[0]} hidden rows but {flat_t.numel()} "
            "targets. Expected one target per row; check the label shift."
        )
    keep = (flat_t != ignore_index).nonzero().squeeze(1)
    rows, kept = flat_h.index_select(0, keep), flat_t.index_select(0, keep)  # only real targets
    if num_items_in_batch is None:
        denominator = torch.tensor(float(keep.numel()), device=flat_h.device)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=flat_h.device).float()
    scale = 1.0 / denominator  # 0 targets: inf scale, nan loss -- as F.cross_entropy's mean
    chunk = chunk_size or default_chunk_rows(weight.shape[0])
    if not torch.is_grad_enabled():  # evaluation: loss only, no gradient work in the loop
        rows, weight, bias = rows.detach(), weight.detach(), None if bias is None else bias.detach()
    return LinearCrossEntropyFunction.apply(rows, weight, bias, kept, scale, chunk)


def default_chunk_rows(vocab: int) -> int:
    """Rows per loss chunk when none is given: ~``DEFAULT_CHUNK_ELEMENTS`` logits per chunk."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab)


def causal_lm_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token targets for every position, as transformers' ``ForCausalLMLoss`` makes them:
    position t predicts labels[t + 1]; the last position has no target."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


__all__ = ["IGNORE_INDEX", "DEFAULT_CHUNK_ELEMENTS", "LinearCrossEntropyFunction", "linear_cross_entropy",
           "default_chunk_rows", "causal_lm_targets"]
