"""Trainable tokens: train a few rows of an embedding (new or under-trained tokens), not all.

For token ids I = {i_1, ..., i_k} of an embedding E (V x d), the adapter holds T (k x d), a
trainable copy of those rows, and the layer uses

    E' = E with E'[i_j] = T_j          (the other V - k rows stay frozen)

so a learner can teach a model a few new tokens (a chat template's markers, a new word) with
k·d parameters instead of V·d. It rides along with LoRA as peft's ``trainable_token_indices``:
a list of ids means the model's input embedding, a dict names the embedding layers. When the
output head shares its weight with the input embedding (tied embeddings), the head reads the
same T, as peft ties them.

Merged, E += ΔE with ΔE zero except the rows I, where it is T - E[I]; peft saves T itself, as
``<embedding>.token_adapter.trainable_tokens_delta``.

As a method of its own (registry name ``trainable_tokens``, peft's ``TrainableTokensConfig``) it
trains only those rows, of the input embedding unless ``targets`` names others; peft saves T as
``<embedding>.trainable_tokens_delta``. peft's default ``token_indices=[]`` trains nothing, so
peftlab asks for the ids. It is kept unmerged: most decoder LMs tie the output head to the
embedding, and peftlab merges no weight that two modules share (a row lookup costs nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import (AdaptedLayer, Adapter, adapted_layers, base_of, default_modules_to_save, embed_scale,
                            find_targets, inject, modules_to_save_paths)
from peftlab.methods.base import AdapterConfig

# what a config may hold: ids for the input embedding, or {embedding layer name: ids}
TokenIndices = Sequence[int] | dict[str, Sequence[int]]


class TrainableTokens(Adapter):
    """E'[i] = T_j for the chosen ids i = I_j, E[i] otherwise; on a tied output head, logits = h E'^T."""

    layer_types = "an nn.Embedding, or the linear output head that shares its weight"
    rides_along = True  # not a target of the method it comes with
    unmergeable_reason = "the rows are shared with a tied output head, so a merge of one would change both"

    def __init__(self, base: nn.Module, indices: Sequence[int], tied_to: TrainableTokens | None = None) -> None:
        super().__init__()
        weight = base.weight
        rows = len(weight) if isinstance(base, nn.Embedding) else weight.shape[0]
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < rows]
        if bad or not indices or len(set(indices)) != len(indices):
            raise ConfigError(
                f"trainable_token_indices={list(indices)!r} does not fit a {type(base).__name__} of "
                f"{rows} tokens. Expected distinct token ids in [0, {rows}); try "
                "tokenizer.convert_tokens_to_ids([...]) for the tokens to train."
            )
        self.register_buffer("token_indices", torch.tensor(list(indices)), persistent=False)
        if tied_to is None:
            self.trainable_tokens_delta = nn.Parameter(weight[self.token_indices].detach().clone())
        # a tied head holds no tensor of its own: it reads its embedding's rows (a list, so the
        # Parameter is not registered twice)
        self._tied_to = [tied_to] if tied_to is not None else []

    @property
    def rows(self) -> Tensor:
        """T, the trained rows (k x d)."""
        return self._tied_to[0].trainable_tokens_delta if self._tied_to else self.trainable_tokens_delta

    @property
    def mergeable(self) -> bool:  # the embedding and its tied head would merge the same rows twice
        return not self._tied_to

    def adapted_weight(self, base: nn.Module) -> Tensor:
        """E' = E with rows I replaced by T."""
        return base.weight.index_copy(0, self.token_indices.to(base.weight.device), self.rows.to(base.weight))

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        weight = self.adapted_weight(base)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
            scale = embed_scale(base)  # Gemma's scaled embeddings multiply by √d
            return out if scale is None else out * scale.to(out.dtype)
        return F.linear(x, weight, base.bias)

    def delta_weight(self, base: nn.Module) -> Tensor:
        """ΔE: zero except rows I, where it is T - E[I]."""
        return self.adapted_weight(base) - base.weight


def _input_embedding_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
    if name is None:  # peft's fallback: a module called embed_tokens
        name = next((n for n, m in model.named_modules() if n.split(".")[-1] == "embed_tokens"), None)
    if name is None:
        raise ConfigError(
            "trainable_token_indices as a list means the model's input embedding, but this model has "
            "none peftlab can find (no get_input_embeddings(), no embed_tokens). Expected a dict "
            "naming the embedding layer; try trainable_token_indices={'<embedding name>': [ids]}."
        )
    return name


def token_layers(model: nn.Module, indices: TokenIndices) -> dict[str, tuple[int, ...]]:
    """{embedding layer name: ids}: a list of ids goes to the input embedding, as in peft."""
    if isinstance(indices, dict):
        layers = {}
        for key, ids in indices.items():
            found = [n for n, _ in model.named_modules() if n == key or n.endswith("." + key)]
            if len(found) != 1:
                raise ConfigError(
                    f"trainable_token_indices names {key!r}, which matches {len(found)} modules "
                    f"{found[:3]}. Expected exactly one nn.Embedding; try its full name."
                )
            layers[found[0]] = tuple(ids)
        return layers
    return {_input_embedding_name(model): tuple(indices)}


def _tied_heads(model: nn.Module, embedding: nn.Module) -> list[str]:
    """The modules whose weight is the embedding's (an LM head with tied embeddings)."""
    return [n for n, m in model.named_modules() if m is not embedding and not isinstance(m, AdaptedLayer)
            and isinstance(base_of(m), nn.Linear) and base_of(m).weight is embedding.weight]


def add_trainable_tokens(model: nn.Module, indices: TokenIndices, adapter_name: str,
                         adapted: Sequence[str] = ()) -> None:
    """Wrap each embedding named by ``indices`` (and a head tied to it) with TrainableTokens."""
    for name, ids in token_layers(model, indices).items():
        embedding = base_of(model.get_submodule(name))
        if not isinstance(embedding, nn.Embedding):
            raise ConfigError(
                f"trainable_token_indices names {name!r}, a {type(embedding).__name__}. Expected an "
                "nn.Embedding; try the model's input embedding (a list of ids picks it)."
            )
        if name in adapted:
            raise ConfigError(
                f"{name!r} is both a target of the method and in trainable_token_indices, so two "
                "updates would claim the same embedding rows. Expected one of them; try leaving "
                f"{name!r} out of the targets."
            )
        layers: dict[str, TrainableTokens] = {}
        inject(model, [name], lambda _n, base: layers.setdefault("source", TrainableTokens(base, ids)),
               adapter_name)
        heads = _tied_heads(model, embedding)
        inject(model, heads, lambda _n, base: TrainableTokens(base, ids, tied_to=layers["source"]), adapter_name)


# --------------------------------------------------------------------------------------------
# trainable tokens as a method of its own (peft's TrainableTokensConfig)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainableTokensConfig(AdapterConfig):
    # targets: the embeddings whose rows train; None: the model's input embedding
    token_indices: tuple[int, ...] = ()  # the token ids whose rows train (distinct, at least one)
    init_weights: bool = True  # True: the rows start as the pretrained ones; False: N(0, 1)

    def __post_init__(self) -> None:
        if isinstance(self.token_indices, (list, range)):
            object.__setattr__(self, "token_indices", tuple(self.token_indices))
        if not isinstance(self.token_indices, tuple) or not self.token_indices:
            raise ConfigError(
                f"trainable_tokens needs token_indices, got {self.token_indices!r}. Expected the ids of the tokens "
                "to train (peft's default, none, trains nothing); try "
                "token_indices=tokenizer.convert_tokens_to_ids([...])."
            )
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid. Expected True or False.")


class StandaloneTrainableTokens(TrainableTokens):
    """TrainableTokens as the method itself; its rows may start random (init_weights=False)."""

    unmergeable_reason = ("peftlab keeps trainable tokens unmerged (a tied output head shares the embedding, and "
                          "peftlab merges no shared weight); the row lookup costs nothing at inference")

    def __init__(self, base: nn.Module, indices: Sequence[int], tied_to: TrainableTokens | None = None,
                 random_rows: bool = False) -> None:
        super().__init__(base, indices, tied_to)
        if random_rows and tied_to is None:  # peft: torch.randn((k, d)) in the weight's dtype
            with torch.no_grad():
                self.trainable_tokens_delta.copy_(torch.randn(self.trainable_tokens_delta.shape))

    @property
    def mergeable(self) -> bool:
        return False


def resolve_trainable_tokens(model: nn.Module, config: TrainableTokensConfig) -> TrainableTokensConfig:
    """"all-linear" (the default: no architecture names embeddings) means the input embedding.
    peft's TrainableTokensConfig has no modules_to_save, so a classifier's head stays frozen (the
    default head is dropped; one asked for is refused)."""
    default = modules_to_save_paths(model, default_modules_to_save(model))
    if config.modules_to_save and config.modules_to_save != default:
        raise ConfigError(
            f"trainable_tokens cannot train whole modules (modules_to_save={config.modules_to_save!r}): peft's "
            "TrainableTokensConfig has no such field, so peft could not save or load them. Expected no "
            "modules_to_save; try method 'lora' with trainable_token_indices=[...] and modules_to_save."
        )
    targets = (_input_embedding_name(model),) if config.targets == "all-linear" else config.targets
    return dataclasses.replace(config, targets=targets, modules_to_save=())


def build_trainable_tokens(model: nn.Module, config: TrainableTokensConfig, adapter_name: str) -> None:
    """The chosen rows of each targeted embedding, and of an output head tied to it, train."""
    names = find_targets(model, config.targets, accept=lambda m: isinstance(m, nn.Embedding),
                         exclude=config.modules_to_save or (), expected="an nn.Embedding")
    for name in names:
        embedding = base_of(model.get_submodule(name))
        rows = StandaloneTrainableTokens(embedding, config.token_indices, random_rows=not config.init_weights)
        inject(model, [name], lambda _n, _base: rows, adapter_name)
        heads = tied_modules(model, embedding)  # they read the same rows
        inject(model, heads, lambda _n, base: StandaloneTrainableTokens(base, config.token_indices, tied_to=rows),
               adapter_name)


def tied_modules(model: nn.Module, embedding: nn.Module) -> list[str]:
    """The modules that share the embedding's weight, as peft ties them: an LM head, and the
    encoder's and decoder's own embedding modules of T5 and BART (which share ``shared``)."""
    return [n for n, m in model.named_modules() if m is not embedding and not isinstance(m, AdaptedLayer)
            and isinstance(base_of(m), (nn.Linear, nn.Embedding)) and base_of(m).weight is embedding.weight]


def tied_rows(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """{tied module path: the rows it reads} for a model's trainable-tokens adapter: peft saves
    them under each tied module as well (the same tensor)."""
    return {path: layer.adapters[adapter_name].rows for path, layer in adapted_layers(model).items()
            if adapter_name in layer.adapters and isinstance(layer.adapters[adapter_name], TrainableTokens)
            and layer.adapters[adapter_name]._tied_to}


def trainable_tokens_parameter_count(model: nn.Module, config: TrainableTokensConfig) -> int:
    """k · d per targeted embedding (k token ids, d its width); a tied head adds none."""
    names = find_targets(model, config.targets, accept=lambda m: isinstance(m, nn.Embedding),
                         exclude=config.modules_to_save or (), expected="an nn.Embedding")
    return sum(len(config.token_indices) * base_of(model.get_submodule(n)).embedding_dim for n in names)
