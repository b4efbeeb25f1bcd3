"""Several named adapters on one base model: add, switch, delete, mix per example, merge by weight.

One frozen base model can carry many adapters; each ``AdaptedLayer`` keeps them by name in
``.adapters`` and runs the ones in ``.active`` (peftlab/inject/). The functions here are thin
and readable over that:

    add_adapter(model, "french", "lora", r=8)      # a second adapter; the active one stays active
    set_adapter(model, "french")                   # switch: no reload, only which adapter runs
    with disabled(model): ...                      # the plain base model for a while
    model(**batch, adapter_names=["french", "__base__", "german"])   # one adapter per example
    add_weighted_adapter(model, ["french", "german"], [0.5, 0.5], "mix", combination_type="ties")
    delete_adapter(model, "german")                # parameters gone; empty layers unwrapped

Weighted merging follows peft's ``LoraModel.add_weighted_adapter`` (peft 0.21.2,
peft/tuners/lora/model.py, and peft/utils/merge_utils.py) so that the same inputs give the same
adapter. The combination types:

- ``linear``: A' = Σ √(w_i s_i) A_i and B' = Σ √(w_i s_i) B_i (s_i = alpha_i / r_i). Cheap, but
  B'A' has cross terms B_i A_j: only an approximation of Σ w_i ΔW_i. Needs equal ranks.
- ``cat``: A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B' = [B_1, B_2, ...]: exactly Σ w_i ΔW_i, rank Σ r_i.
- ``svd``: ΔW = Σ w_i ΔW_i, then its best rank-k approximation U_k S_k V_kᵀ (B' = U_k S_k, A' = V_kᵀ).
- ``ties`` (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): keep each tensor's top
  ``density`` share by magnitude, elect a sign per entry, average the entries that agree.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop entries
  at random (keep probability ``density``), rescale by 1/density, then add (or TIES).
- ``magnitude_prune``: keep the top ``density`` share by magnitude, then add.
- ``*_svd`` variants apply ties / dare / magnitude_prune to the full ΔW_i, then truncate by SVD.

The non-svd types apply the rule to the A's and the B's separately (as peft does). DARE draws its
masks from torch's global generator in peft's order (layers in model order; per layer, for
non-svd types, every adapter's A, then every adapter's B): seed with ``torch.manual_seed`` and
both libraries draw the same masks. The new adapter has alpha = r, so its scaling is 1.

Every layer LoRA adapts combines: a convolution's A (r, C_in, *kernel) and B (C_out, r/g, 1, ...)
are the matrices (r, C_in·K) and (C_out, r/g); an nn.MultiheadAttention combines its in_proj and
out_proj pairs each. Where peft 0.21.2 differs, peftlab computes the weighted sum it stands for:
with lora_bias the new bias is Σ w_i s_i b_i (peft leaves the new bias at its init); ``cat`` on a
grouped convolution keeps each group's rows of A together (peft's plain concatenation hands one
group's B another group's rows); the svd types work on convolutions and attention (peft's fail on
their shapes) but refuse a grouped convolution, whose block-diagonal B cannot hold a dense ΔW.
3-D expert parameters (target_parameters, which peft refuses too) and trainable token rows are
refused with a clear error rather than dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from peftlab import inject
from peftlab.errors import ConfigError, closest
from peftlab.routing import BASE, adapters_per_example, check_names, enable_adapter_names  # noqa: F401 (public here)
from peftlab.state import active_name, peek, records, state_of

COMBINATION_TYPES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                     "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


# --------------------------------------------------------------------------------------------
# Adding, switching, deleting
# --------------------------------------------------------------------------------------------
def add_adapter(model: nn.Module, adapter_name: str, method: str = "lora", **hyperparameters) -> nn.Module:
    """Add one more named adapter to ``model``; the adapter that was active stays active (as in
    peft). Switch with :func:`set_adapter`. Returns the same model."""
    from peftlab.api import adapt

    previous = active_name(model)
    if adapter_name in records(model):
        raise ConfigError(
            f"The model already has an adapter named {adapter_name!r}. Expected a new name; existing: "
            f"{', '.join(records(model))}. Try another name, or delete_adapter(model, {adapter_name!r})."
        )
    adapt(model, method, adapter_name=adapter_name, **hyperparameters)
    if previous is not None and previous in records(model):
        set_adapter(model, previous)
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the one adapter that runs and trains; the base stays loaded."""
    check_names(model, [adapter_name])
    inject.set_active(model, adapter_name)
    inject.freeze_all_but_adapters(model, adapter_name)
    state_of(model).active = adapter_name
    return model


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter (None when the model has none)."""
    return active_name(model)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the reference adapters on ``model``, in the order they were added."""
    return list(records(model))


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with disabled(model): ...`` runs the plain base model, then turns the adapters back on."""
    inject.set_disabled(model, True)
    try:
        yield model
    finally:
        inject.set_disabled(model, False)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter: its parameters leave the model and a layer left with no adapter goes
    back to being its plain base layer. If it was active, the first remaining adapter becomes
    active (as in peft)."""
    check_names(model, [adapter_name])
    users = [n for n, layer in inject.adapted_layers(model).items() for a in layer.adapters.values()
             if adapter_name in getattr(a, "trains_with", ())]
    if users:
        raise ConfigError(
            f"Adapter {adapter_name!r} is an expert of another adapter (used in {users[0]!r}). "
            "Expected an adapter nothing else depends on; delete the X-LoRA adapter first."
        )
    for name, module in list(model.named_modules()):
        if isinstance(module, inject.AdaptedLayer) and adapter_name in module.adapters:
            if module.merged:
                module.unmerge()  # take every merged update out before removing one of them
            module.adapters[adapter_name].release()  # hooks it keeps outside the layer, if any
            del module.adapters[adapter_name]
            module.active = [a for a in module.active if a != adapter_name]
            if not len(module.adapters):
                inject.set_module(model, name, module.base_layer)
        elif isinstance(module, inject.TrainableCopy) and adapter_name in module.copies:
            del module.copies[adapter_name]
            module.active = [a for a in module.active if a != adapter_name]
            if not len(module.copies):
                inject.set_module(model, name, module.original_module)
    _remove_extras(model, adapter_name)
    state = peek(model)
    del state.records[adapter_name]
    if state.active == adapter_name:
        if state.records:
            set_adapter(model, next(iter(state.records)))
        else:
            state.active = None
    return model


def _remove_extras(model: nn.Module, adapter_name: str) -> None:
    """Model-level modules some adapters keep outside the layers (X-LoRA's router)."""
    router = getattr(model, "xlora_router", None)
    if router is not None and adapter_name in router.adapters:
        from peftlab.methods.xlora import remove_router

        remove_router(model, adapter_name)


# --------------------------------------------------------------------------------------------
# Weighted merging of LoRA adapters
# --------------------------------------------------------------------------------------------
def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> nn.Module:
    """Add a new LoRA adapter ``adapter_name`` combining LoRA ``adapters`` with ``weights``
    (negative weights subtract). The active adapter stays active; see the module docstring
    for the combination types. Returns the same model."""
    from peftlab.api import adapt

    check_names(model, adapters)
    recs = records(model)
    if adapter_name in recs:
        raise ConfigError(f"The model already has an adapter named {adapter_name!r}. Expected a new name.")
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"Got {len(adapters)} adapters and {len(weights)} weights. Expected one weight "
                          "per adapter, at least one adapter.")
    not_lora = [a for a in adapters if recs[a].method != "lora"]
    if not_lora:
        raise ConfigError(f"Adapters {not_lora} are not LoRA adapters ({recs[not_lora[0]].method}). "
                          "Expected adapters added with method 'lora'; weighted merging combines B A factors.")
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"Unknown combination_type {combination_type!r}.{closest(combination_type, COMBINATION_TYPES)} "
                          f"Expected one of: {', '.join(COMBINATION_TYPES)}.")
    if len(adapters) == 1:
        combination_type = "linear"  # peft: one adapter can only be scaled
    needs_density = ("ties", "dare", "magnitude")
    if any(combination_type.startswith(k) for k in needs_density) and density is None:
        raise ConfigError(f"combination_type={combination_type!r} needs density, the share of entries kept "
                          "(0 to 1). Expected e.g. density=0.5.")
    check_combinable(recs, adapters, combination_type)
    ranks = [recs[a].config.r for a in adapters]
    if combination_type in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"):
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination_type={combination_type!r} adds A's and B's entry by entry, so "
                              f"all ranks must be equal; got {dict(zip(adapters, ranks))}. Try 'cat' or 'svd'.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    layers = {n: layer for n, layer in inject.adapted_layers(model).items()
              if any(a in layer.adapters for a in adapters)}
    if combination_type.endswith("svd"):
        check_svd_layers(layers)
    previous = active_name(model)
    first = recs[adapters[0]].config
    adapt(model, "lora", adapter_name=adapter_name, r=new_rank, alpha=float(new_rank), targets=tuple(layers),
          modules_to_save=first.modules_to_save, lora_bias=any(recs[a].config.lora_bias for a in adapters))
    with torch.no_grad():
        for layer in layers.values():  # model order: the order peft draws DARE's masks in
            present = [(layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
            for part in lora_parts(layer.adapters[adapter_name]):  # MultiheadAttention: in_proj, out_proj
                pairs = [(getattr(lora, part), w) if part else (lora, w) for lora, w in present]
                new = getattr(layer.adapters[adapter_name], part) if part else layer.adapters[adapter_name]
                A, B = _combine(pairs, combination_type, new_rank, svd_clamp, density, majority_sign_method)
                new.lora_A.zero_()
                new.lora_B.zero_()
                new.lora_A[: A.shape[0]] = A.reshape(-1, *new.lora_A.shape[1:]).to(new.lora_A.dtype)
                new.lora_B[:, : B.shape[1]] = B.reshape(B.shape[0], -1, *new.lora_B.shape[2:]).to(new.lora_B.dtype)
                if new.lora_B_bias is not None:  # the bias of Σ w_i ΔW_i, exactly: Σ w_i s_i b_i (new s = 1)
                    new.lora_B_bias.copy_(sum(w * lora.scaling * lora.lora_B_bias for lora, w in pairs
                                              if lora.lora_B_bias is not None))
    if previous is not None:
        set_adapter(model, previous)
    return model


def check_combinable(records: dict, adapters: Sequence[str], combination_type: str) -> None:
    """What a weighted LoRA merge cannot combine: 3-D expert parameters (peft refuses them too) and
    trainable token rows (a row has no factors to weigh; peft's new adapter would start them over)."""
    for name in adapters:
        config = records[name].config
        if config.target_parameters:
            raise ConfigError(
                f"Adapter {name!r} adapts parameters ({', '.join(config.target_parameters)}), and a weighted "
                "merge combines the A and B of layers, not of 3-D expert weights (peft refuses it too). "
                "Expected LoRA adapters on layers; try merging each adapter with peftlab.merge instead."
            )
        if config.trainable_token_indices:
            raise ConfigError(
                f"Adapter {name!r} trains embedding rows (trainable_token_indices), which have no low-rank "
                "factors to weigh, so the combined adapter would lose them. Expected LoRA adapters "
                "without trainable tokens; try combining the rows yourself or merging with peftlab.merge."
            )


def check_svd_layers(layers: dict[str, inject.AdaptedLayer]) -> None:
    """An SVD writes a dense ΔW back as B A: a grouped convolution's B is block-diagonal and cannot
    hold it (peft's svd types fail there on the shapes)."""
    for name, layer in layers.items():
        grouped = [a for a in layer.adapters.values() if getattr(a, "groups", 1) > 1]
        if grouped:
            raise ConfigError(
                f"Layer {name!r} is a convolution with groups={grouped[0].groups}: its LoRA B is "
                "block-diagonal, so the dense Σ w_i ΔW_i that an svd combination factors cannot be "
                "written back as B A. Expected ungrouped layers for the svd types; try 'cat' (exact) "
                "or 'linear'."
            )


def lora_parts(adapter: nn.Module) -> tuple[str, ...]:
    """The LoRA pairs an adapter holds: itself (""), or an nn.MultiheadAttention's two."""
    return ("in_proj", "out_proj") if hasattr(adapter, "in_proj") else ("",)


def _combine(present: list[tuple[nn.Module, float]], kind: str, new_rank: int, clamp: float | None,
             density: float | None, sign_method: str) -> tuple[Tensor, Tensor]:
    """(A', B') of the combined adapter from the LoRA pairs (lora, weight) one layer carries, in
    matrix layout: A' (r', d_in), B' (d_out, r'). A convolution's A (r, C_in, *kernel) is the
    matrix (r, C_in·K), its B (C_out, r/g, 1, ...) the matrix (C_out, r/g)."""
    factors = [(lora.lora_A.flatten(1), lora.lora_B.flatten(1), lora.scaling, w) for lora, w in present]
    groups = getattr(present[0][0], "groups", 1)
    if kind == "cat":  # per group of B's inputs, every adapter's rows of A in turn (g = 1: plain cat)
        A = torch.cat([(A * w * s).chunk(groups)[g] for g in range(groups) for A, _, s, w in factors])  # (Σr, d_in)
        B = torch.cat([B for _, B, _, _ in factors], dim=1)  # (d_out, Σr/g)
        return A, B
    if kind.endswith("svd"):
        deltas = [B @ A * s for A, B, s, _ in factors]  # (d_out, d_in)
        delta = merge_tensors(kind.removesuffix("_svd").replace("svd", "linear"), deltas,
                              torch.tensor([w for *_, w in factors]), density, sign_method)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        U, Vh = U[:, :new_rank] @ torch.diag(S[:new_rank]), Vh[:new_rank, :]
        if clamp is not None:  # clip outliers at a quantile of all entries, symmetrically
            high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
            U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
        return Vh, U
    # the factor-wise types: √(w s) on each side, the sign on A only, so that B' A' ≈ w s B A
    w_s = [w * s for _, _, s, w in factors]
    w_A = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in w_s])
    w_B = torch.tensor([math.sqrt(abs(v)) for v in w_s])
    A = merge_tensors(kind, [A for A, *_ in factors], w_A, density, sign_method)
    B = merge_tensors(kind, [B for _, B, *_ in factors], w_B, density, sign_method)
    return A, B


def merge_tensors(kind: str, tensors: list[Tensor], weights: Tensor, density: float | None = None,
                  sign_method: str = "total") -> Tensor:
    """Σ_i weights_i · tensors_i after the pruning / sign election that ``kind`` names
    ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune_by_magnitude(t, density) for t in tensors]
    elif kind.startswith("dare"):
        tensors = [_prune_at_random(t, density) for t in tensors]
    elif kind != "linear":
        raise ConfigError(f"Unknown merge rule {kind!r}. Expected linear, ties, dare_linear, dare_ties "
                          "or magnitude_prune.")
    stacked = torch.stack(tensors, dim=0)  # (n, ...)
    weighted = stacked * weights.to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    # TIES: per entry, the sign with the larger total (or count) wins; average the agreeing entries
    votes = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _prune_by_magnitude(tensor: Tensor, density: float) -> Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _prune_at_random(tensor: Tensor, density: float) -> Tensor:
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density))  # the global generator, as peft
    return tensor * keep / density  # rescaled so the expected value stays the same
