"""The Adapter contract and the wrapper that carries a layer's adapters (AdaptedLayer), plus
the trainable copy of a whole module (modules_to_save)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject.gather import LowRank, mixed_update
from peftlab.inject.layers import is_linear, is_quantized

# --------------------------------------------------------------------------------------------
# Adapters and the wrapper that carries them
# --------------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """One adapter on one base layer. Methods subclass this.

    ``forward(x, base, result)`` returns the adapted output given the base layer's output
    ``result``. ``delta_weight(base)`` returns the effective change of the base weight, in the
    base weight's own shape and layout, so that merging is ``W += delta_weight``; an adapter that
    also changes the base bias (IA3 scaling an output, BitFit) returns that change from
    ``delta_bias(base)``, so that merging also does ``b += delta_bias``.
    """

    mergeable: ClassVar[bool] = True
    # why merge refuses an adapter with mergeable = False (shown to the user)
    unmergeable_reason: ClassVar[str] = "its update is not a fixed change of that weight"
    # True when delta_weight depends on the base weight itself (DoRA, OFT): unmerging must then
    # subtract the delta that was added, not a fresh one computed from the merged weight.
    delta_uses_base: ClassVar[bool] = False
    # True for an extra that rides along with a method's adapter on a layer that is not one of its
    # targets (LoRA's trainable tokens): a saved config's target_modules leaves such layers out
    rides_along: ClassVar[bool] = False

    # the convolution types this adapter can wrap too (none: linear layers and embeddings only)
    conv_layers: ClassVar[tuple[type[nn.Module], ...]] = ()
    # the layers this adapter can wrap, in words for the error that refuses the others
    layer_types: ClassVar[str] = "a linear layer (nn.Linear, transformers' Conv1D) or an nn.Embedding"

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        """Whether this adapter can wrap ``module`` (find_targets refuses the others by name)."""
        return is_linear(module) or isinstance(module, (nn.Embedding, *cls.conv_layers))

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no weight-space delta.")

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        """The change of the base layer's bias that merging adds; None: the bias stays as it is."""
        return None

    def release(self) -> None:
        """Undo what the adapter set up outside its layer (hooks); called as it is removed."""

    # Optional members: an adapter that changes what its layer computes with, rather than adding
    # to the layer's output, overrides these (see :func:`overrides`).
    def layer_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> Tensor:
        """The layer's whole output when this adapter runs first on it: the base layer on a turned
        input (OFT, BOFT) or with updated weights (LoRA on nn.MultiheadAttention, on parameters)."""
        raise NotImplementedError

    def merge_into(self, base: nn.Module, sign: int) -> None:
        """Merge (sign +1) or unmerge (-1) in place, for an update that is not one weight delta
        (several tensors of the layer: nn.MultiheadAttention, LoRA on parameters)."""
        raise NotImplementedError

    def peft_names(self) -> dict[str, str]:
        """{our parameter: peft's in-memory name template}, where peft's layout is not the
        method's usual one (LoRA on parameters: peft's nested wrappers)."""
        raise NotImplementedError

    def low_rank(self) -> LowRank | None:
        """This adapter's update as s · B A x, for a mixed batch to stack with other adapters'
        (peftlab/inject/gather.py); None (the default) where its update is not that, or not for
        this call (LoRA with a bias, on an embedding, or with dropout while training)."""
        return None


class LinearAdapter(Adapter):
    """An adapter of linear layers only (nn.Linear, transformers' Conv1D): no embeddings, no
    convolutions. Methods whose update needs a weight matrix with an input side subclass this."""

    layer_types: ClassVar[str] = "a linear layer (nn.Linear, transformers' Conv1D)"

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        return is_linear(module)


def overrides(adapter: Adapter, member: str) -> bool:
    """Whether ``adapter``'s class provides its own optional ``member`` (layer_forward,
    merge_into, peft_names) instead of Adapter's."""
    return getattr(type(adapter), member, None) is not getattr(Adapter, member)


class AdaptedLayer(nn.Module):
    """A frozen base layer plus named adapters; runs the active ones, skipping merged ones."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._merged_deltas: dict[str, Tensor] = {}
        self._merged_bias_deltas: dict[str, Tensor] = {}
        # one adapter name per example of the batch ("__base__": none), set for the duration of
        # one call by peftlab.compose's mixed-batch hook; None: every example runs `active`
        self.example_adapters: list[str] | None = None

    # the base layer's tensors, for model code that reads them through the layer (T5 checks
    # ``self.wo.weight.dtype``); peft's layers pass them through the same way
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled and self.merged:  # the forward never changes weights: set_disabled unmerges
            raise ConfigError(
                f"This layer is disabled but adapters {self.merged} are merged into its weight, so it "
                "cannot compute the base model. Expected peftlab.set_disabled(model, True), which "
                "unmerges first; try peftlab.unmerge(model) before disabling layers by hand."
            )
        pending = [] if self.disabled else [name for name in self.active if name not in self.merged]
        first = self.adapters[pending[0]] if pending and self.example_adapters is None else None
        if first is not None and overrides(first, "layer_forward"):
            # the adapter runs the base layer on its own transformed input (OFT, BOFT)
            result, pending = first.layer_forward(x, self.base_layer, *args, **kwargs), pending[1:]
        else:
            result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.example_adapters is not None:
            return self._per_example(x, result, self.example_adapters)
        for name in pending:  # further adapters add to the output (``forward``)
            result = self.adapters[name](x, self.base_layer, result)
        return result

    def set_example_adapters(self, names: Sequence[str] | None) -> None:
        """Route example i of the coming calls to adapter ``names[i]`` ("__base__": none), or
        stop routing (None). peftlab.routing sets and clears this around a call or a generation."""
        self.example_adapters = None if names is None else list(names)
        self.forget_gathered()

    def forget_gathered(self) -> None:
        """Drop whatever this layer keeps from a mixed batch's factors, so the next call reads the
        adapters afresh (after a hot-swap or a rank padding). The reference keeps nothing; the
        fused backend keeps each row's gathered factors (production/fused/gather.py)."""

    def mixed_factors(self, x: Tensor, names: Sequence[str]) -> dict[str, LowRank] | None:
        """The low-rank factors of the adapters a mixed batch runs on this layer, when every one
        has them in one dtype (then the rows can be stacked: inject/gather.py); None otherwise.
        Refuses what no form can run on some rows only: merged adapters, whole-layer changes."""
        if self.merged:
            raise ConfigError(
                f"Adapters {self.merged} are merged into the base weight, so they would apply to every "
                "example. Expected unmerged adapters for a mixed batch; try peftlab.unmerge(model) first."
            )
        present = [n for n in dict.fromkeys(names) if n != "__base__" and n in self.adapters]
        for name in present:
            if overrides(self.adapters[name], "merge_into"):  # MultiheadAttention, parameters: whole-layer changes
                raise ConfigError(
                    f"Adapter {name!r} changes what this layer computes with ({type(self.adapters[name]).__name__}), "
                    "so it cannot run on some rows of a batch only. Expected adapters that add to the "
                    "layer's output (LoRA on linear layers, ...); try one adapter per batch with set_adapter."
                )
        if x.shape[0] != len(names):
            raise ConfigError(
                f"A mixed batch names {len(names)} adapters but this layer sees {x.shape[0]} examples "
                "(generate with num_beams or num_return_sequences repeats each example). Expected one "
                "adapter name per example; try repeating each name as many times as its example is."
            )
        factors = {n: self.adapters[n].low_rank() for n in present}
        if any(f is None for f in factors.values()):
            return None
        dtypes = {f.A.dtype for f in factors.values()} | {f.B.dtype for f in factors.values()}
        return factors if len(dtypes) <= 1 else None

    def _per_example(self, x: Tensor, result: Tensor, names: list[str]) -> Tensor:
        """Example i runs adapter names[i] alone. Where every adapter present is a low-rank update
        (LoRA), all rows run at once in the gather or segment form (inject/gather.py); otherwise
        each adapter runs on its own rows of the batch, as peft does."""
        factors = self.mixed_factors(x, names)
        if factors:
            dtype = next(iter(factors.values())).A.dtype
            return (result + mixed_update(x.to(dtype), factors, names)).to(result.dtype)
        for name in dict.fromkeys(names):  # each distinct name once, in order of appearance
            if name == "__base__" or name not in self.adapters:
                continue  # base rows (and adapters that skip this layer) keep the base output
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=result.device)
            adapted = self.adapters[name](x[rows], self.base_layer, result[rows])
            result = result.index_put((rows,), adapted)
        return result

    def delta_weight(self, name: str | None = None) -> Tensor:
        """ΔW of one adapter (default: the first active one), same shape as base_layer.weight."""
        name = name or self.active[0]
        return self.adapters[name].delta_weight(self.base_layer)

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        for name in names if names is not None else self.active:
            if name in self.merged:
                continue
            adapter = self.adapters[name]
            if not adapter.mergeable:
                raise ConfigError(
                    f"{type(adapter).__name__} cannot be merged into the base weight: "
                    f"{adapter.unmergeable_reason}. Keep it unmerged."
                )
            if overrides(adapter, "merge_into"):  # it changes parameters other than weight (LoRA on parameters)
                adapter.merge_into(self.base_layer, +1)
                self.merged.append(name)
                continue
            delta = adapter.delta_weight(self.base_layer)
            bias_delta = adapter.delta_bias(self.base_layer)  # both from the unmerged base
            _add_to_weight(self.base_layer, delta)
            if bias_delta is not None:
                self.base_layer.bias.data += bias_delta.to(self.base_layer.bias.dtype)
            if adapter.delta_uses_base:
                self._merged_deltas[name] = delta
                if bias_delta is not None:
                    self._merged_bias_deltas[name] = bias_delta
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            if overrides(self.adapters[name], "merge_into"):
                self.adapters[name].merge_into(self.base_layer, -1)
                continue
            delta = self._merged_deltas.pop(name, None)
            bias_delta = self._merged_bias_deltas.pop(name, None)
            if delta is None:
                delta = self.adapters[name].delta_weight(self.base_layer)
                bias_delta = self.adapters[name].delta_bias(self.base_layer)
            _add_to_weight(self.base_layer, -delta)
            if bias_delta is not None:
                self.base_layer.bias.data -= bias_delta.to(self.base_layer.bias.dtype)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"


def _add_to_weight(module: nn.Module, delta: Tensor) -> None:
    weight = module.weight
    # peftlab's own Linear4bitRef says so itself: its `weight` is a fresh dequantised copy
    if is_quantized(weight) or getattr(module, "is_quantized", False):
        raise ConfigError(
            "Merging into a 4-bit (NF4) base weight would re-quantise it and lose precision. "
            "Expected a full-precision base. Try loading the base without quantization, loading "
            "the adapter there, then merging."
        )
    weight.data += delta.to(weight.dtype)


def base_of(module: nn.Module) -> nn.Module:
    """The layer itself, or its frozen base layer if it already carries adapters."""
    return module.base_layer if isinstance(module, AdaptedLayer) else module


class TrainableCopy(nn.Module):
    """A whole module trained alongside an adapter (e.g. a classifier head): peft's
    ``modules_to_save``. The original stays untouched, so disabling gives back the base model."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def add(self, name: str) -> None:
        import copy

        self.copies[name] = copy.deepcopy(self.original_module)
        self.copies[name].requires_grad_(True)
        self.active = [name]

    def forward(self, *args, **kwargs):
        if self.disabled or not self.active:
            return self.original_module(*args, **kwargs)
        return self.copies[self.active[0]](*args, **kwargs)
