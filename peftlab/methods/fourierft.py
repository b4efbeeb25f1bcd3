"""FourierFT: parameter-efficient fine-tuning with the discrete Fourier transform.

Gao et al., 2024, Parameter-Efficient Fine-Tuning with Discrete Fourier Transform,
https://arxiv.org/abs/2405.03003

ΔW (d_out x d_in) is learned in the frequency domain: n spectral coefficients c at n fixed,
randomly chosen entries E of a d_out x d_in spectrum F, all other entries zero, and ΔW is the
real part of F's inverse 2D DFT, times a scale α (paper, eqs. 2-4):

        F[E] = c,  F elsewhere 0         ΔW = α · Re(IDFT2(F))          h = W0 x + ΔW x

        c (n) ──scatter at E──▶ F (d_out x d_in) ──IDFT2, Re, ·α──▶ ΔW ──┐
        x ──────────────────── W0 ────────────────────────────────────(+) ──▶ h

Each frequency spreads over the whole matrix, so n = 1000 numbers per layer (vs LoRA's
r (d_in + d_out)) can move every weight. E is drawn by ``torch.randperm`` from a generator
seeded with ``random_loc_seed`` (shared by every layer, as in peft), so it is not saved. peft's
default ``init_weights=False`` draws c ~ N(0, 1): the model does NOT start at the pretrained one
(True starts c at zero).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import LinearAdapter, base_of, find_targets, inject, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, check_range, in_base_layout, is_count


@dataclass(frozen=True)
class FourierFTConfig(AdapterConfig):
    n_frequency: int = 1000  # n: trained spectral coefficients per layer (at most d_in · d_out)
    scaling: float = 150.0  # α: ΔW = α · Re(IDFT2(F)); the IDFT divides by d_in · d_out
    random_loc_seed: int = 777  # seed of the random frequency locations E
    init_weights: bool = False  # False: c ~ N(0, 1) (peft's default, output changes); True: c = 0
    # another n for the layers whose name ends with a key (peft's rule: a regex on the name's tail)
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n in (self.n_frequency, *self.n_frequency_pattern.values()):
            if not is_count(n):
                raise ConfigError(f"FourierFT n_frequency={n!r} is invalid. Expected a positive integer (the paper "
                                  "uses 1000 for LLaMA); try n_frequency=1000.")
        check_range("scaling", self.scaling)
        if not isinstance(self.random_loc_seed, int) or isinstance(self.random_loc_seed, bool):
            raise ConfigError(f"random_loc_seed={self.random_loc_seed!r} is invalid. Expected an int; try 777.")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid. Expected True or False.")


def n_frequency_of(name: str, config: FourierFTConfig) -> int:
    """The layer's n: the first n_frequency_pattern key that ends its name, else n_frequency."""
    key = next((k for k in config.n_frequency_pattern if re.match(rf"(.*\.)?({k})$", name)), None)
    return config.n_frequency if key is None else config.n_frequency_pattern[key]


class FourierFT(LinearAdapter):
    """h = W0 x + α · Re(IDFT2(F)) x, F zero but for n trained entries at fixed random places."""

    def __init__(self, base: nn.Module, config: FourierFTConfig, n: int) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        if n > d_in * d_out:
            raise ConfigError(f"FourierFT n_frequency={n} is above this {d_out} x {d_in} layer's {d_in * d_out} "
                              f"spectrum entries (peft refuses it too). Expected n_frequency <= {d_in * d_out}; "
                              "try a smaller n_frequency or other targets.")
        self.d_in, self.d_out, self.scaling, self.transposed = d_in, d_out, config.scaling, is_conv1d(base)
        generator = torch.Generator().manual_seed(config.random_loc_seed)
        flat = torch.randperm(d_out * d_in, generator=generator)[:n]  # E, as peft draws it
        self.register_buffer("indices", torch.stack([flat // d_in, flat % d_in]), persistent=False)  # (2, n)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n) if config.init_weights else torch.randn(n))  # c

    def delta(self) -> Tensor:
        """ΔW (d_out, d_in) = α · Re(IDFT2(F)), computed in fp32 (the FFT takes no half precision)."""
        c = self.fourierft_spectrum
        spectrum = torch.zeros(self.d_out, self.d_in, device=c.device)
        spectrum[self.indices[0], self.indices[1]] = c.float()
        return (torch.fft.ifft2(spectrum).real * self.scaling).to(c.dtype)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + ΔW x
        delta = self.delta()
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)  # (..., d_out)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return in_base_layout(self.delta(), self.transposed)


def fourierft_targets(model: nn.Module, config: FourierFTConfig) -> list[str]:
    return find_targets(model, config.targets, accept=FourierFT.can_adapt, exclude=config.modules_to_save or (),
                        expected=FourierFT.layer_types)


def build_fourierft(model: nn.Module, config: FourierFTConfig, adapter_name: str) -> None:
    """FourierFT on each target, with that layer's n (n_frequency_pattern)."""
    inject(model, fourierft_targets(model, config),
           lambda name, base: FourierFT(base, config, n_frequency_of(name, config)), adapter_name)


def fourierft_parameter_count(model: nn.Module, config: FourierFTConfig) -> int:
    """n spectral coefficients per adapted layer, whatever its shape (n_frequency_pattern's n where it names the layer)."""
    return sum(n_frequency_of(name, config) for name in fourierft_targets(model, config))
