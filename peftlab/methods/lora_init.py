"""LoRA starts chosen from the layer instead of at random: PiSSA, OLoRA, LoRA-GA, CorDA (EVA: lora_eva.py).

Plain LoRA starts at B A = 0 with a random A, so its first steps only grow B. These inits put
the adapter on directions that matter from step 0 and take what it starts with out of the frozen
weight, so the adapted model still starts exactly at the pretrained one:

        W_res = W - s · B0 A0          (frozen; it replaces W in the base layer)
        h     = W_res x + s · B A x    = W x at init  (s = scaling = alpha / r)

- PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
  Large Language Models", https://arxiv.org/abs/2404.02948): the adapter takes W's r principal
  singular triplets, the residual keeps the rest of the spectrum:

        W = U S Vᵀ,   B0 = U_r √(S_r / s),   A0 = √(S_r / s) V_rᵀ,   so  s B0 A0 = U_r S_r V_rᵀ

  ``init="pissa_niter_K"`` finds U_r, S_r, V_r with K subspace iterations of a randomized SVD
  (``torch.svd_lowrank``, Halko et al. 2011), much faster on large W and not bit-exact.
- OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
  https://arxiv.org/abs/2406.01775): a QR decomposition instead of an SVD,

        W = Q R,   B0 = Q[:, :r] (orthonormal columns),   A0 = R[:r, :],   W_res = W - s B0 A0

  (as in peft, B0 A0 is not divided by s: the residual loses s · Q_r R_r).
- LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
  https://arxiv.org/abs/2407.05000): the first step of LoRA should move W the way the first step
  of full fine-tuning would. With G = the mean gradient of the loss with respect to W over a few
  batches, G ≈ U S Vᵀ (randomized SVD, q = min(4r, d) columns),

        A0 = V[:, :r]ᵀ,   B0 = U[:, r:2r] diag(S[r:2r])        (direction "ArB2r", peft's default)

  then B0 is scaled ("stable": by d_out^¼ / √γ); see :func:`lora_ga_factors` for the other
  directions and scales. The gradients come from data: peftlab/methods/lora_data_init.py.
- CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
  Models", https://arxiv.org/abs/2406.05223): an SVD of W shaped by the covariance C = mean XᵀX of
  the layer's inputs on a few rows of data (each row scaled by its largest value), C damped to
  C + λI (λ doubled until the inverse is accurate):

        W C = U S Vᵀ,   V_C = C⁻¹ V,   A0 = √(S_r / s) V_C,rᵀ,   B0 = U_r √(S_r / s)

  "ipm" takes the r largest triplets (the task's context), "kpm" the r smallest (W's knowledge
  stays in the frozen residual).

The residual is computed in fp32 and stored in the base weight's dtype, as peft does. These inits
need a full-precision linear base (nn.Linear, or transformers' Conv1D for PiSSA and LoRA-GA).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError

WEIGHT_INITS = ("pissa", "olora")  # need only the base weight
DATA_INITS = ("lora_ga", "eva", "corda")  # need a few batches of data (lora_data_init.py, lora_eva.py)
KNOWN_INITS = ("kaiming", "gaussian", "loftq") + WEIGHT_INITS + DATA_INITS
RESIDUAL_INITS = ("pissa", "olora", "lora_ga", "corda")  # replace W by W_res = W - s B0 A0
CORDA_METHODS = ("ipm", "kpm")
LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
_FAST_PISSA = re.compile(r"pissa_niter_([1-9][0-9]*)")


def check_init(init: object) -> None:
    """A LoRA init name peftlab knows: one of KNOWN_INITS, or "pissa_niter_K" with K >= 1."""
    if init in KNOWN_INITS or (isinstance(init, str) and _FAST_PISSA.fullmatch(init)):
        return
    raise ConfigError(
        f"LoRA init={init!r} is not known. Expected one of {', '.join(repr(i) for i in KNOWN_INITS)}, "
        "or 'pissa_niter_K' (fast randomized-SVD PiSSA, K >= 1 iterations; try 'pissa_niter_4')."
    )


def init_family(init: str) -> str:
    """The init's name without PiSSA's iteration count: "pissa_niter_4" -> "pissa"."""
    return "pissa" if _FAST_PISSA.fullmatch(init) else init


def changes_base(init: str) -> bool:
    """Whether the init replaces the base weight W by the residual W - s B0 A0."""
    return init_family(init) in RESIDUAL_INITS


@torch.no_grad()
def pissa(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(A0 (r, d_in), B0 (d_out, r), W_res (d_out, d_in)) for W (d_out, d_in), all fp32: the exact SVD,
    or ``niter`` iterations of torch.svd_lowrank (peft's "pissa_niter_K")."""
    W = weight.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # W = U diag(S) Vh
        U_r, S_r, Vh_r = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        U_r, S_r, V_r = torch.svd_lowrank(W, r, niter=niter)  # W ≈ U_r diag(S_r) V_rᵀ
        S_r, Vh_r = S_r / scaling, V_r.t()
    A = torch.diag(torch.sqrt(S_r)) @ Vh_r  # (r, d_in)
    B = U_r @ torch.diag(torch.sqrt(S_r))  # (d_out, r)
    return A, B, W - scaling * B @ A


@torch.no_grad()
def olora(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A0 = R[:r] (r, d_in), B0 = Q[:, :r] (d_out, r), W_res) from W = Q R, all fp32."""
    W = weight.float()
    Q, R = torch.linalg.qr(W)  # Q (d_out, k), R (k, d_in), k = min(d_out, d_in)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, W - scaling * B @ A


@torch.no_grad()
def lora_ga_factors(grad: Tensor, weight: Tensor, r: int, scaling: float, direction: str = "ArB2r",
                    scale: str = "stable", stable_gamma: float = 16) -> tuple[Tensor, Tensor]:
    """(A0 (r, d_in), B0 (d_out, r)) from the mean gradient G (d_out, d_in) of the loss w.r.t. W,
    as peft 0.21.2's ``lora_ga_init``. Uses torch.svd_lowrank (random: seed it to repeat)."""
    G = grad.float()
    U, S, V = torch.svd_lowrank(G, q=min(4 * r, min(G.shape)), niter=4)  # G ≈ U diag(S) Vᵀ
    U, S, Vh = U[:, :2 * r], S[:2 * r], V.t()[:2 * r]
    picks = {"ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),  # (A's indices, B's indices)
             "A2rBr": (slice(r, 2 * r), slice(0, r)), "ArB2r": (slice(0, r), slice(r, 2 * r))}
    if direction == "random":
        index = torch.randperm(2 * r)[:r]
        a_index = b_index = index
    else:
        a_index, b_index = picks[direction]
    A, S_B = Vh[a_index], S[b_index]
    B = U[:, b_index] @ torch.diag(S_B)
    if scale == "stable":  # keeps the update's size independent of the width d_out
        B = B * (G.shape[0] ** 0.25) / math.sqrt(stable_gamma)
    elif scale == "weight_svd":  # B's top singular value becomes W's
        top = torch.svd_lowrank(weight.float(), q=r, niter=4)[1][0]
        if S_B[0] > 0:
            B = B * (top / S_B[0])
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A, B


@torch.no_grad()
def corda_factors(weight: Tensor, covariance: Tensor, r: int, scaling: float, mode: str = "ipm") -> tuple[Tensor, Tensor]:
    """(A0 (r, d_in), B0 (d_out, r)) from W (d_out, d_in) and its inputs' covariance C (d_in, d_in),
    as peft 0.21.2's collect_eigens_for_layer, crop_corda_eigens and corda_init."""
    W, C = weight.float(), covariance.float()
    damp = 0.01
    while True:  # C + λI, λ = damp · mean(diag C), until (C + λI)(C + λI)⁻¹ is close to I
        fixed = C + torch.diag(torch.ones(C.size(0)) * torch.mean(torch.diag(C)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, torch.eye(C.size(0))).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    V = (Vh @ inverse).transpose(0, 1)  # (d_in, k)
    keep = slice(None, r) if mode == "ipm" else slice(-r, None)
    U, S, V = U[:, keep], S[keep] / scaling, V[:, keep]
    return V.t().mul(S.sqrt().view(-1, 1)).contiguous(), U.mul(S.sqrt()).contiguous()


def _base_weight(base: nn.Module, adapter: nn.Module, init: str) -> tuple[nn.Parameter, bool]:
    """The base layer's weight and whether it is stored transposed; refuses what these inits cannot start."""
    weight = getattr(base, "weight", None)
    kind = type(base).__name__
    if getattr(adapter, "is_embedding", False) or weight is None or weight.dim() != 2:
        raise ConfigError(f"LoRA init={init!r} starts from a linear layer's weight; got a {kind} (peft has "
                          "no such init for embeddings or convolutions either). Expected nn.Linear targets; "
                          "try targets that name linear layers, or init='kaiming' for these.")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or getattr(weight, "quant_state", None) is not None:
        raise ConfigError(f"LoRA init={init!r} needs the full-precision base weight W, but it is {weight.dtype} "
                          "(a quantised base keeps only an approximation of W). Expected float32, float16 or "
                          "bfloat16; try initialising on the unquantised model, then quantise the residual.")
    transposed = bool(getattr(adapter, "transposed", False))
    if transposed and init == "olora":
        raise ConfigError("init='olora' on transformers' Conv1D (GPT-2 style, W stored as (d_in, d_out)) is not "
                          "supported: peft 0.21.2 decomposes the stored W and builds a B of the wrong shape. "
                          "Expected nn.Linear targets; try init='pissa', which handles Conv1D.")
    return weight, transposed


@torch.no_grad()
def init_from_weight(base: nn.Module, adapter: nn.Module, init: str, grad: Tensor | None = None,
                     ga: dict | None = None, covariance: Tensor | None = None, mode: str = "ipm") -> None:
    """Start one LoRA ``adapter`` (lora_A, lora_B, r, scaling) with PiSSA, OLoRA, LoRA-GA (given the
    gradient ``grad`` and its settings ``ga``) or CorDA (given the inputs' ``covariance`` and
    ``mode``), and put W_res in ``base``, in place."""
    family = init_family(init)
    weight, transposed = _base_weight(base, adapter, family)
    W = weight.T if transposed else weight  # (d_out, d_in)
    r, s = adapter.r, adapter.scaling
    if family == "pissa":
        match = _FAST_PISSA.fullmatch(init)
        A, B, residual = pissa(W, r, s, niter=int(match.group(1)) if match else None)
    elif family == "olora":
        A, B, residual = olora(W, r, s)
    elif family == "lora_ga" and grad is not None:
        A, B = lora_ga_factors(grad.T if transposed else grad, W, r, s, **(ga or {}))
        A, B = A.to(weight.dtype), B.to(weight.dtype)  # peft: the offset uses the stored-precision factors
        residual = W.float() - s * (B.float() @ A.float())
    elif family == "corda" and covariance is not None:
        A, B = corda_factors(W, covariance, r, s, mode)
        residual = W.float() - s * B @ A
    else:
        raise ConfigError(f"init_from_weight cannot start init={init!r}. Expected 'pissa', 'pissa_niter_K', "
                          "'olora', or 'lora_ga' with a gradient.")
    adapter.lora_A.data = A.to(adapter.lora_A.dtype).contiguous()
    adapter.lora_B.data = B.to(adapter.lora_B.dtype).contiguous()
    residual = residual.to(weight.dtype)
    weight.data = (residual.T if transposed else residual).contiguous()
