"""SHiRA: Sparse High Rank Adapters.

Bhardwaj et al., 2024, Sparse High Rank Adapters, https://arxiv.org/abs/2406.13175

SHiRA trains a small fixed subset of the base weight's own entries and nothing else: a sparse
update at the entries a mask M picks (paper, section 3):

        ΔW = scatter(s at M)        W' = W0 + ΔW        h = W0 x + ΔW x

        s (n) ──scatter at M──▶ ΔW (d_out x d_in, n nonzeros) ──┐
        x ───────────────────── W0 ─────────────────────────────(+) ──▶ h

The mask holds n = r · (d_in + d_out) entries, LoRA's count at rank r, but a sparse ΔW is not
low-rank (hence "high rank"), and merging changes only those n weights, so switching adapters on
a deployed model is cheap. peft's ``mask_type="random"`` draws M by ``torch.randperm`` from a
torch.Generator seeded with ``random_seed`` (None: the generator's fixed default seed), a fresh
one per layer; the mask's indices are saved in the adapter file (``<layer>.shira_indices``),
so a file does not depend on the generator. s starts at zero: the model starts at the pretrained one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import LinearAdapter, adapted_layers, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, check_rank, in_base_layout


@dataclass(frozen=True)
class ShiraConfig(AdapterConfig):
    r: int = 32  # sizes the mask like LoRA's count: n = r · (d_in + d_out) trained entries per layer
    mask_type: str = "random"  # how M is chosen; peft ships "random" (others are user functions)
    random_seed: int | None = None  # seed of the mask's generator; None: torch.Generator()'s default seed
    init_weights: bool = True  # True: s = 0 (starts at the pretrained model); False: s ~ N(0, 1)

    def __post_init__(self) -> None:
        check_rank(self.r)
        if self.mask_type != "random":
            raise ConfigError(f"SHiRA mask_type={self.mask_type!r} is not available. Expected 'random' (peft's "
                              "built-in mask; its custom masks are functions, which a config file cannot hold).")
        seed = self.random_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ConfigError(f"random_seed={self.random_seed!r} is invalid. Expected an int or None.")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid. Expected True or False.")


def shira_parameter_count(d_in: int, d_out: int, config: ShiraConfig) -> int:
    """n = r · (d_in + d_out) trained entries per layer (at most d_in · d_out)."""
    return config.r * (d_in + d_out)


def random_mask(d_in: int, d_out: int, n: int, seed: int | None) -> Tensor:
    """(2, n) int32 row and column indices of n distinct entries of a (d_out, d_in) matrix,
    row-major sorted, drawn as peft's random_mask draws them."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=generator)[:n].sort().values
    return torch.stack([flat // d_in, flat % d_in]).to(torch.int)


class SHiRA(LinearAdapter):
    """h = W0 x + ΔW x, ΔW zero except n trained entries at the mask's indices."""

    def __init__(self, base: nn.Module, config: ShiraConfig) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        n = config.r * (d_in + d_out)
        if n > d_in * d_out:
            raise ConfigError(f"SHiRA r={config.r} asks for {n} trained entries of a {d_out} x {d_in} layer, which has "
                              f"{d_in * d_out} (peft refuses it too). Expected r <= {d_in * d_out // (d_in + d_out)} "
                              "for this layer; try a smaller r or other targets.")
        self.d_in, self.d_out, self.transposed = d_in, d_out, is_conv1d(base)
        self.register_buffer("shira_indices", random_mask(d_in, d_out, n, config.random_seed))  # (2, n)
        self.shira_weight = nn.Parameter(torch.zeros(n) if config.init_weights else torch.randn(n))  # s

    def delta(self) -> Tensor:
        """ΔW (d_out, d_in): s scattered at the mask's entries."""
        s = self.shira_weight
        rows, cols = self.shira_indices.long()
        return torch.zeros(self.d_out, self.d_in, dtype=s.dtype, device=s.device).index_put((rows, cols), s)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + ΔW x
        delta = self.delta()
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)  # (..., d_out)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return in_base_layout(self.delta(), self.transposed)


def shira_masks(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """{adapted layer path: its (2, n) mask indices} of a model's SHiRA adapter ``adapter_name``."""
    return {path: layer.adapters[adapter_name].shira_indices for path, layer in adapted_layers(model).items()
            if adapter_name in layer.adapters and isinstance(layer.adapters[adapter_name], SHiRA)}
