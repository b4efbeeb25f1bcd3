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
measured 10-60% faster, the LM head most of all (:func:`dense_linear`; ``USE_ONEDNN = False``
turns it off). Together with the loss, this is where the fused step wins back what LoRA's thin
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
"""

from __future__ import annotations

import functools
import inspect
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, adapted_layers, is_conv1d, is_quantized
from peftlab.methods.dora import DoRA
from peftlab.methods.lora import LoRA
from peftlab.quant.nf4 import Linear4bitRef, dequantize_4bit
from peftlab.state import state_of

# methods whose adapters have a fused kernel here (others would gain nothing from backend="fused")
FUSED_METHODS = ("lora", "dora")
IGNORE_INDEX = -100  # transformers' and PyTorch's label value for "no target here"
# fp32 logits per loss chunk: 8M floats = 32 MB (plus as much again inside logsumexp)
DEFAULT_CHUNK_ELEMENTS = 2**23


# --------------------------------------------------------------------------------------------
# The base layer, seen as "give me W (d_out, d_in) in the compute dtype"
# --------------------------------------------------------------------------------------------
@dataclass
class BasePlan:
    """How the fused Function reaches a frozen base layer."""

    weight: Callable[[], Tensor]  # () -> W, (d_out, d_in) in `dtype`: a view, or a fresh dequant
    bias: Tensor | None  # (d_out,) in `dtype`, or None
    dtype: torch.dtype  # compute dtype of the matmuls
    out_dtype: torch.dtype  # dtype the base layer returns


def base_plan(base: nn.Module, x: Tensor) -> BasePlan | None:
    """A :class:`BasePlan` for ``base`` and input ``x``, or None where the fused path does not
    apply (then the reference forward runs): unknown layer types, trainable base weights, hooks."""
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return None  # someone (accelerate, a user) expects the base forward to run
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return None
    if isinstance(base, Linear4bitRef):  # peftlab's NF4 layer: codes and scales in buffers
        dtype = base.compute_dtype or x.dtype
        return BasePlan(lambda: dequantize_4bit(base.packed, base.state, dtype), _cast(bias, dtype),
                        dtype, x.dtype)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    if is_quantized(weight) and hasattr(base, "compute_type_is_set"):  # bitsandbytes Linear4bit
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return None  # repacked for an inference-only CPU kernel: let bitsandbytes handle it
        import bitsandbytes.functional as bnbf

        if not base.compute_type_is_set:  # bitsandbytes' own rule, on the first forward
            base.set_compute_type(x)
            base.compute_type_is_set = True
        dtype = base.compute_dtype or x.dtype
        return BasePlan(lambda: bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype),
                        _cast(bias, dtype), dtype, x.dtype)
    if weight.requires_grad or not weight.is_floating_point() or x.dtype != weight.dtype:
        return None  # a trained base, or a dtype mix the base itself would refuse
    if type(base) is nn.Linear:
        return BasePlan(lambda: weight, bias, weight.dtype, weight.dtype)
    if is_conv1d(base):  # transformers' GPT-2 layer stores W as (d_in, d_out)
        return BasePlan(lambda: weight.T, bias, weight.dtype, weight.dtype)
    return None


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


# --------------------------------------------------------------------------------------------
# The big matmuls: x Wᵀ through oneDNN on CPU
# --------------------------------------------------------------------------------------------
# PyTorch sends a float32 CPU matmul to MKL's sgemm; the same build also carries oneDNN (PyTorch's
# "mkldnn"), whose fp32 GEMM measured 10-60% faster on the shapes of a small Llama (512 tokens x
# 576..49,152; `peftlab bench train` shows the effect on a whole step). The fused Functions run
# their matmuls through it: the frozen weights' (base forward, base input-gradient, LM head) and,
# in the layouts chosen below, LoRA's thin ones. The in-place adds into outputs (addmm_) stay on
# MKL. Set USE_ONEDNN = False to compare.
USE_ONEDNN = True
ONEDNN_MIN_MACS = 2**22  # below ~4M multiply-adds oneDNN's per-call cost (~20 us) outweighs its gain


@functools.cache
def _onednn_linear() -> Callable | None:
    """oneDNN's ``linear(x, W, b)`` (x Wᵀ + b), or None where this PyTorch build has none."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None  # on ARM, PyTorch's own matmul (Accelerate, OpenBLAS) is the faster one
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` = x weightᵀ + bias inside the fused Functions (no autograd):
    oneDNN for float32 on x86 CPUs above ``ONEDNN_MIN_MACS``, PyTorch's own matmul otherwise.
    ``weight`` may be a transposed view (``W.T`` gives dy W without a copy)."""
    op = _onednn_linear() if USE_ONEDNN else None
    if (op is None or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or x.numel() * weight.shape[0] < ONEDNN_MIN_MACS
            or (bias is not None and bias.dtype != torch.float32)):
        return F.linear(x, weight, bias)
    return op(x, weight, bias, "none", [], "")


def _add_lora(out: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """out += s (x Aᵀ) Bᵀ in place, in the adapter's dtype; returns x Aᵀ (N, r) for backward."""
    xa = dense_linear(x.to(lora_A.dtype), lora_A)  # (N, r)
    if xa.dtype == out.dtype:
        out.addmm_(xa, lora_B.T, alpha=scaling)
    else:
        out.add_(xa @ lora_B.T, alpha=scaling)  # summed in the wider dtype, rounded once
    return xa


def _lora_grads(g: Tensor, x: Tensor, xa: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                need_A: bool, need_B: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The adapter's side of a LoRA backward, from the gradient g (N, d_out) reaching
    s (x Aᵀ) Bᵀ: returns gB = g B (N, r), dA = s gBᵀ x (r, d_in), dB = s gᵀ (x Aᵀ) (d_out, r)."""
    g = g.to(lora_A.dtype)
    gB = dense_linear(g, lora_B.T)
    dA = dense_linear(gB.T, x.to(lora_A.dtype).T).mul_(scaling) if need_A else None
    dB = dense_linear(xa.T, g.T).mul_(scaling).T.contiguous() if need_B else None
    return gB, dA, dB


def _add_lora_input_grad(dx: Tensor, gB: Tensor, lora_A: Tensor, scaling: float) -> Tensor:
    """dx += s gB A in place (the LoRA branch's share of the input gradient)."""
    if dx.dtype == gB.dtype:
        return dx.addmm_(gB, lora_A, alpha=scaling)
    return dx.add_(gB @ lora_A, alpha=scaling)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
class LoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s (x_d Aᵀ) Bᵀ with a hand-written backward; x_d = dropout(x) or x.

    The base matmul runs in the base's compute dtype, the LoRA branch in the adapter's dtype (as
    the reference and peft do: a bf16 base with fp32 adapters adds an fp32 update, rounded once).
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_drop: Tensor | None, weight_fn: Callable[[], Tensor],
                bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        xd = x2 if x_drop is None else x_drop.reshape(-1, shape[-1])
        out = dense_linear(x2, weight_fn(), bias)  # (N, d_out); weight_fn() is W (d_out, d_in)
        xa = _add_lora(out, xd, lora_A, lora_B, scaling)  # += s · (x A^T) B^T, in place
        ctx.weight_fn, ctx.scaling, ctx.x_shape = weight_fn, scaling, shape
        ctx.has_drop = x_drop is not None
        ctx.save_for_backward(xd, xa, lora_A, lora_B)  # x itself is not needed: dx = dy W
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        xd, xa, lora_A, lora_B = ctx.saved_tensors
        need_x, need_xd, _, _, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        gB, dA, dB = _lora_grads(g, xd, xa, lora_A, lora_B, s, need_A, need_B)
        dx = dxd = None
        if need_x:
            dx = dense_linear(g, ctx.weight_fn().T)  # (N, d_in) = dy W; a 4-bit W is dequantised again
            if not ctx.has_drop:  # with dropout the LoRA branch's gradient goes to x_drop below
                _add_lora_input_grad(dx, gB, lora_A, s)
            dx = dx.view(ctx.x_shape)
        if ctx.has_drop and need_xd:
            dxd = (gB @ lora_A).mul_(s).to(xd.dtype).view(ctx.x_shape)
        return dx, dxd, None, None, dA, dB, None


# --------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------
class DoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + b + (f-1) ⊙ (x_d Wᵀ) + f ⊙ s (x_d Aᵀ) Bᵀ,  f = m / ||W + s·BA||_c (constant).

    Without dropout (x_d = x) this is y = f ⊙ z + b with z = x Wᵀ + s (x Aᵀ) Bᵀ: one big matmul.
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_drop: Tensor | None, weight_fn: Callable[[], Tensor],
                bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        weight = weight_fn()  # (d_out, d_in)
        # ||W + s·BA||_c per output unit, in fp32 like the reference (paper, section 4.3: no grad)
        norm = torch.linalg.vector_norm(
            torch.addmm(weight.float(), lora_B.float(), lora_A.float(), alpha=scaling), dim=1)
        factor = (magnitude.float() / norm).to(x.dtype)  # (d_out,)
        if x_drop is None:
            xd = x2
            z = dense_linear(x2, weight)  # (N, d_out)
            xa = _add_lora(z, x2, lora_A, lora_B, scaling)
            out = z * factor
            if bias is not None:
                out += bias
        else:  # the base sees x, the adapted direction sees dropout(x): two big matmuls
            xd = x_drop.reshape(-1, shape[-1])
            xa = dense_linear(xd, lora_A)
            update = (xa @ lora_B.T).mul_(scaling)  # (N, d_out)
            zb = dense_linear(xd, weight)  # W dropout(x)
            out = dense_linear(x2, weight, bias).addcmul_(zb, factor - 1).addcmul_(update, factor)
            z = zb.add_(update)
        ctx.weight_fn, ctx.scaling, ctx.x_shape = weight_fn, scaling, shape
        ctx.has_drop, ctx.magnitude_dtype = x_drop is not None, magnitude.dtype
        ctx.save_for_backward(xd, xa, z, lora_A, lora_B, factor, norm)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        xd, xa, z, lora_A, lora_B, factor, norm = ctx.saved_tensors
        need_x, need_xd, _, _, need_A, need_B, need_m, _ = ctx.needs_input_grad
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        g = dy2 * factor  # gradient reaching z
        gB, dA, dB = _lora_grads(g, xd, xa, lora_A, lora_B, s, need_A, need_B)
        dx = dxd = dm = None
        if need_m:  # y depends on m through f = m / norm only
            dm = ((dy2 * z).sum(0, dtype=torch.float32) / norm).to(ctx.magnitude_dtype)
        need_w = need_x or (ctx.has_drop and need_xd)
        weight = ctx.weight_fn() if need_w else None
        if not ctx.has_drop:
            if need_x:
                dx = _add_lora_input_grad(dense_linear(g, weight.T), gB, lora_A, s).view(ctx.x_shape)
        elif need_w:  # (the first layer's input may need no gradient at all)
            dy_w = dense_linear(dy2, weight.T)  # through the base path x W^T
            if need_xd:  # (f-1) ⊙ W x_d  and  f ⊙ s B A x_d
                dxd = dense_linear(g, weight.T).sub_(dy_w)
                dxd = _add_lora_input_grad(dxd, gB, lora_A, s).view(ctx.x_shape)
            if need_x:
                dx = dy_w.view(ctx.x_shape)
        return dx, dxd, None, None, dA, dB, dm, None


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
class FusedAdaptedLayer(AdaptedLayer):
    """An ``AdaptedLayer`` whose forward runs :class:`LoRAFunction` / :class:`DoRAFunction` when
    it can, and the reference forward otherwise. Same parameters and names as the reference."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        plan = base_plan(self.base_layer, x) if adapter is not None else None
        if plan is None:
            return super().forward(x, *args, **kwargs)
        dtype = plan.dtype
        x_c = x.to(dtype)
        dropout = adapter.dropout
        # dropout runs here, through the adapter's own module, so it draws the same mask as the
        # reference (same random calls in the same order); the Function gets both x and dropout(x)
        x_drop = dropout(x_c) if isinstance(dropout, nn.Dropout) and dropout.training else None
        if isinstance(adapter, DoRA):  # DoRA runs wholly in the base's compute dtype
            out = DoRAFunction.apply(x_c, x_drop, plan.weight, plan.bias, adapter.lora_A.to(dtype),
                                     adapter.lora_B.to(dtype), adapter.magnitude, adapter.scaling)
        else:
            out = LoRAFunction.apply(x_c, x_drop, plan.weight, plan.bias, adapter.lora_A,
                                     adapter.lora_B, adapter.scaling)
        return out.to(plan.out_dtype)

    def _fusable_adapter(self, x: Tensor, args: tuple, kwargs: dict) -> LoRA | DoRA | None:
        if args or kwargs or self.disabled or len(self.active) != 1 or self.merged:
            return None
        if getattr(self, "example_adapters", None) is not None:
            return None  # a mixed batch (peftlab.compose): the reference forward routes it
        if not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
            return None
        adapter = self.adapters[self.active[0]]
        if isinstance(adapter, DoRA) or (isinstance(adapter, LoRA) and not adapter.is_embedding
                                         and adapter.lora_B_bias is None):  # lora_bias: the reference runs it
            return adapter
        return None


# --------------------------------------------------------------------------------------------
# The SwiGLU MLP of Llama-style models: down(silu(gate(x)) * up(x)), LoRA on down or not
# --------------------------------------------------------------------------------------------
class SwiGLUFunction(torch.autograd.Function):
    """y = a Wᵀ + b [+ s (a Aᵀ) Bᵀ] with a = silu(g) ⊙ u, saving g and u but never a.

    Autograd would keep g (for silu), silu(g) and u (for the product), and a as well when
    down_proj carries LoRA (for dA): three or four (tokens x intermediate) tensors per layer, the
    largest activations of the model. a and silu(g) are cheap to recompute from g and u, so
    backward does that (Unsloth's fused SwiGLU does the same). ``lora_A`` and ``lora_B`` are None
    for a frozen down_proj without an adapter (LoRA on attention only, peftlab's default).
    """

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight_fn: Callable[[], Tensor],
                bias: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None,
                scaling: float) -> Tensor:
        shape = gate.shape
        g, u = gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])  # (N, I)
        a = F.silu(g).mul_(u)  # (N, I), dropped after forward
        out = dense_linear(a, weight_fn(), bias)  # (N, d_out)
        xa = None if lora_A is None else _add_lora(out, a, lora_A, lora_B, scaling)  # (N, r)
        ctx.weight_fn, ctx.scaling, ctx.shape = weight_fn, scaling, shape
        ctx.save_for_backward(g, u, xa, lora_A, lora_B)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        g, u, xa, lora_A, lora_B = ctx.saved_tensors
        need_g, need_u, _, _, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        silu = F.silu(g)  # recomputed: one elementwise pass instead of a saved tensor
        gB = dA = dB = None
        if lora_A is not None:
            a = silu * u if need_A else None  # recomputed likewise, for dA only
            gB, dA, dB = _lora_grads(dy2, a, xa, lora_A, lora_B, s, need_A, need_B)
        dg = du = None
        if need_g or need_u:
            da = dense_linear(dy2, ctx.weight_fn().T)  # (N, I)
            if gB is not None:
                _add_lora_input_grad(da, gB, lora_A, s)
            if need_u:
                du = (da * silu).view(ctx.shape)
            if need_g:  # silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))), in PyTorch's own kernel
                dg = torch.ops.aten.silu_backward(da.mul_(u), g).view(ctx.shape)
        return dg, du, None, None, dA, dB, None


_SWIGLU_LINE = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


@functools.cache
def _forward_contains(cls: type, code: str) -> bool:
    """True when ``cls.forward``'s source, whitespace removed, contains ``code``: transformers
    copies such modules verbatim across model files ("Copied from"), so matching the source is
    how the fused path knows that replacing the forward changes nothing but speed."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return code in "".join(source.split())


def _forward_is_swiglu(cls: type) -> bool:
    """Llama, Mistral, Qwen2/3, SmolLM2 and ~130 other model files share the SwiGLU line."""
    return _forward_contains(cls, _SWIGLU_LINE)


def is_swiglu_mlp(module: nn.Module) -> bool:
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    return (all(isinstance(p, nn.Module) for p in parts)
            and type(act).__name__ in ("SiLU", "SiLUActivation")
            and _forward_is_swiglu(type(module)))


def _fused_swiglu_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The wrapped MLP forward (bound to the MLP): same result, a and silu(g) never kept.

    down_proj may carry one fusable LoRA adapter (without active dropout: dropout(a) would need
    a itself) or be a frozen base layer; anything else runs the MLP's own forward."""
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    lora = plan = None
    if isinstance(down, FusedAdaptedLayer):
        adapter = down._fusable_adapter(gate, (), {})
        if isinstance(adapter, LoRA) and not (isinstance(adapter.dropout, nn.Dropout)
                                              and adapter.dropout.training):
            lora, plan = adapter, base_plan(down.base_layer, gate)
    elif not isinstance(down, AdaptedLayer) and not torch.is_autocast_enabled(gate.device.type):
        plan = base_plan(down, gate)  # a frozen down_proj (nn.Linear, 4-bit): no adapter
    if plan is None or up.dtype != gate.dtype:
        return down(self.act_fn(gate) * up)
    dtype = plan.dtype
    lora_A, lora_B, scaling = (None, None, 1.0) if lora is None else (lora.lora_A, lora.lora_B,
                                                                      lora.scaling)
    out = SwiGLUFunction.apply(gate.to(dtype), up.to(dtype), plan.weight, plan.bias, lora_A,
                               lora_B, scaling)
    return out.to(plan.out_dtype)


# --------------------------------------------------------------------------------------------
# RMSNorm: y = w ⊙ x / rms(x), with a hand-written backward
# --------------------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    """y = w ⊙ x · r,  r = 1 / sqrt(mean(x²) + eps) per row, for a frozen weight w.

    Autograd runs the forward's five elementwise steps backwards one by one (pow, mean, add,
    rsqrt, two products), keeping their outputs. By hand, with ĝ = dy ⊙ w:

        dx = r ĝ - x r³ mean(ĝ ⊙ x)

    saving only x and r (one float per row). Computed in float32 as transformers does.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, rstd, weight = ctx.saved_tensors
        xf = x.float()
        g = (dy * weight).float()
        dot = (g * xf).mean(-1, keepdim=True)  # mean(ĝ ⊙ x) per row
        dx = torch.addcmul(g.mul_(rstd), xf, dot.mul_(rstd.pow(3)), value=-1)
        return dx.to(x.dtype), None, None


_RMS_NORM_LINES = (  # transformers' LlamaRMSNorm.forward, shared by Mistral, Qwen2/3, SmolLM2, ...
    "hidden_states=hidden_states.to(torch.float32)"
    "variance=hidden_states.pow(2).mean(-1,keepdim=True)"
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
    "returnself.weight*hidden_states.to(input_dtype)"
)


def is_rms_norm(module: nn.Module) -> bool:
    """A Llama-style RMSNorm: transformers' exact forward, a weight and ``variance_epsilon``."""
    return (isinstance(getattr(module, "weight", None), Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and _forward_contains(type(module), _RMS_NORM_LINES))


def _fused_rms_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """The wrapped RMSNorm forward: :class:`RMSNormFunction` while the weight is frozen."""
    if self.weight.requires_grad or torch.is_autocast_enabled(hidden_states.device.type):
        return self._peftlab_unfused_forward(hidden_states)  # a trained norm: autograd's way
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


class _WrappedForward:
    """``module.forward`` replaced by ``impl(module, ...)``, showing the original's signature.

    The signature matters: transformers' Trainer reads ``inspect.signature(model.forward)`` to
    decide which dataset columns to keep and whether to pass ``num_items_in_batch``. A plain
    object (not a closure) so that ``copy.deepcopy(model)`` rebinds it to the copy.
    """

    def __init__(self, module: nn.Module, impl: Callable, original: Callable) -> None:
        self.module, self.impl, self.original = module, impl, original

    def __call__(self, *args, **kwargs):
        return self.impl(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original)


def _wrap_forward(module: nn.Module, forward: Callable) -> None:
    """Give ``module`` an instance-level forward, keeping the one it had to restore later."""
    if "_peftlab_unfused_forward" not in module.__dict__:
        module._peftlab_unfused_forward = module.forward
        module.forward = _WrappedForward(module, forward, module.forward)


def _unwrap_forward(module: nn.Module) -> None:
    original = module.__dict__.pop("_peftlab_unfused_forward", None)
    if original is None:
        return
    if getattr(original, "__func__", None) is type(module).forward:
        module.__dict__.pop("forward", None)  # back to the class's own method
    else:
        module.forward = original  # someone else's wrapper was there first: restore it


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Hooking the fused loss into model(input_ids=..., labels=...)
# --------------------------------------------------------------------------------------------
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
    _wrap_forward(model, _fused_loss_forward)
    model._peftlab_loss_chunk = chunk_size
    return model


def remove_fused_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`install_fused_loss`: the model computes full logits and its own loss again."""
    _unwrap_forward(model)
    return model


def has_fused_loss(model: nn.Module) -> bool:
    return "_peftlab_unfused_forward" in model.__dict__


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
    original = self._peftlab_unfused_forward
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


# --------------------------------------------------------------------------------------------
# Whole-model switches
# --------------------------------------------------------------------------------------------
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
            _wrap_forward(module, _fused_swiglu_forward)
        elif is_rms_norm(module):
            _wrap_forward(module, _fused_rms_norm_forward)
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
            _unwrap_forward(module)
    remove_fused_loss(model)
    state_of(model).backend = "reference"
    return model


def check_fusable_method(method: str) -> None:
    if method not in FUSED_METHODS:
        raise ConfigError(
            f"backend='fused' has kernels for {', '.join(FUSED_METHODS)}, not {method!r}. "
            "Expected one of those; try backend='reference' (or 'peft') for this method."
        )


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
