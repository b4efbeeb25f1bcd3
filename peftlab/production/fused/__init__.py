"""peftlab's fused production path: LoRA, DoRA and the language-model loss as hand-written
``torch.autograd.Function``s (``peftlab.adapt(model, "lora", backend="fused")``).

The idea is Unsloth's (https://github.com/unslothai/unsloth, "manual autograd"): autograd is
general, so a LoRA layer written as ``base(x) + (x Aᵀ) Bᵀ · s`` builds several graph nodes, keeps
intermediates and runs a few extra kernels per layer. Writing forward AND backward by hand, for the
one case that matters (frozen W, trainable A and B), gives

    forward   y  = x Wᵀ + b  (+)=  s · (x Aᵀ) Bᵀ          one matmul, then addmm_ into it
    backward  dx = dy W + s · (dy B) A                   W never gets a gradient
              dA = s · (dy B)ᵀ x        (r, d_in)
              dB = s · dyᵀ (x Aᵀ)       (d_out, r)         x Aᵀ is r wide: saved, not recomputed

Saved for backward: x (needed for dA anyway) and x Aᵀ (r columns). A 4-bit base (bitsandbytes
``Linear4bit`` or peftlab's ``Linear4bitRef``) is dequantised in forward and again in backward,
so no dense copy of W outlives either pass (QLoRA, Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314). DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) is
the same with the output scaled by f = m / ||W + s·BA||_c (a constant to autograd, section 4.3):

    y = f ⊙ z + b,  z = x Wᵀ + s (x Aᵀ) Bᵀ;   g = f ⊙ dy;  dm = Σ_tokens (dy ⊙ z) / ||W + s·BA||_c
    dx = g W + s (g B) A,   dA = s (g B)ᵀ x,   dB = s gᵀ (x Aᵀ)

The loss. A causal LM's last step turns (tokens, hidden) into (tokens, vocabulary) logits: for
SmolLM2 and 4 x 128 tokens that is 512 x 49,152 floats (100 MB), then its softmax and its gradient
as big again. ``linear_cross_entropy`` walks the tokens in chunks and, inside the forward loop,
forms each chunk's logits, its loss AND its gradient (softmax - one-hot), turns that into
d(hidden) = dlogits · W_head right away, and drops the chunk: no full logits tensor, and no second
pass over the 49k-wide head in backward (Liger Kernel's "fused linear cross-entropy",
https://arxiv.org/abs/2410.10989). Since the loss is a scalar, backward only multiplies the stored
d(hidden) by the incoming gradient.

The MLP. Llama-style models compute down(silu(gate(x)) * up(x)); autograd keeps gate, silu(gate)
and up for backward, and their product too when down_proj has LoRA. :class:`SwiGLUFunction` keeps
only gate and up and recomputes the rest (elementwise, cheap) in backward: one or two fewer
(tokens x intermediate) tensors per layer, the largest activations of the model. It runs whether
down_proj carries LoRA or is a frozen (full-precision or 4-bit) layer.

The norms. Llama-style RMSNorm (y = w ⊙ x / rms(x)) is five elementwise steps that autograd
replays one by one in backward; :class:`RMSNormFunction` writes the gradient in two passes and
keeps only x and one float per row.

The matmuls. On x86 CPUs the Functions' float32 matmuls go through oneDNN (bundled with PyTorch as
"mkldnn") instead of MKL's sgemm, which PyTorch uses for ``@``: on the shapes of a small Llama it
measured 10-60% faster where its AVX-512 kernels run, the LM head most of all, and slower than MKL
with AVX2 only: the default follows that rule (:func:`dense_linear`, ``onednn_is_faster``;
``USE_ONEDNN = True / False`` forces it). Together with the loss, this is where the fused step wins back what LoRA's thin
matmuls cost: on a 2-core CPU the base model's own matmuls are ~75% of a training step.

Installed by :func:`fuse`: each ``AdaptedLayer`` becomes a :class:`FusedAdaptedLayer` (same
parameters, same names, so saving, loading, merging, the peft weight bridge and spectra work
unchanged), SwiGLU MLPs and RMSNorms get the fused forwards above, and the model's ``forward`` is wrapped so
that ``model(input_ids=..., labels=...)`` -- what transformers' Trainer and TRL call -- computes
its loss the fused way. With labels, ``outputs.logits`` is then ``None`` (the point is never to
build them); without labels the model returns full logits as usual. Code that needs logits and
loss from one call (TRL's token-accuracy metrics, label smoothing in Trainer) should call
:func:`remove_fused_loss` (or ``fuse(model, loss=False)``) first.

Anything the fused layer does not cover falls back to the reference forward, layer by layer:
several active adapters, merged or disabled adapters, LoRA on embeddings, trainable base weights,
autocast, forward hooks on the base layer, base layers of other types; the SwiGLU fusion also
steps aside while down_proj's LoRA dropout is active. Results agree with the reference path to
float32 rounding (tests: atol 1e-5 + rtol 1e-4 on tiny models); with dropout the same random mask
is drawn (dropout runs outside the Function, through the adapter's own ``nn.Dropout``). When the
adapter's dtype differs from the base's compute dtype (bf16 base, fp32 adapters), LoRA computes
its branch in the adapter's dtype as the reference does; DoRA computes in the base's compute dtype
(bf16 rounding: gradients within a few percent of the reference).

Where each piece lives (one file per fused op, as Unsloth's ``kernels/``; every backward's
docstring writes out the chain rule it implements):

    base.py           BasePlan: how a Function reaches the frozen W (view, transpose, dequantise)
    matmul.py         dense_linear: x Wᵀ through oneDNN on x86 CPUs; USE_ONEDNN, ONEDNN_MIN_MACS
    lora.py           LoRAFunction, and the LoRA branch shared with DoRA and SwiGLU
    dora.py           DoRAFunction
    layer.py          FusedAdaptedLayer: runs the Functions, or the reference forward
    swiglu.py         SwiGLUFunction and the fused MLP forward
    rmsnorm.py        RMSNormFunction and the fused norm forward
    cross_entropy.py  LinearCrossEntropyFunction, linear_cross_entropy
    loss_hook.py      install_fused_loss / remove_fused_loss: the loss inside model(..., labels=...)
    install.py        fuse / unfuse: the whole model to the fused backend and back
    wrap.py           replacing a module's forward in place, and when that is safe
"""

from __future__ import annotations

import sys
import types

from peftlab.production.fused import matmul
from peftlab.production.fused.base import BasePlan, base_plan
from peftlab.production.fused.cross_entropy import (DEFAULT_CHUNK_ELEMENTS, IGNORE_INDEX,
                                                    LinearCrossEntropyFunction, causal_lm_targets,
                                                    default_chunk_rows, linear_cross_entropy)
from peftlab.production.fused.dora import DoRAFunction
from peftlab.production.fused.install import FUSED_METHODS, check_fusable_method, fuse, unfuse
from peftlab.production.fused.layer import FusedAdaptedLayer
from peftlab.production.fused.lora import LoRAFunction
from peftlab.production.fused.loss_hook import (has_fused_loss, install_fused_loss, loss_can_fuse,
                                                remove_fused_loss)
from peftlab.production.fused.matmul import dense_linear
from peftlab.production.fused.rmsnorm import RMSNormFunction, fused_rms_norm_forward, is_rms_norm
from peftlab.production.fused.swiglu import SwiGLUFunction, is_swiglu_mlp
from peftlab.production.fused.wrap import wrap_forward

# the names these two had when the fused path was one module (tests/test_fused.py uses them)
_wrap_forward = wrap_forward
_fused_rms_norm_forward = fused_rms_norm_forward


class _FusedPackage(types.ModuleType):
    """This package, with the oneDNN switches passed through to :mod:`~peftlab.production.fused.matmul`
    (where :func:`dense_linear` reads them): ``peftlab.production.fused.USE_ONEDNN = False`` turns
    oneDNN off as it did when the fused path was one module."""

    USE_ONEDNN = property(lambda self: matmul.USE_ONEDNN,
                          lambda self, value: setattr(matmul, "USE_ONEDNN", value))
    ONEDNN_MIN_MACS = property(lambda self: matmul.ONEDNN_MIN_MACS,
                               lambda self, value: setattr(matmul, "ONEDNN_MIN_MACS", value))


sys.modules[__name__].__class__ = _FusedPackage


__all__ = [
    "FUSED_METHODS",
    "BasePlan",
    "base_plan",
    "LoRAFunction",
    "DoRAFunction",
    "FusedAdaptedLayer",
    "RMSNormFunction",
    "dense_linear",
    "LinearCrossEntropyFunction",
    "linear_cross_entropy",
    "default_chunk_rows",
    "causal_lm_targets",
    "install_fused_loss",
    "remove_fused_loss",
    "has_fused_loss",
    "loss_can_fuse",
    "fuse",
    "unfuse",
    "check_fusable_method",
]
