"""AdaLoRA: LoRA in SVD form, whose rank budget moves during training to the layers that need it.

Zhang et al., 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
https://arxiv.org/abs/2303.10512 (ICLR 2023). Written to match peft 0.21.2's AdaLoRA step for
step (``peft/tuners/adalora``); tests/test_adalora.py proves both prune the same singular values.

Every adapted layer learns its update as a singular value decomposition (paper, eq. 3):

        ΔW = P Λ Q · alpha / init_r       P = lora_B (d_out, r)   left singular vectors
                                          Λ = lora_E (r, 1)       singular values (start at 0)
                                          Q = lora_A (r, d_in)    right singular vectors

On an nn.Conv2d (peft's SVDConv2d) ΔW is the conv weight as a matrix, d_out = C_out and
d_in = C_in·kh·kw: P Λ Q is reshaped to (C_out, C_in, kh, kw) and x is convolved with it, with the
layer's stride, padding and dilation. peft 0.21.2 adapts no other convolution (nn.Conv1d/3d: its
ValueError) and no embedding; a grouped Conv2d it accepts but cannot run (P Λ Q has C_in·kh·kw
columns, the grouped weight C_in/g·kh·kw, so its reshape fails at the first forward): peftlab
refuses all of these up front.

P and Q are only pushed towards orthogonality, by a regulariser added to the loss (eq. 4; peft
takes the plain, not squared, Frobenius norm and averages it over all P and Q):

        loss = task loss + orth_reg_weight · mean over layers of ‖Q Qᵀ - I‖_F and ‖Pᵀ P - I‖_F

Pruning a rank-1 triplet (P[:, i], Λ_i, Q[i]) is setting Λ_i to 0. After each optimizer step
``update_and_allocate`` scores every triplet (eq. 5-7, 9) and keeps the best ones:

        I = |w · ∂L/∂w|                      importance of each trainable entry w
        Ī ← β1 Ī + (1 - β1) I                smoothed importance (sensitivity)
        Ū ← β2 Ū + (1 - β2) |I - Ī|          its uncertainty
        S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji),   s = Ī · Ū

        budget  init_r·L ────┐                        L = number of adapted layers
        (total               ╲  cubic: target + (init - target)(1 - (t - tinit)/(T - tfinal - tinit))³
        ranks)                ╲__
                target_r·L       ╲_______________     every deltaT steps: Λ_i = 0 for the lowest S_i
                      0      tinit        T - tfinal   T = total_step

At step T - tfinal the final allocation is made; after it the same Λ_i are zeroed every step.
Like peft, a pruned Λ_i can regrow from its gradient between two allocations (the next one decides
again): the zero in Λ is the mask, so forward, ``delta_weight`` and merging always agree.

Training (``total_step`` is required: the schedule is laid out over the whole run):

    model = peftlab.adapt(model, "adalora", total_step=steps, init_r=12, target_r=8)
    peftlab.train(model, data, steps=steps)     # adds the regulariser, calls update_and_allocate
    # or your own loop, the way peft is used:
    loss = model(**batch).loss                  # with labels: the regulariser is already added
    loss.backward(); optimizer.step()
    update_and_allocate(model, step)            # step counts from 0, before zero_grad()
    optimizer.zero_grad()
    rank_allocation(model), rank_history(model)  # -> peftlab.plots.rank_allocation
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import (Adapter, ConvShape, adapted_layers, apply_weight, check_zero_padding,
                            find_targets, inject, is_conv1d, is_linear, matrix_dims)
from peftlab.methods.base import (AdapterConfig, LayerActivations, SavedActivations, check_range,
                                  in_base_layout, is_count, low_rank_activations)
from peftlab.state import active_name, peek, state_of


@dataclass(frozen=True)
class AdaLoRAConfig(AdapterConfig):
    total_step: int | None = None  # optimizer steps the run will take: required, the budget schedule needs it
    init_r: int = 12  # starting rank of every layer (the budget starts at init_r · layers)
    target_r: int = 8  # average rank per layer left after pruning (budget target_r · layers)
    tinit: int = 0  # warm-up steps before any pruning
    tfinal: int = 0  # final steps with the allocation frozen
    deltaT: int = 1  # prune every deltaT steps while the budget falls
    beta1: float = 0.85  # EMA factor of the importance Ī
    beta2: float = 0.85  # EMA factor of the uncertainty Ū
    orth_reg_weight: float = 0.5  # weight of the orthogonality regulariser in the loss
    alpha: float = 8.0  # scaling = alpha / init_r (peft: lora_alpha, or init_r when alpha is 0)
    dropout: float = 0.0  # dropout on the adapter's input only

    def __post_init__(self) -> None:
        if not is_count(self.total_step):
            raise ConfigError(
                f"AdaLoRA needs total_step, the number of optimizer steps you will train, because its "
                f"rank budget shrinks on a schedule over the run; got total_step={self.total_step!r}. "
                "Expected a positive integer; try peftlab.adapt(model, 'adalora', total_step=steps) "
                "with the same steps you pass to peftlab.train."
            )
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not is_count(value):
                raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer.")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only prunes. "
                "Expected target_r <= init_r; try init_r=12, target_r=8."
            )
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"tinit={self.tinit}, tfinal={self.tfinal} leave no steps to prune in (total_step="
                f"{self.total_step}). Expected 0 <= tinit < total_step - tfinal; try smaller tinit/tfinal."
            )
        check_range("beta1", self.beta1, 0.0, 1.0, low_open=True, high_open=True)
        check_range("beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)
        check_range("orth_reg_weight", self.orth_reg_weight, low=0.0)
        check_range("alpha", self.alpha, low=0.0)
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)


class AdaLoRA(Adapter):
    """h = W0 x + P (Λ ⊙ Q dropout(x)) · alpha / (init_r + 1e-5), for nn.Linear, Conv1D and nn.Conv2d."""

    def __init__(self, base: nn.Module, config: AdaLoRAConfig) -> None:
        super().__init__()
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            check_conv_adalora(base)
        d_in, d_out = matrix_dims(base)  # a Conv2d's weight as a matrix: d_in = C_in·kh·kw
        r = config.init_r
        self.transposed = is_conv1d(base)  # Conv1D stores W as (d_in, d_out)
        # peft's init: Λ = 0, so ΔW = 0 and the adapted model starts as the base; P, Q ~ N(0, 0.02²)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) * 0.02)  # Q (r, d_in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))  # Λ (r, 1)
        self.lora_B = nn.Parameter(torch.randn(d_out, r) * 0.02)  # P (d_out, r)
        self.scaling = config.alpha if config.alpha > 0 else float(r)
        # peft divides by the initial rank (+ 1e-5), fixed for the whole run, not by the current one
        self.register_buffer("ranknum", torch.full((1,), float(r)), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        if self.is_conv:  # as peft: ΔW in the weight's shape, then one convolution with it
            return (result + apply_weight(base, x, self.update())).to(result.dtype)  # (N, C_out, H', W')
        update = x @ (self.lora_A * self.lora_E).T @ self.lora_B.T  # (..., r) -> (..., d_out)
        return (result + update * self.scaling / (self.ranknum + 1e-5)).to(result.dtype)

    def update(self) -> Tensor:
        """ΔW = P (Λ ⊙ Q) · scaling / (init_r + 1e-5) in (d_out, d_in) layout."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: as LoRA's, at the starting rank init_r (pruning zeroes values of
        Λ, the tensors keep their size)."""
        return low_rank_activations(layer, int(self.lora_A.shape[0]), self.dropout)

    def delta_weight(self, base: nn.Module) -> Tensor:
        if self.is_conv:
            return self.update().view_as(base.weight)  # (C_out, C_in, kh, kw)
        return in_base_layout(self.update(), self.transposed)  # (d_out, d_in) or Conv1D's (d_in, d_out)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(P Λ · scaling, Q): ΔW = left @ right in (d_out, d_in) layout. Λ are not exactly the
        singular values of ΔW (P, Q are only nearly orthogonal); take a spectrum of the factors."""
        return self.lora_B * self.lora_E.T * self.scaling / (self.ranknum + 1e-5), self.lora_A

    def rank(self) -> int:
        """Triplets currently alive: non-zero entries of Λ."""
        return int((self.lora_E != 0).sum())


def check_conv_adalora(base: nn.Conv2d) -> None:
    """The Conv2d layers peft's AdaLoRA runs, and runs as its merge does; clear errors for the rest."""
    if base.groups > 1:
        raise ConfigError(
            f"AdaLoRA on a Conv2d with groups={base.groups} is not supported: peft builds ΔW = P Λ Q "
            f"with C_in·kh·kw = {base.in_channels * base.kernel_size[0] * base.kernel_size[1]} "
            f"columns, which does not fit the grouped weight {tuple(base.weight.shape)}, so peft's "
            "forward fails. Expected groups=1; try method 'lora' (it adapts grouped convolutions) "
            "or other targets."
        )
    check_zero_padding(base, "AdaLoRA")


def adalora_parameter_count(d_in: int, d_out: int, config: AdaLoRAConfig, conv: ConvShape | None = None) -> int:
    """init_r (d_in + d_out + 1): Q, P and Λ; on a Conv2d d_in = C_in·kh·kw."""
    return config.init_r * (d_in * (conv.taps if conv is not None else 1) + d_out + 1)


# --------------------------------------------------------------------------------------------
# The rank allocator: importance scores and the budget schedule (paper, section 3.2-3.3)
# --------------------------------------------------------------------------------------------
class RankAllocator:
    """Per-adapter training state: Ī and Ū of every entry, the last allocation, its history."""

    def __init__(self, config: AdaLoRAConfig, layer_names: list[str]) -> None:
        self.config = config
        self.layer_names = list(layer_names)
        self.init_budget = config.init_r * len(layer_names)  # total rank, summed over layers
        self.target_budget = config.target_r * len(layer_names)
        self.importance: dict[str, Tensor] = {}  # "layer.lora_A" -> Ī, same shape as the parameter
        self.uncertainty: dict[str, Tensor] = {}  # "layer.lora_A" -> Ū
        self.kept: dict[str, Tensor] | None = None  # layer -> (init_r,) bool, last allocation
        self.history: list[dict] = []  # one {"step", "budget", "ranks"} per update_and_allocate

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether to prune at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self, layers: dict[str, AdaLoRA]) -> None:
        """Ī and Ū from this step's |w · grad| (call after backward, before zeroing gradients)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, adapter in layers.items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                p, key = getattr(adapter, pname), f"{name}.{pname}"
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                now = (p * grad).abs()
                ema = self.importance.get(key, torch.zeros_like(p))
                self.importance[key] = b1 * ema + (1 - b1) * now
                unc = self.uncertainty.get(key, torch.zeros_like(p))
                self.uncertainty[key] = b2 * unc + (1 - b2) * (now - self.importance[key]).abs()

    def scores(self, layers: dict[str, AdaLoRA]) -> dict[str, Tensor]:
        """S_i of every triplet: {layer: (init_r,)} (eq. 7 and 9)."""
        s = {k: self.importance[k] * self.uncertainty[k] for k in self.importance}
        return {
            # peft's order of additions: s(Λ) + (mean s(Q) + mean s(P))
            name: s[f"{name}.lora_E"].view(-1)
            + (s[f"{name}.lora_A"].mean(dim=1) + s[f"{name}.lora_B"].mean(dim=0))
            for name in layers
        }

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, AdaLoRA], budget: int) -> None:
        """Zero the Λ_i of the init_budget - budget lowest-scoring triplets, model-wide."""
        scores = self.scores(layers)
        n_prune = self.init_budget - budget
        if n_prune <= 0:  # nothing to prune (peft's kthvalue would fail with k = 0)
            self.kept = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=n_prune).values.item()
        self.kept = {name: s > threshold for name, s in scores.items()}  # ties are pruned, as in peft
        self.apply_mask(layers)

    @torch.no_grad()
    def apply_mask(self, layers: dict[str, AdaLoRA]) -> None:
        for name, adapter in layers.items():
            adapter.lora_E.masked_fill_(~self.kept[name].view(-1, 1), 0.0)

    def ranks(self) -> dict[str, int]:
        r = self.config.init_r
        return {n: (int(self.kept[n].sum()) if self.kept else r) for n in self.layer_names}


# what peft 0.21.2's AdaLoRA adapts, in words for the error that refuses the rest
ADALORA_LAYERS = ("a linear layer (nn.Linear, transformers' Conv1D) or an nn.Conv2d (peft's AdaLoRA adapts "
                  "no embedding and no nn.Conv1d / nn.Conv3d; method 'lora' does)")


def build_adalora(model: nn.Module, config: AdaLoRAConfig, adapter_name: str) -> None:
    """Wrap the targets, give the model a RankAllocator, and install the training hooks."""
    names = find_targets(model, config.targets, accept=lambda m: is_linear(m) or isinstance(m, nn.Conv2d),
                         exclude=config.modules_to_save or (), expected=ADALORA_LAYERS)
    inject(model, names, lambda _name, base: AdaLoRA(base, config), adapter_name)
    state = state_of(model)
    first = "adalora" not in state.method_state
    state.method_state.setdefault("adalora", {})[adapter_name] = RankAllocator(config, names)
    # peftlab.train calls these (see train.py); a plain loop gets the regulariser from the forward
    # hook (when labels are given, as peft's model does) and calls update_and_allocate itself
    state.loss_terms["adalora"] = _training_loss
    state.after_step["adalora"] = _after_step
    if first:
        model.register_forward_hook(_add_orthogonal_loss)


# --------------------------------------------------------------------------------------------
# What a training loop calls
# --------------------------------------------------------------------------------------------
def _layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoRA]:
    """{layer name: AdaLoRA module} of one adapter, in model order."""
    layers = {}
    for name, layer in adapted_layers(model).items():
        if isinstance(layer.adapters[adapter_name] if adapter_name in layer.adapters else None, AdaLoRA):
            layers[name] = layer.adapters[adapter_name]
    return layers


def _allocators(model: nn.Module) -> dict[str, RankAllocator]:
    """{adapter name: RankAllocator} of the model's AdaLoRA adapters."""
    state = peek(model)
    return state.method_state.get("adalora", {}) if state else {}


def _active_adalora(model: nn.Module) -> str | None:
    name = active_name(model)
    return name if name in _allocators(model) else None


def _allocator(model: nn.Module, adapter_name: str | None) -> tuple[str, RankAllocator]:
    name = adapter_name or _active_adalora(model)
    allocators = _allocators(model)
    if name not in allocators:
        raise ConfigError(
            f"The model has no AdaLoRA adapter{f' named {name!r}' if name else ' active'}. Expected a "
            "model from peftlab.adapt(model, 'adalora', total_step=...); AdaLoRA adapters here: "
            f"{', '.join(allocators) or 'none'}."
        )
    return name, allocators[name]


def orthogonality(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Mean of ‖Q Qᵀ - I‖_F and ‖Pᵀ P - I‖_F over (Q, P) = (lora_A, lora_B) pairs, as peft sums it."""
    total, count = 0, 0
    for q, p in pairs:
        for gram in (q @ q.T, p.T @ p):  # (r, r) each
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            total = total + torch.norm(gram - eye, p="fro")
            count += 1
    return total / max(count, 1)


def orthogonal_regularizer(model: nn.Module, adapter_name: str | None = None) -> Tensor:
    """The regulariser R(P, Q) of one AdaLoRA adapter (default: the active one), unweighted."""
    name, _ = _allocator(model, adapter_name)
    return orthogonality([(a.lora_A, a.lora_B) for a in _layers(model, name).values()])


def update_and_allocate(model: nn.Module, global_step: int, adapter_name: str | None = None) -> dict[str, int]:
    """One AdaLoRA step, as peft's ``update_and_allocate``: call it after ``optimizer.step()`` and
    before ``optimizer.zero_grad()``, with ``global_step`` counting optimizer steps from 0.
    Returns the rank of every layer after this step: {layer name: rank}."""
    name, allocator = _allocator(model, adapter_name)
    layers = _layers(model, name)
    end = allocator.config.total_step - allocator.config.tfinal
    budget, prune = allocator.budget(global_step)
    if global_step < end:  # budget phase: learn importance, prune every deltaT steps
        allocator.update_importance(layers)
        if prune:
            allocator.mask_to_budget(layers, budget)
    elif global_step == end:  # the final allocation, then forget the statistics
        allocator.mask_to_budget(layers, budget)
        allocator.importance, allocator.uncertainty = {}, {}
    elif allocator.kept is not None:  # frozen allocation: undo any regrowth
        allocator.apply_mask(layers)
    ranks = allocator.ranks()
    allocator.history.append({"step": global_step, "budget": budget, "ranks": ranks})
    return ranks


def rank_allocation(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """{layer: rank} of the last allocation (init_r everywhere before the first); for
    ``peftlab.plots.rank_allocation``."""
    return _allocator(model, adapter_name)[1].ranks()


def rank_history(model: nn.Module, adapter_name: str | None = None) -> tuple[list[int], dict[str, list[int]]]:
    """(steps, {layer: [rank at each step]}) of every update_and_allocate call so far:
    ``peftlab.plots.rank_allocation(ranks, steps)`` draws it as a heatmap."""
    _, allocator = _allocator(model, adapter_name)
    steps = [h["step"] for h in allocator.history]
    return steps, {n: [h["ranks"][n] for h in allocator.history] for n in allocator.layer_names}


def rank_pattern(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[bool]]:
    """The last allocation in peft's format: {"<layer>.lora_E.<adapter>": [kept?] * init_r}."""
    name, allocator = _allocator(model, adapter_name)
    kept = allocator.kept or {}
    everything = [True] * allocator.config.init_r
    return {f"{layer}.lora_E.{name}": kept[layer].tolist() if layer in kept else everything
            for layer in allocator.layer_names}


# --------------------------------------------------------------------------------------------
# Hooks: peftlab.train's protocol (the model state's loss_terms / after_step) and peft's way
# --------------------------------------------------------------------------------------------
def _training_loss(model: nn.Module) -> Tensor | float:
    name = _active_adalora(model)
    if name is None:
        return 0.0
    return _allocators(model)[name].config.orth_reg_weight * orthogonal_regularizer(model, name)


def _after_step(model: nn.Module, step: int) -> None:
    if _active_adalora(model) is not None:
        update_and_allocate(model, step)


def _add_orthogonal_loss(model: nn.Module, args, output):
    """peft adds the regulariser to ``output.loss`` in its model's forward when labels are given;
    this forward hook on the top model does the same for the reference backend."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor) and _active_adalora(model) is not None:
        output.loss = loss + _training_loss(model)
    return output


def _peft_training_loss(peft_model: nn.Module) -> Tensor:
    tuner = peft_model.base_model
    name = tuner.trainable_adapter_name
    pairs = [(m.lora_A[name], m.lora_B[name]) for m in tuner.model.modules()
             if hasattr(m, "lora_E") and name in m.lora_E]
    return tuner.peft_config[name].orth_reg_weight * orthogonality(pairs)


def _peft_after_step(peft_model: nn.Module, step: int) -> None:
    peft_model.base_model.update_and_allocate(step)


def attach_peft_hooks(peft_model: nn.Module) -> None:
    """Give a peft AdaLoRA model the same hooks, so peftlab.train (which computes the loss from
    the logits, without labels) adds its regulariser and calls its update_and_allocate."""
    state = state_of(peft_model)
    state.loss_terms["adalora"] = _peft_training_loss
    state.after_step["adalora"] = _peft_after_step
