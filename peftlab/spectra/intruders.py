"""Intruder dimensions: new top singular vectors of W + ΔW that W did not have.

Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
(https://arxiv.org/abs/2410.21228): take the SVD of the pre-trained weight W = U Σ Vᵀ and of the
tuned weight W' = W + ΔW = U' Σ' V'ᵀ. A top singular vector u'_j of W' (j among the ``top_k``
largest) is an *intruder* when it resembles none of W's singular vectors:

    max_i |cos(u'_j, u_i)| < ε          (ε = 0.5 by default; u_i, u'_j unit vectors)

The paper finds them in LoRA updates and hardly in full fine-tuning, and ties them to forgetting.
Its mitigation scales the intruders of W' down by λ and keeps the rest:

    W'' = W' + (λ - 1) Σ_{j intruder} σ'_j u'_j v'_jᵀ,      ΔW'' = W'' - W

and a LoRA adapter of the same rank r is refitted to ΔW'' by its truncated SVD (B = U_r √S_r,
A = √S_r V_rᵀ, the scale s taken out): peft 0.21.2's ``reduce_intruder_dimension``
(peft/tuners/lora/intruders.py), which :func:`reduce_intruders` matches. ΔW'' can have rank up to
r + (number of intruders), so the refit at rank r is itself an approximation, as in peft.

    found = find_intruders(model)                       # {layer: Intruders}, a LoRA model
    found = find_intruders(tuned, before=weights)       # full fine-tuning: the weights it started from
    reduce_intruders(model, mitigation=0.75)            # a new adapter "intruder_reduced", made active
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, matches
from peftlab.spectra.changes import dense, weight_changes
from peftlab.spectra.layers import base_weight
from peftlab.spectra.svd import factored_svd, working_copy

TOP_K, EPSILON, MITIGATION = 10, 0.5, 0.75  # peft's defaults (and the paper's epsilon)


@dataclass(frozen=True)
class Intruders:
    """The ``top_k`` largest singular directions of W + ΔW and how much each resembles W's."""

    similarity: Tensor  # (top_k,) max_i |cos(u'_j, u_i)|, j = 0 .. top_k - 1 by σ'_j descending
    singular_values: Tensor  # (top_k,) σ'_j of W + ΔW
    epsilon: float

    @property
    def indices(self) -> list[int]:
        """Which of the top singular directions are intruders (similarity below epsilon)."""
        return torch.nonzero(self.similarity < self.epsilon).flatten().tolist()

    @property
    def count(self) -> int:
        return len(self.indices)


def _check(top_k: int, epsilon: float) -> None:
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ConfigError(f"top_k={top_k!r}: expected a whole number of singular directions, at least 1 "
                          "(peft's default is 10).")
    if not epsilon > 0.0:  # above 1 every direction counts (peft's tests use 999)
        raise ConfigError(f"epsilon={epsilon!r} is out of range. Expected a positive cosine similarity below "
                          "which a direction counts as new (the paper's and peft's default is 0.5).")


def intruder_dimensions(weight: Tensor, tuned: Tensor, top_k: int = TOP_K, epsilon: float = EPSILON) -> Intruders:
    """Intruders of one matrix: ``weight`` W and ``tuned`` W + ΔW, both (d_out, d_in).

    Each of the ``top_k`` leading left singular vectors of ``tuned`` is compared with every left
    singular vector of ``weight`` (|cosine|, both unit length); a direction whose best match is
    below ``epsilon`` is an intruder.
    """
    return _compared(weight, tuned, top_k, epsilon)[0]


def _thin_svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd(m, full_matrices=False), taken of mᵀ when m is wide (2x faster on CPU)."""
    if m.shape[0] >= m.shape[1]:
        return torch.linalg.svd(m, full_matrices=False)
    u, s, vh = torch.linalg.svd(m.T, full_matrices=False)
    return vh.T, s, u.T


def _compared(weight: Tensor, tuned: Tensor, top_k: int, epsilon: float):
    """(Intruders, the SVD of ``tuned``): the reduction reuses the SVD."""
    _check(top_k, epsilon)
    weight, tuned = working_copy(weight), working_copy(tuned)
    if weight.shape != tuned.shape or weight.ndim != 2:
        raise ConfigError(f"Expected two matrices of one shape (W and W + ΔW), got {tuple(weight.shape)} and "
                          f"{tuple(tuned.shape)}.")
    u_base = _thin_svd(weight)[0]  # (d_out, k)
    u_tuned, s_tuned, vh_tuned = _thin_svd(tuned)
    k = min(top_k, s_tuned.numel())
    similarity = (u_tuned[:, :k].T @ u_base).abs().max(dim=1).values  # (k,)
    return Intruders(similarity, s_tuned[:k], epsilon), (u_tuned, s_tuned, vh_tuned)


@torch.no_grad()
def find_intruders(
    model: nn.Module,
    before: dict[str, Tensor] | None = None,
    layers: str | Sequence[str] | None = None,
    top_k: int = TOP_K,
    epsilon: float = EPSILON,
) -> dict[str, Intruders]:
    """``{layer name: Intruders}`` for every changed layer (see :func:`weight_changes`)."""
    _check(top_k, epsilon)
    out = {name: intruder_dimensions(w, w + dense(delta), top_k, epsilon)
           for name, w, delta in weight_changes(model, before, layers)}
    if not out:
        raise ConfigError("Found no changed layer in this model. Expected a model adapted with LoRA "
                          "(peftlab.adapt(model, 'lora')), or a fully fine-tuned one with before=snapshot(...).")
    return out


@torch.no_grad()
def reduce_intruders(
    model: nn.Module,
    top_k: int = TOP_K,
    epsilon: float = EPSILON,
    mitigation: float = MITIGATION,
    adapter_name: str | None = None,
    new_adapter_name: str = "intruder_reduced",
    layers: str | Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Scale each LoRA layer's intruders by ``mitigation`` into a new adapter, made active.

    peft's ``reduce_intruder_dimension`` for peftlab's LoRA (module docstring): the old adapter
    stays, ``set_adapter(model, old)`` switches back. ``layers`` (a regex or names, as for
    targets) reduces only those; the others are copied as they are. Returns ``{layer name:
    intruders found}`` for the layers looked at.

    The refit needs no third SVD: ΔW''/s = B A + ((λ - 1)/s) Σ_j σ_j u_j v_jᵀ is given by factors of
    rank r + (number of intruders), whose SVD comes from two thin QRs (:func:`factored_svd`).
    """
    from peftlab.compose import add_adapter, set_adapter
    from peftlab.methods.lora import LoRA
    from peftlab.state import active_name, records

    _check(top_k, epsilon)
    if not 0.0 <= mitigation <= 1.0:
        raise ConfigError(f"mitigation={mitigation!r} is out of range. Expected a share in [0, 1] of each "
                          "intruder kept (1 keeps the adapter as it is; peft's default is 0.75).")
    old = adapter_name or active_name(model)
    record = records(model).get(old) if old else None
    if record is None or record.method != "lora":
        found = f"its adapter {old!r} is {record.method}" if record else "it has no peftlab adapter"
        raise ConfigError(f"Intruder reduction works on LoRA adapters; {found}. Expected a model from "
                          "peftlab.adapt(model, 'lora'); peft's own version is peft.tuners.lora.intruders.")
    chosen = layers
    layers = {name: layer for name, layer in model.named_modules()
              if isinstance(layer, AdaptedLayer) and old in layer.adapters}
    config = record.config
    if (any(type(layer.adapters[old]) is not LoRA or layer.adapters[old].is_embedding for layer in layers.values())
            or config.lora_bias or config.trainable_token_indices or config.target_parameters):
        raise ConfigError(f"Adapter {old!r} is not plain LoRA on linear layers (it has an embedding, convolution "
                          "or attention layer, lora_bias, trainable tokens or target_parameters). Expected LoRA "
                          "on linear layers only, as peft's reduce_intruder_dimension reads it.")
    # the twin: the same layers, ranks and scales; its A and B are overwritten below (so the plain
    # init: PiSSA or LoftQ would change the base weight again)
    add_adapter(model, new_adapter_name, "lora", targets=tuple(layers), r=config.r, alpha=config.alpha,
                use_rslora=config.use_rslora, rank_pattern=dict(config.rank_pattern),
                alpha_pattern=dict(config.alpha_pattern), dropout=config.dropout)
    found = {}
    for name, layer in layers.items():
        lora, new = layer.adapters[old], layer.adapters[new_adapter_name]
        count = 0
        if chosen is None or matches(name, chosen):
            w = base_weight(layer)
            intruders, (u, s, vh) = _compared(w, w + dense(lora.factors()), top_k, epsilon)
            count = found[name] = intruders.count
            if log:
                log(f"{name}: {count} intruders" if count else f"{name}: no intruders")
        if not count:
            new.lora_A.copy_(lora.lora_A)
            new.lora_B.copy_(lora.lora_B)
            continue
        j = intruders.indices
        # ΔW''/s = (W' + (λ - 1) Σ_j σ_j u_j v_jᵀ - W) / s = B A + ((λ - 1)/s) U_j S_j V_jᵀ
        left = torch.cat([working_copy(lora.lora_B), (mitigation - 1.0) / lora.scaling * u[:, j] * s[j]], dim=1)
        right = torch.cat([working_copy(lora.lora_A), vh[j]], dim=0)
        ud, sd, vhd = factored_svd(left, right)
        r, root = lora.r, sd[:lora.r].sqrt()
        b_new, a_new = ud[:, :r] * root, root[:, None] * vhd[:r]  # (d_out, r), (r, d_in)
        new.lora_B.copy_(b_new.to(new.lora_B.dtype))
        new.lora_A.copy_(a_new.to(new.lora_A.dtype))
    set_adapter(model, new_adapter_name)
    return found

