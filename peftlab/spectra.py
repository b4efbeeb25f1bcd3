"""Spectra of weight updates: how low-rank is what an adapter learned?

Every weight-space adapter changes a frozen weight W (d_out x d_in) by some ΔW. Its singular
values σ_1 >= σ_2 >= ... say how many directions the update really uses, and how strongly:

    ΔW = U diag(σ) V^T        U: (d_out, k)   σ: (k,)   V: (d_in, k)

For a factorised update ΔW = L R (LoRA: L = scaling · B, R = A) the SVD never needs the
d_out x d_in matrix. With thin QR factorisations L = Q1 R1 and R^T = Q2 R2,

    ΔW = Q1 (R1 R2^T) Q2^T,   and   R1 R2^T = Uc diag(σ) Vc^T   (a small k x k SVD)

so σ are the singular values of the k x k core, U = Q1 Uc and V = Q2 Vc. Cost: O((d_out + d_in)
k^2) instead of O(d_out d_in min(d_out, d_in)) — the difference between microseconds and seconds
for a 4096 x 4096 layer (``bench_spectra`` measures it).

Which route a layer takes (``adapter_singular_values``), first match wins:

1. the adapter has ``singular_values(base)``: it knows its spectrum in closed form (LoKr: the
   singular values of a Kronecker product are the products of the factors' singular values,
   see :func:`kronecker_singular_values`);
2. the adapter has ``factors()`` returning (left, right) with ΔW = left @ right in (d_out, d_in)
   layout (LoRA; AdaLoRA as (P Λ, Q); LoHa via :func:`hadamard_factors`);
3. otherwise a full SVD of ``delta_weight(base)``.

DoRA's ΔW = m ⊙ V / ||V||_c - W0 (V = W0 + s·B A) is full-rank: ``part="weight"`` (default) takes
that full SVD, ``part="direction"`` the spectrum of the direction update s·B A from its factors.

peft models work too: LoRA layers are read from ``lora_A``/``lora_B``/``scaling`` of the active
adapter (DoRA from its magnitude vector); other peft layers through ``get_delta_weight``.

The analyses follow the papers:

- effective rank: Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
  EUSIPCO 2007 (entropy of the normalised singular values), and the energy threshold rank;
- stable rank: ||ΔW||_F^2 / ||ΔW||_2^2 (Rudelson & Vershynin, 2007);
- subspace similarity φ(A1, A2, i, j) = ||U_i^T V_j||_F^2 / min(i, j) and the amplification
  factor ||ΔW||_F / ||U^T W V||_F: LoRA paper sections 7.2 and 7.3, Hu et al. 2021,
  https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, Adapter, dense_weight, is_conv1d, matches

# An update in (d_out, d_in) layout: either the explicit matrix ΔW or factors (left, right) with
# ΔW = left @ right, left (d_out, k), right (k, d_in).
Update = Tensor | tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# SVD of a factorised matrix, without forming it
# --------------------------------------------------------------------------------------------
def _work(t: Tensor) -> Tensor:
    """A detached copy in a dtype the linear-algebra kernels accept (float64 stays float64)."""
    t = t.detach()
    return t if t.dtype == torch.float64 else t.float()


def _core(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Q1, core, Q2) with left @ right = Q1 @ core @ Q2^T and core small (k1 x k2)."""
    left, right = _work(left), _work(right).to(left.device)
    q1, r1 = torch.linalg.qr(left)  # (d_out, k1), (k1, k)
    q2, r2 = torch.linalg.qr(right.T)  # (d_in, k2), (k2, k)
    return q1, r1 @ r2.T, q2  # core: (k1, k2)


def factored_svdvals(left: Tensor, right: Tensor) -> Tensor:
    """Singular values of ``left @ right`` (descending) from the factors alone.

    Args:
        left: (d_out, k) factor.
        right: (k, d_in) factor.

    Returns:
        min(d_out, d_in, k) singular values, descending; the remaining ones of the full matrix
        are exactly zero.
    """
    _, core, _ = _core(left, right)
    return torch.linalg.svdvals(core)


def factored_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vh) of ``left @ right`` without forming the d_out x d_in matrix."""
    q1, core, q2 = _core(left, right)
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return q1 @ uc, s, vhc @ q2.T  # (d_out, k), (k,), (k, d_in)


def hadamard_factors(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of the Hadamard product (b1 @ a1) * (b2 @ a2), as LoHa uses.

    The face-splitting identity (B1 A1) ⊙ (B2 A2) = (B1 •row B2) (A1 •col A2) gives a left factor
    of shape (d_out, r1 r2) and a right factor of shape (r1 r2, d_in): rank <= r1 · r2.
    """
    d_out, d_in = b1.shape[0], a1.shape[1]
    left = (b1[:, :, None] * b2[:, None, :]).reshape(d_out, -1)  # (d_out, r1 r2)
    right = (a1[:, None, :] * a2[None, :, :]).reshape(-1, d_in)  # (r1 r2, d_in)
    return left, right


def kronecker_singular_values(a: Tensor, b: Tensor) -> Tensor:
    """Singular values of kron(a, b), descending: all products σ_i(a) σ_j(b) (as LoKr uses)."""
    outer = torch.outer(torch.linalg.svdvals(_work(a)), torch.linalg.svdvals(_work(b)))
    return outer.flatten().sort(descending=True).values


def svd_of(update: Update) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vh) of an explicit ΔW or of factors (left, right)."""
    if isinstance(update, tuple):
        return factored_svd(*update)
    return torch.linalg.svd(_work(update), full_matrices=False)


def svdvals_of(update: Update) -> Tensor:
    """Singular values, descending, of an explicit ΔW or of factors (left, right)."""
    if isinstance(update, tuple):
        return factored_svdvals(*update)
    return torch.linalg.svdvals(_work(update))


# --------------------------------------------------------------------------------------------
# Reading the update of one adapted layer (reference and peft backends)
# --------------------------------------------------------------------------------------------
def _call_hook(hook: Any, base: nn.Module) -> Any:
    """Call ``factors()`` / ``singular_values()``, passing the base layer if the hook takes it
    (DoRA-like methods need the base weight; LoRA does not)."""
    return hook(base) if inspect.signature(hook).parameters else hook()


def _out_in(weight: Tensor, base: nn.Module, fan_in_fan_out: bool = False) -> Tensor:
    """A weight (or ΔW) of ``base`` in (d_out, d_in) layout: Conv1D and Embedding store it
    transposed."""
    transposed = fan_in_fan_out or is_conv1d(base) or isinstance(base, nn.Embedding)
    return weight.T if transposed else weight


def adapter_update(adapter: Adapter, base: nn.Module) -> Update:
    """A reference adapter's ΔW in (d_out, d_in) layout: its factors where it has them."""
    if hasattr(adapter, "factors"):
        left, right = _call_hook(adapter.factors, base)
        return left.detach(), right.detach()
    return _out_in(adapter.delta_weight(base).detach(), base)


def adapter_singular_values(adapter: Adapter, base: nn.Module) -> Tensor:
    """Singular values of one adapter's ΔW: its own hook, else its factors, else a full SVD."""
    if hasattr(adapter, "singular_values"):
        return _work(_call_hook(adapter.singular_values, base))
    return svdvals_of(adapter_update(adapter, base))


def _is_peft_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.") and hasattr(module, "get_delta_weight")


def _peft_update(layer: nn.Module, name: str) -> Update:
    """ΔW of one adapter of a peft tuner layer, in (d_out, d_in) layout."""
    base = layer.get_base_layer()
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    if name in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_embedding_A", {}):
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, d_in), (d_out, r)
        else:  # embedding: A (r, num_embeddings), B (dim, r): same roles, d_in = num_embeddings
            a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        left, right = _work(b) * layer.scaling[name], _work(a)
        magnitude = getattr(layer, "lora_magnitude_vector", {})
        if name not in magnitude:
            return left, right
        # DoRA: W' = m / ||W + s B A||_row · (W + s B A), so ΔW = W' - W is not low-rank
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise ConfigError(
                f"peft DoRA on a {type(base).__name__} layer normalises differently from the linear "
                "case peftlab reads. Expected DoRA on linear layers; try the spectrum of the "
                "reference backend (peftlab.adapt(model, 'dora', ...)) instead."
            )
        weight = _work(_out_in(dense_weight(base), base, fan_in_fan_out))  # (d_out, d_in)
        merged = weight + left @ right
        m = _work(magnitude[name].weight).reshape(-1, 1)  # (d_out, 1)
        return m / merged.norm(dim=1, keepdim=True) * merged - weight
    return _out_in(_work(layer.get_delta_weight(name)), base, fan_in_fan_out)


def _base_weight(layer: nn.Module) -> Tensor:
    """The frozen base weight of an adapted layer (either backend) in (d_out, d_in) layout."""
    if isinstance(layer, AdaptedLayer):
        return _work(_out_in(dense_weight(layer.base_layer), layer.base_layer))
    base = layer.get_base_layer()
    return _work(_out_in(dense_weight(base), base, bool(getattr(layer, "fan_in_fan_out", False))))


def _layer_update(layer: nn.Module, adapter_name: str | None = None) -> Update:
    if isinstance(layer, AdaptedLayer):
        name = adapter_name or layer.active[0]
        return adapter_update(layer.adapters[name], layer.base_layer)
    return _peft_update(layer, adapter_name or layer.active_adapters[0])


def _direction_update(layer: nn.Module, name: str) -> Update | None:
    """DoRA's direction update (s·B, A) of either backend; None for any other method."""
    if isinstance(layer, AdaptedLayer):
        adapter = layer.adapters[name]
        if not hasattr(adapter, "direction_factors"):
            return None
        left, right = adapter.direction_factors()
        return left.detach(), right.detach()  # already (d_out, r), (r, d_in), Conv1D included
    if name not in getattr(layer, "lora_magnitude_vector", {}) or name not in getattr(layer, "lora_A", {}):
        return None
    return _work(layer.lora_B[name].weight) * layer.scaling[name], _work(layer.lora_A[name].weight)


PARTS = ("weight", "direction")


def _layers(
    model: nn.Module, adapter_name: str | None, layers: str | Sequence[str] | None
) -> Iterator[tuple[str, nn.Module, str]]:
    """(module name, adapted layer, adapter name) for every layer carrying the adapter."""
    for name, module in model.named_modules():
        if layers is not None and not matches(name, layers):
            continue
        if isinstance(module, AdaptedLayer):
            chosen = adapter_name or (module.active[0] if module.active else None)
            if chosen in module.adapters and module.adapters[chosen].mergeable:
                yield name, module, chosen
        elif _is_peft_layer(module):
            chosen = adapter_name or (module.active_adapters[0] if module.active_adapters else None)
            if chosen is not None and any(chosen in getattr(module, attr, {})
                                          for attr in module.adapter_layer_names):
                yield name, module, chosen


@torch.no_grad()
def spectrum(
    model: nn.Module,
    adapter_name: str | None = None,
    layers: str | Sequence[str] | None = None,
    part: str = "weight",
) -> dict[str, Tensor]:
    """Singular values of ΔW for every adapted layer: ``{layer name: 1-D tensor, descending}``.

    Args:
        model: a model adapted with ``peftlab.adapt`` (either backend: a peft ``PeftModel`` works).
        adapter_name: which adapter; default the active one of each layer.
        layers: only these layers: a regex (full match) or a list of names / name suffixes,
            the same rule as ``targets``.
        part: ``"weight"``: the change of the effective weight W' - W0; ``"direction"``: for
            DoRA layers the low-rank direction update s·B A, from its factors (other methods
            have no separate direction, so both parts are the same for them).

    Returns:
        Names as in ``model.named_modules()``. A factorised update gives k values (k = its
        inner rank, r for LoRA; every further singular value of ΔW is exactly zero); a full SVD
        gives min(d_out, d_in). float32 (float64 stays float64), on the CPU.
    """
    if part not in PARTS:
        raise ConfigError(f"Unknown part={part!r}. Expected one of {PARTS}: 'weight' (W' - W0) or "
                          "'direction' (DoRA's low-rank direction update s·B A).")
    out = {}
    for name, layer, chosen in _layers(model, adapter_name, layers):
        direction = _direction_update(layer, chosen) if part == "direction" else None
        if direction is not None:
            values = factored_svdvals(*direction)
        elif isinstance(layer, AdaptedLayer):
            values = adapter_singular_values(layer.adapters[chosen], layer.base_layer)
        else:
            values = svdvals_of(_peft_update(layer, chosen))
        out[name] = values.cpu()
    if not out:
        raise ConfigError(
            "Found no adapted layer with a weight update in this model"
            + (f" matching layers={layers!r}" if layers is not None else "")
            + (f" for adapter {adapter_name!r}" if adapter_name else "")
            + ". Expected a model returned by peftlab.adapt(...) with a weight-space method "
            "(LoRA, DoRA, LoHa, ...); prompt methods have no ΔW. Try peftlab.adapt(model, 'lora')."
        )
    return out


# --------------------------------------------------------------------------------------------
# One-number summaries of a spectrum
# --------------------------------------------------------------------------------------------
def _values(x: Tensor | Update) -> Tensor:
    """Singular values (float64, descending) of a 1-D spectrum, a matrix or factors."""
    if isinstance(x, Tensor) and x.ndim == 1:
        s = x.detach().double().abs()
        return s.sort(descending=True).values
    if isinstance(x, tuple) or (isinstance(x, Tensor) and x.ndim == 2):
        return svdvals_of(x).double()
    raise ConfigError(
        f"Expected singular values (1-D tensor), a matrix (2-D tensor) or factors (left, right); "
        f"got {type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}."
    )


def effective_rank(x: Tensor | Update, method: str = "entropy", threshold: float = 0.9) -> float:
    """How many directions the update uses.

    - ``"entropy"`` (Roy & Vetterli 2007): exp(H(p)) with p_i = σ_i / Σσ. Equals k for k equal
      singular values and 1 for a rank-1 matrix; fractional in between.
    - ``"energy"``: the smallest k whose top-k singular values hold ``threshold`` of the energy
      Σσ² (e.g. 90%).

    A zero update has effective rank 0.
    """
    s = _values(x)
    if s.numel() == 0 or s[0] == 0:
        return 0.0
    if method == "entropy":
        p = s / s.sum()
        p = p[p > 0]  # 0 · log 0 = 0
        return float(torch.exp(-(p * p.log()).sum()))
    if method == "energy":
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"threshold={threshold!r} is out of range. Expected a number in (0, 1].")
        share = (s**2).cumsum(0) / (s**2).sum()
        return float(int((share < threshold - 1e-12).sum()) + 1)
    raise ConfigError(f"Unknown effective-rank method {method!r}. Expected 'entropy' or 'energy'.")


def stable_rank(x: Tensor | Update) -> float:
    """||ΔW||_F^2 / ||ΔW||_2^2 = Σσ² / σ_1²: between 1 (one direction) and the rank; robust to
    tiny singular values, unlike the rank itself. A zero update gives 0."""
    s = _values(x)
    return float((s**2).sum() / s[0] ** 2) if s.numel() and s[0] > 0 else 0.0


def energy_share(x: Tensor | Update, k: int) -> float:
    """Share of the energy Σσ² held by the top-k singular values (1.0 if k >= the rank)."""
    s = _values(x)
    total = (s**2).sum()
    return float((s[:k] ** 2).sum() / total) if total > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Comparing subspaces (LoRA paper, section 7)
# --------------------------------------------------------------------------------------------
def _as_update(x: Tensor | Update | nn.Module) -> Update:
    if isinstance(x, nn.Module):
        if isinstance(x, AdaptedLayer) or _is_peft_layer(x):
            return _layer_update(x)
        raise ConfigError(
            f"Expected an adapted layer, a matrix or factors (left, right); got {type(x).__name__}."
        )
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return tuple(x)
    if isinstance(x, Tensor) and x.ndim == 2:
        return x
    raise ConfigError(
        f"Expected a matrix (2-D tensor), factors (left, right) or an adapted layer; got "
        f"{type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}."
    )


@torch.no_grad()
def subspace_similarity(
    a: Tensor | Update | nn.Module,
    b: Tensor | Update | nn.Module,
    i: int | None = None,
    j: int | None = None,
    side: str = "right",
) -> Tensor:
    """The grid φ(a, b, i', j') = ||U_i'^T V_j'||_F² / min(i', j') for i' <= i, j' <= j.

    U_i' are the top-i' singular vectors of ``a``, V_j' those of ``b``, on the ``side`` given.
    φ is 1 where one subspace contains the other and 0 where they are orthogonal; for random
    subspaces of R^d it is about max(i', j') / d. To reproduce the paper's Figure 3 pass the two
    LoRA ``A`` matrices (rank 8 and rank 64 runs of the same layer): it uses their right
    singular vectors. Matrices, factors (left, right) and adapted layers (their ΔW) all work.

    Returns:
        A (i, j) float tensor: entry [i'-1, j'-1] is φ(i', j'), ready for a heatmap.
    """
    if side not in ("right", "left"):
        raise ConfigError(f"side={side!r} is not known. Expected 'right' (inputs) or 'left' (outputs).")
    ua, sa, vha = svd_of(_as_update(a))
    ub, sb, vhb = svd_of(_as_update(b))
    basis_a = vha.T if side == "right" else ua  # (d, k_a)
    basis_b = vhb.T if side == "right" else ub  # (d, k_b)
    if basis_a.shape[0] != basis_b.shape[0]:
        raise ConfigError(
            f"The two updates live in different spaces: {side} dimension {basis_a.shape[0]} vs "
            f"{basis_b.shape[0]}. Expected the same layer (or layers of the same shape) adapted twice."
        )
    i = basis_a.shape[1] if i is None else i
    j = basis_b.shape[1] if j is None else j
    if not (1 <= i <= basis_a.shape[1] and 1 <= j <= basis_b.shape[1]):
        raise ConfigError(
            f"i={i}, j={j} are out of range. Expected 1 <= i <= {basis_a.shape[1]} and "
            f"1 <= j <= {basis_b.shape[1]} (the number of singular vectors of each input)."
        )
    overlap = (basis_a[:, :i].T @ basis_b[:, :j].to(basis_a)) ** 2  # (i, j): squared cosines
    cumulative = overlap.double().cumsum(0).cumsum(1)  # [i'-1, j'-1] = ||U_i'^T V_j'||_F^2
    rows = torch.arange(1, i + 1, dtype=torch.float64)[:, None]
    cols = torch.arange(1, j + 1, dtype=torch.float64)[None, :]
    return (cumulative.cpu() / torch.minimum(rows, cols)).float()


@dataclass(frozen=True)
class Amplification:
    """LoRA paper, Table 7: how much ΔW amplifies directions W already has."""

    r: int  # number of ΔW's singular directions projected on
    factor: float  # ||ΔW||_F / ||U^T W V||_F: the amplification factor
    delta_norm: float  # ||ΔW||_F
    weight_norm: float  # ||W||_F
    projected_norm: float  # ||U^T W V||_F with U, V the top-r singular vectors of ΔW
    top_weight_norm: float | None  # same with W's own top-r singular vectors (= sqrt Σ_top-r σ_W²)
    random_norm: float | None  # same with random orthonormal U, V (mean over trials)

    def table(self) -> dict[str, float | None]:
        """The paper's table as {row: value}."""
        return {
            "||U^T W V||_F, U,V of ΔW": self.projected_norm,
            "||U^T W V||_F, U,V of W": self.top_weight_norm,
            "||U^T W V||_F, random U,V": self.random_norm,
            "||W||_F": self.weight_norm,
            "||ΔW||_F": self.delta_norm,
            "amplification ||ΔW||_F / ||U^T W V||_F": self.factor,
        }


@torch.no_grad()
def amplification(
    delta: Tensor | Update | nn.Module,
    weight: Tensor | None = None,
    r: int | None = None,
    compare: bool = True,
    trials: int = 8,
    seed: int = 0,
) -> Amplification:
    """The amplification factor ||ΔW||_F / ||U^T W V||_F of LoRA paper section 7.3.

    Args:
        delta: ΔW (d_out, d_in), factors (left, right), or an adapted layer (then ``weight``
            defaults to its frozen base weight).
        weight: the pretrained W, (d_out, d_in) (nn.Linear layout).
        r: how many of ΔW's singular directions to use; default its numerical rank.
        compare: also project W on its own top-r directions and on random ones, as the paper's
            table does (costs one SVD of W).
        trials: random bases averaged for the random row.
        seed: seed of the random bases.
    """
    if weight is None:
        if not isinstance(delta, nn.Module):
            raise ConfigError(
                "amplification() needs the pretrained weight W. Expected weight=<(d_out, d_in) "
                "tensor>, or pass an adapted layer instead of a matrix."
            )
        weight = _base_weight(delta)
    update = _as_update(delta)
    u, s, vh = svd_of(update)
    w = _work(weight).to(u)
    if w.shape != (u.shape[0], vh.shape[1]):
        raise ConfigError(
            f"ΔW is {u.shape[0]} x {vh.shape[1]} but W is {tuple(w.shape)}. Expected both in "
            "(d_out, d_in) layout (nn.Linear's); transpose a Conv1D or embedding weight."
        )
    if s.numel() == 0 or s[0] == 0:
        raise ConfigError(
            "ΔW is zero, so it has no directions to compare (LoRA's B starts at zero). Expected a "
            "trained adapter; train a few steps first, or randomise lora_B for a demonstration."
        )
    rank = int((s > s[0] * 1e-6).sum())
    r = rank if r is None else r
    if not 1 <= r <= s.numel():
        raise ConfigError(
            f"r={r} is out of range. Expected 1 <= r <= {s.numel()} (ΔW's singular directions)."
        )
    delta_norm = float(s.double().norm())
    projected = float((u[:, :r].T @ w @ vh[:r].T).norm())
    top = rand = None
    if compare:
        top = float(torch.linalg.svdvals(w)[:r].double().norm())
        gen = torch.Generator().manual_seed(seed)
        norms = []
        for _ in range(trials):
            qu = torch.linalg.qr(torch.randn(w.shape[0], r, generator=gen, dtype=w.dtype))[0].to(w.device)
            qv = torch.linalg.qr(torch.randn(w.shape[1], r, generator=gen, dtype=w.dtype))[0].to(w.device)
            norms.append(float((qu.T @ w @ qv).norm()))
        rand = sum(norms) / len(norms)
    factor = delta_norm / projected if projected > 0 else math.inf
    return Amplification(r, factor, delta_norm, float(w.double().norm()), projected, top, rand)


# --------------------------------------------------------------------------------------------
# Spectra over training
# --------------------------------------------------------------------------------------------
class SpectrumHistory:
    """A training callback that records the spectra of ΔW every ``every`` steps.

        history = peftlab.spectra.SpectrumHistory(every=10)
        peftlab.train(model, data, callbacks=[history])
        steps, values = history.as_arrays()        # values[layer]: (n_captures, k)

    Cheap: factorised adapters cost one thin QR per layer per capture, no d_out x d_in SVD.

    Args:
        every: capture when ``record["step"] % every == 0``.
        layers: only these layers (regex or names / suffixes, as ``targets``); None: all.
        adapter_name: which adapter; default the active one.
        top: keep only the top-``top`` singular values per layer (memory for long runs).
    """

    def __init__(
        self,
        every: int = 10,
        layers: str | Sequence[str] | None = None,
        adapter_name: str | None = None,
        top: int | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every={every!r} is invalid. Expected a positive integer, e.g. every=10.")
        self.every, self.layers, self.adapter_name, self.top = every, layers, adapter_name, top
        self.history: dict[int, dict[str, Tensor]] = {}

    def capture(self, model: nn.Module, step: int) -> dict[str, Tensor]:
        """Record the spectra now, under ``step`` (e.g. step 0 before training)."""
        values = spectrum(model, self.adapter_name, self.layers)
        if self.top is not None:
            values = {k: v[: self.top] for k, v in values.items()}
        self.history[int(step)] = values
        return values

    def __call__(self, record: Mapping[str, Any] | Any, model: nn.Module) -> None:
        step = record["step"] if isinstance(record, Mapping) else record.step
        if step % self.every == 0:
            self.capture(model, step)

    def __len__(self) -> int:
        return len(self.history)

    @property
    def steps(self) -> list[int]:
        return sorted(self.history)

    def as_arrays(self) -> tuple[Any, dict[str, Any]]:
        """(steps, {layer: values}) as numpy arrays: steps (n,), values (n, k), NaN-padded
        where a layer's spectrum is shorter at some step."""
        import numpy as np

        steps = self.steps
        names = list(dict.fromkeys(n for s in steps for n in self.history[s]))
        out = {}
        for name in names:
            rows = [self.history[s].get(name) for s in steps]
            width = max(len(v) for v in rows if v is not None)
            grid = np.full((len(steps), width), np.nan)
            for t, v in enumerate(rows):
                if v is not None:
                    grid[t, : len(v)] = v.double().numpy()
            out[name] = grid
        return np.asarray(steps, dtype=np.int64), out


# --------------------------------------------------------------------------------------------
# Benchmark: factor-based spectrum vs full SVD
# --------------------------------------------------------------------------------------------
def _timed(fn, repeats: int, device: torch.device) -> tuple[float, Any]:
    """Best wall time (s) over ``repeats`` runs (the least disturbed by other processes, as
    ``timeit`` advises), and the last result. CUDA work is asynchronous: wait for it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, result = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), result


def bench_spectra(
    sizes: Sequence[int] = (1024, 2048, 4096),
    ranks: Sequence[int] = (8, 16, 64),
    repeats: int = 5,
    full_repeats: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> list[dict[str, float]]:
    """Time the factor-based spectrum against ``torch.linalg.svdvals`` of the explicit ΔW.

    For each d x d size and rank r: random factors B (d, r), A (r, d), ΔW = B A. Both timings,
    their ratio and the agreement are measured in the same run. Each timing is the best of its
    repeats; the full SVD runs ``full_repeats`` times (once by default: ~minutes at 4096 on 2 cores).

    ``threads`` sets torch's CPU threads for the run (restored after). On a busy machine
    ``threads=1`` gives steadier figures: with more threads than free cores, every parallel
    region waits for a descheduled thread, which swamps sub-millisecond timings.

    Returns:
        Rows {d, r, factored_s, full_s, speedup, max_rel_diff, tail_rel}: best seconds of each
        route, full_s / factored_s, the largest |σ_factored - σ_full| / σ_full over the top r, and
        the largest remaining full singular value relative to σ_1 (should be ~1e-7: rank r).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_rows(sizes, ranks, repeats, full_repeats, seed, torch.device(device))
    finally:
        torch.set_num_threads(previous)


def _bench_rows(sizes, ranks, repeats, full_repeats, seed, device) -> list[dict[str, float]]:
    """The measurements of :func:`bench_spectra`, under the thread setting it chose."""
    gen = torch.Generator().manual_seed(seed)
    torch.linalg.svdvals(torch.randn(64, 64, generator=gen).to(device))  # first-call set-up, not timed
    rows = []
    for d in sizes:
        for r in ranks:
            b = (torch.randn(d, r, generator=gen) / math.sqrt(r)).to(device)
            a = (torch.randn(r, d, generator=gen) / math.sqrt(d)).to(device)
            delta = b @ a  # (d, d); forming it is not timed: the full route is timed at its best
            factored_svdvals(b, a)  # warm-up: LAPACK picks workspaces per shape on first call
            factored_s, fast = _timed(lambda: factored_svdvals(b, a), repeats, device)
            full_s, full = _timed(lambda: torch.linalg.svdvals(delta), full_repeats, device)
            fast, full = fast.cpu(), full.cpu()
            rel = ((fast - full[:r]).abs() / full[:r]).max()
            tail = full[r:].max() / full[0] if d > r else torch.tensor(0.0)
            rows.append({
                "d": d, "r": r, "factored_s": factored_s, "full_s": full_s,
                "speedup": full_s / factored_s, "max_rel_diff": float(rel), "tail_rel": float(tail),
            })
    return rows


def format_bench_spectra(rows: Sequence[Mapping[str, float]]) -> str:
    """The rows of :func:`bench_spectra` as an aligned text table (for ``peftlab bench spectra``)."""
    lines = [f"{'d':>6} {'r':>4} {'factored ms':>12} {'full svd ms':>12} {'speedup':>9} "
             f"{'max rel diff':>13} {'tail/σ1':>9}"]
    for row in rows:
        lines.append(
            f"{row['d']:>6} {row['r']:>4} {1e3 * row['factored_s']:>12.3f} {1e3 * row['full_s']:>12.1f} "
            f"{row['speedup']:>8.0f}x {row['max_rel_diff']:>13.2e} {row['tail_rel']:>9.1e}"
        )
    return "\n".join(lines)


__all__ = [
    "Amplification",
    "SpectrumHistory",
    "Update",
    "adapter_singular_values",
    "adapter_update",
    "amplification",
    "bench_spectra",
    "effective_rank",
    "energy_share",
    "factored_svd",
    "factored_svdvals",
    "format_bench_spectra",
    "hadamard_factors",
    "kronecker_singular_values",
    "spectrum",
    "stable_rank",
    "subspace_similarity",
    "svd_of",
    "svdvals_of",
]
