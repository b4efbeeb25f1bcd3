"""EVA: LoRA's A started from the principal directions of each layer's inputs, ranks redistributed.

Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", https://arxiv.org/abs/2410.07170. Checked against peft 0.21.2
(``peft.tuners.lora.eva``, ``initialize_lora_eva_weights``), whose algorithm this repeats step by step.

For each target layer, the inputs X (tokens x d_in, padding and label-masked tokens left out) of
a few batches feed an incremental PCA (sklearn's, with a randomized SVD of seed 42, as peft's):

        X - mean ≈ U S Vᵀ        A0 = V[:, :k]ᵀ   (the top-k right singular vectors, k x d_in)
        B0 = 0                   so the output at init is the base model's; W stays as it is

Batches are fed in turn (cycling) until, for every layer, the components it needs have stopped
moving: cos(v_i now, v_i before) >= tau. The rank budget is then redistributed: each layer offers
up to rho · r components with their explained-variance ratios, the (layers x r) largest ratios win,
and a layer gets as many components as it won (0: it is not adapted). With
``adjust_scaling_factors``, alpha_l = alpha · r_l / r, so every layer keeps scaling alpha / r.
Layers that read the same input (q, k, v) share one PCA. The per-layer ranks are kept on the
config as ``rank_pattern`` / ``alpha_pattern`` (peft's names), so a saved adapter says them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from itertools import cycle
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import find_targets, inject, is_linear, layer_dims
from peftlab.methods.base import check_range
from peftlab.methods.lora import LoRA, LoRAConfig
from peftlab.methods.lora_data_init import check_data


@dataclass(frozen=True)
class EvaConfig(LoRAConfig):
    """LoRA with EVA's data-driven A and rank redistribution; peft: init_lora_weights="eva" + EvaConfig."""

    init: str = "eva"
    rho: float = 2.0  # a layer may take up to rho · r components (1.0: no redistribution)
    tau: float = 0.99  # cosine similarity at which a component counts as converged
    use_label_mask: bool = True  # leave out tokens whose label is label_mask_value
    label_mask_value: int = -100
    whiten: bool = False  # divide each component by the square root of its singular value
    adjust_scaling_factors: bool = True  # alpha_l = alpha · r_l / r: the same scaling on every layer
    data: Any = field(default=None, compare=False, repr=False)  # batches for model(**batch)
    # rank_pattern / alpha_pattern (LoRA's fields) are filled in by prepare_eva, as peft fills them:
    # {layer: its rank / alpha} where not r / alpha
    eva_state: dict[str, Tensor] | None = field(default=None, compare=False, repr=False)  # {layer: A0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "eva":
            raise ConfigError(f"The eva method is LoRA with init='eva'; got init={self.init!r}. "
                              "Expected init='eva'; for another init use method 'lora'.")
        check_range("rho", self.rho, low=1.0)
        check_range("tau", self.tau, low=0.0, high=1.0)
        if (self.rank_pattern or self.alpha_pattern) and self.eva_state is None:
            raise ConfigError("rank_pattern / alpha_pattern are EVA's output (the ranks it chose), not an "
                              "input. Expected them left out; EVA fills them in from data.")

    def rank_of(self, name: str) -> int:
        return (self.rank_pattern or {}).get(name, self.r)


class _IncrementalPCA:
    """peft 0.21.2's IncrementalPCA(n_components, copy=True, lowrank=True, lowrank_seed=42), which
    follows sklearn's: each batch is centred and stacked under the previous S·Vᵀ before an SVD."""

    def __init__(self, n_components: int) -> None:
        self.n_components, self.q = n_components, 2 * n_components
        self.components_: Tensor | None = None

    def partial_fit(self, X: Tensor) -> None:
        X = X.clone()
        n_samples, n_features = X.shape
        if self.n_components > n_features:
            raise ConfigError(f"EVA asks a layer with {n_features} inputs for {self.n_components} components. "
                              "Expected rho · r <= d_in; try a smaller r or rho=1.0.")
        first = self.components_ is None
        if first:
            self.mean_, self.var_, self.n_seen = None, None, torch.tensor([0], device=X.device)
        col_mean, col_var, n_total = _mean_and_var(X, self.mean_, self.var_, self.n_seen)
        if first:
            X -= col_mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            correction = torch.sqrt((self.n_seen.double() / n_total) * n_samples) * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X, correction))
        with torch.random.fork_rng():
            torch.manual_seed(42)
            U, S, V = torch.svd_lowrank(X, q=self.q, niter=4)
        Vt = V.mH
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])  # sklearn's svd_flip
        Vt *= signs.view(-1, 1)
        self.n_seen, self.mean_, self.var_ = n_total, col_mean, col_var
        self.components_, self.singular_values_ = Vt[:self.n_components], S[:self.n_components]
        self.explained_variance_ratio_ = (S**2 / torch.sum(col_var * n_total))[:self.n_components]


def _mean_and_var(X: Tensor, last_mean, last_var, last_count) -> tuple[Tensor, Tensor, Tensor]:
    """Running column mean and variance, in float64 (sklearn's _incremental_mean_and_var)."""
    new_count = torch.tensor([X.shape[0]], device=X.device)
    count = last_count + new_count
    last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None else last_mean * last_count
    new_sum = X.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    temp = X - new_sum / new_count
    correction = temp.sum(dim=0, dtype=torch.float64).square()
    temp.square_()
    new_unnormalized = temp.sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_var is None:
        return mean, new_unnormalized / count, count
    ratio = last_count.double() / new_count
    unnormalized = last_var * last_count + new_unnormalized + ratio / count * (last_sum / ratio - new_sum).square()
    return mean, unnormalized / count, count


class _LayerPCA:
    """The forward hook of one layer: its input tokens (rows ``index`` picks) into an incremental PCA."""

    def __init__(self, name: str, n_components: int, tau: float) -> None:
        self.name, self.svd, self.tau, self.active, self.index = name, _IncrementalPCA(n_components), tau, True, None
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, _module: nn.Module, args: tuple, _output: Any) -> None:
        if not self.active:
            return
        previous = None if self.svd.components_ is None else self.svd.components_.clone()
        states = _layer_tokens(args, self.index, self.name)  # (tokens, d_in)
        if states.size(0) < self.svd.n_components:  # too few tokens for this many components: skip
            return
        self.svd.partial_fit(states.to(torch.float32))
        if previous is not None:
            sim = nn.functional.cosine_similarity(self.svd.components_, previous)
            self.converged = sim >= self.tau


def _layer_tokens(args: tuple, index: Tensor, name: str) -> Tensor:
    """The layer input's rows at the (batch, position) pairs ``index``: (tokens, d_in)."""
    x = args[0]
    if x.dim() != 3 or index.numel() and (index.max(0).values >= torch.tensor(x.shape[:2])).any():
        raise ConfigError(
            f"EVA reads layer {name!r}'s input at the token positions of input_ids, but it gets a "
            f"{tuple(x.shape)} tensor that is not laid out as (batch, tokens, d_in). Expected layers that "
            "see every token (attention and feed-forward projections); try other targets, or init='pissa'.")
    return x[index.T.unbind()]


def token_index(batch: dict, config: EvaConfig) -> Tensor:
    """(tokens, 2) positions of the tokens EVA uses: attention mask on, label not masked (peft's rule;
    labels of another shape than input_ids, a classifier's, mask nothing here, where peft fails)."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    labels = batch.get("labels")
    if config.use_label_mask and labels is not None and labels.shape == mask.shape:
        mask = torch.logical_and(mask, labels != config.label_mask_value)
    return mask.nonzero()


def _groups_of_equal_inputs(model: nn.Module, names: list[str], batch: dict, config: EvaConfig) -> list[list[str]]:
    """Layers whose inputs on ``batch`` are equal, in order of first appearance (peft hashes them)."""
    seen: dict[str, Tensor] = {}
    index = token_index(batch, config)

    def keep(name: str):
        def hook(_module: nn.Module, args: tuple, _output: Any) -> None:  # None: the output stays as it is
            seen.setdefault(name, _layer_tokens(args, index, name))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in names:
        same = next((g for g in groups if torch.equal(seen[g[0]], seen[name])), None)
        same.append(name) if same is not None else groups.append([name])
    return groups


def _rank_distribution(pcas: dict, layer_pca: dict, duplicates: dict, budget: int, max_components: dict) -> dict:
    """The budget's components go to the largest explained-variance ratios over all layers (peft's)."""
    ratios = {k: p.svd.explained_variance_ratio_[:max_components[k]] for k, p in pcas.items()}
    keys, values = zip(*[(k, c) for k, name in layer_pca.items() for c in ratios[name]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {k: counts.get(k, 0) for k in layer_pca}
    for k, k_pca in duplicates.items():  # the layer that holds a shared PCA takes the larger rank
        if counts[k_pca] < counts[k]:
            counts[k_pca], counts[k] = counts[k], counts[k_pca]
    return counts


@torch.no_grad()
def eva_components(model: nn.Module, names: list[str], batches: list[dict], config: EvaConfig) -> dict[str, Tensor]:
    """{layer: A0 (r_l, d_in)} for the named linear layers of a model without this adapter."""
    rho = config.rho
    if rho > 1000:  # peft's ceiling for very large rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    training = model.training
    model.eval()
    max_components = {n: round(config.r * rho) for n in names}
    groups = [g for g in _groups_of_equal_inputs(model, names, batches[0], config) if len(g) > 1]
    duplicates = {other: g[0] for g in groups for other in g[1:]}
    for g in groups:
        for n in g:
            max_components[n] = max(max_components[m] for m in g)
    pcas = {n: _LayerPCA(n, max_components[n], config.tau) for n in names if n not in duplicates}
    handles = [model.get_submodule(n).register_forward_hook(p) for n, p in pcas.items()]
    layer_pca = {**{n: n for n in pcas}, **duplicates}
    converged, ranks = dict.fromkeys(pcas, False), dict(max_components)
    try:
        for step, batch in enumerate(cycle(batches)):
            _check_progress(step, len(batches), pcas, max_components)
            index = token_index(batch, config)
            for name, pca in pcas.items():
                done = bool(torch.all(pca.converged[:ranks[name]]))
                if not converged[name] and done and pca.active:
                    pca.active, converged[name] = False, True
                    continue
                if converged[name] and not done:
                    pca.active, converged[name] = True, False
                pca.index = index
            if all(converged.values()):
                break
            model(**batch)
            if all(p.svd.components_ is not None for p in pcas.values()):
                ranks = _rank_distribution(pcas, layer_pca, duplicates, config.r * len(names), max_components)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    state = {}
    for name in names:
        pca = pcas[layer_pca[name]]
        u = pca.svd.components_[:ranks[name]]
        if config.whiten:  # in place, as peft 0.21.2: layers sharing a PCA divide the same tensor again
            u /= pca.svd.singular_values_[:ranks[name]].sqrt().reshape(-1, 1)
        state[name] = u
    return state


MAX_PASSES = 100  # peft cycles the batches until convergence, however long; peftlab stops here


def _check_progress(step: int, n_batches: int, pcas: dict, max_components: dict) -> None:
    """A clear error where peft would loop for ever: too few tokens for the components, or no convergence."""
    starved = [n for n, p in pcas.items() if p.svd.components_ is None]
    if step == n_batches and starved:
        raise ConfigError(
            f"EVA got no batch with enough tokens for layer {starved[0]!r}: it needs at least "
            f"rho · r = {max_components[starved[0]]} unmasked tokens per batch. Expected larger batches; "
            "try more or longer rows per batch, a smaller r, or rho=1.0.")
    if step == MAX_PASSES * n_batches:
        raise ConfigError(
            f"EVA's components did not converge in {MAX_PASSES} passes over the {n_batches} batches. "
            "Expected them to settle (cosine >= tau); try more varied batches, or a lower tau.")


def _names(model: nn.Module, config: EvaConfig) -> list[str]:
    return find_targets(model, config.targets, accept=is_linear, exclude=config.modules_to_save or (),
                        expected="a linear layer (nn.Linear, Conv1D): EVA reads its inputs")


def check_eva_model(model: nn.Module) -> None:
    """EVA reads every layer's inputs at the token positions of input_ids: not an encoder-decoder's."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            "EVA on an encoder-decoder model is not supported: it picks each layer's input tokens by the "
            "positions of input_ids, and the decoder's layers see the target sequence (peft 0.21.2 fails "
            "there too). Expected a decoder-only or encoder-only model; try init='pissa' or method 'lora'.")


def prepare_eva(model: nn.Module, config: EvaConfig, adapter_name: str) -> EvaConfig:
    """Run EVA on ``config.data``: the config with the chosen A0s and per-layer ranks (``prepare`` hook)."""
    check_eva_model(model)
    state = eva_components(model, _names(model, config), check_data(config.data, "eva"), config)
    ranks = {n: u.shape[0] for n, u in state.items() if u.shape[0] != config.r}
    alphas = {n: config.alpha * u.shape[0] / config.r for n, u in state.items()
              if config.adjust_scaling_factors and 0 < u.shape[0] != config.r}
    return dataclasses.replace(config, eva_state=state, rank_pattern=ranks, alpha_pattern=alphas)


def build_eva(model: nn.Module, config: EvaConfig, adapter_name: str) -> None:
    """LoRA with rank r_l on each layer EVA gave components (A = them, B = 0); none where r_l = 0."""
    if config.eva_state is None:
        config = prepare_eva(model, config, adapter_name)
    names = [n for n in _names(model, config) if config.rank_of(n) > 0]

    def make(name: str, base: nn.Module) -> LoRA:
        alpha = (config.alpha_pattern or {}).get(name, config.alpha)
        adapter = LoRA(base, dataclasses.replace(config, r=config.rank_of(name), alpha=alpha))
        adapter.lora_A.data.copy_(config.eva_state[name])
        return adapter

    inject(model, names, make, adapter_name)


def eva_parameter_count(model: nn.Module, config: EvaConfig) -> int:
    """Σ over the target layers of r_l · (d_in + d_out), r_l the rank EVA gave the layer."""
    return sum(config.rank_of(n) * sum(layer_dims(model.get_submodule(n))) for n in _names(model, config))
