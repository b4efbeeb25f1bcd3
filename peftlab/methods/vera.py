"""VeRA: Vector-based Random Matrix Adaptation.

Kopiczko et al., 2024, https://arxiv.org/abs/2310.11454

One pair of random matrices, A (r x d_in) and B (d_out x r), is drawn once from a seed, frozen,
and shared by every adapted layer. Each layer trains only two scaling vectors (paper, eq. 2):

        ΔW = Λ_b B Λ_d A         Λ_b = diag(b), b ∈ R^d_out (starts 0)
                                 Λ_d = diag(d), d ∈ R^r     (starts d_initial)

        x ──┬─────────────────────── W0 ──────────────────────┐
            │                                                (+) ──▶ h = W0 x + b ⊙ B (d ⊙ A x)
            └─ dropout ─ A ─ ⊙ d ─ B ─ ⊙ b ───────────────────┘
                         └ shared, frozen ┘

So a layer trains d_out + r numbers, whatever r is: VeRA affords r = 256 where LoRA uses 8.
Layers of different shapes slice the shared matrices, A[:, :d_in] and B[:d_out, :], which are
sized for the largest targeted layer. A and B are Kaiming-uniform from a torch.Generator seeded
with ``projection_prng_key`` exactly as peft draws them, so a key gives the same matrices in
both; ``save_projection=True`` also stores them in the adapter file (peft's keys
``base_model.vera_A`` / ``base_model.vera_B``), so loading need not trust the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import (Adapter, adapted_layers, base_of, find_targets, inject, is_conv1d, is_linear,
                            layer_dims)
from peftlab.methods.base import (AdapterConfig, LayerActivations, SavedActivations, check_range,
                                  check_rank, in_base_layout, trains_dropout)


@dataclass(frozen=True)
class VeRAConfig(AdapterConfig):
    r: int = 256  # rows of the shared random A (columns of B); cheap, as only d_out + r train
    dropout: float = 0.0  # dropout on the adapter's input; the frozen base path never drops
    d_initial: float = 0.1  # starting value of every entry of the vector d (paper, section 3.2)
    projection_prng_key: int = 0  # seed of the shared random A and B
    save_projection: bool = True  # store A and B in the adapter file as well as the seed

    def __post_init__(self) -> None:
        check_rank(self.r)  # r may exceed a layer's size: the shared A, B are sliced, not ranked
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_range("d_initial", self.d_initial)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-sqrt(6 / fan_in), sqrt(6 / fan_in)) from ``generator`` (peft's _kaiming_init)."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen random A (r, d_in) and B (d_out, r) that every VeRA layer of one adapter shares:
    one module object referenced by each layer. Buffers, not parameters: they never train."""

    def __init__(self, r: int, d_in: int, d_out: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # same order of draws as peft: A first, then B
        self.register_buffer("vera_A", kaiming_uniform((r, d_in), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((d_out, r), generator), persistent=False)


class VeRA(Adapter):
    """h = W0 x + b ⊙ B (d ⊙ A dropout(x)), for nn.Linear and Conv1D bases."""

    def __init__(self, base: nn.Module, config: VeRAConfig, projection: VeRAProjection) -> None:
        super().__init__()
        if not is_linear(base):
            raise ConfigError(
                f"VeRA adapts linear layers, not {type(base).__name__} (peft neither). Expected "
                "targets that name nn.Linear layers; try 'all-linear'."
            )
        self.d_in, self.d_out = layer_dims(base)
        self.transposed = is_conv1d(base)  # Conv1D stores W as (d_in, d_out)
        self.projection = projection  # shared: registered here too, but one object
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out))  # b: zero, so ΔW = 0
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))  # d
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def shared(self) -> tuple[Tensor, Tensor]:
        """This layer's slices of the shared matrices: A (r, d_in), B (d_out, r)."""
        return self.projection.vera_A[:, : self.d_in], self.projection.vera_B[: self.d_out, :]

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + Λ_b B Λ_d A x
        A, B = self.shared()
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, A), B)  # (..., d_out)
        return (result + update).to(result.dtype)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(Λ_b B (d_out, r), Λ_d A (r, d_in)) with ΔW = left @ right in (d_out, d_in) layout."""
        A, B = self.shared()
        return self.vera_lambda_b.unsqueeze(1) * B, self.vera_lambda_d.unsqueeze(1) * A

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: Λ_d-scaled A x (N, r) and B Λ_d A x (N, d_out), for Λ_d's and
        Λ_b's gradients, and not x, which meets the frozen A first."""
        rank = int(self.vera_lambda_d.shape[0])
        return SavedActivations(own=layer.tokens * (rank + layer.d_out) * layer.adapter_bytes,
                                keeps_input=False, dropout=trains_dropout(self.dropout))

    def delta_weight(self, base: nn.Module) -> Tensor:
        left, right = self.factors()
        delta = left @ right  # (d_out, d_in)
        return in_base_layout(delta, self.transposed)


def build_vera(model: nn.Module, config: VeRAConfig, adapter_name: str) -> None:
    """Draw the shared A, B once, sized for the largest target, then attach VeRA to each target."""
    names = find_targets(model, config.targets, accept=is_linear, exclude=config.modules_to_save or ())
    bases = [model.get_submodule(n) for n in names]
    dims = [layer_dims(base_of(b)) for b in bases]
    projection = VeRAProjection(
        config.r, max(d for d, _ in dims), max(d for _, d in dims), config.projection_prng_key
    )
    inject(model, names, lambda _name, base: VeRA(base, config, projection), adapter_name)


def shared_projection(model: nn.Module, adapter_name: str = "default") -> VeRAProjection:
    """The VeRAProjection of a model's VeRA adapter ``adapter_name``."""
    for layer in adapted_layers(model).values():
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, VeRA):
            return adapter.projection
    raise ConfigError(
        f"This model has no VeRA adapter named {adapter_name!r}. Expected a model from "
        "peftlab.adapt(model, 'vera')."
    )
