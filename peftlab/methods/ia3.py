"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", https://arxiv.org/abs/2205.05638 (section 3.3).

(IA)³ trains no matrices at all: it learns one vector per adapted layer that rescales, element by
element, either the layer's output or its input. In the paper, l_k and l_v rescale the attention
keys and values, and l_ff rescales the feed-forward block's inner activation, i.e. the INPUT of its
second (down) projection:

    keys, values  (k_proj, v_proj / key, value)         h = l ⊙ (W x + b)       l ∈ R^d_out
    feed-forward  (down_proj / output.dense)            h = W (l ⊙ x) + b       l ∈ R^d_in

        x ─────────── W ─── (+b) ── ⊙ l ──▶ h            (output scaling)
        x ── ⊙ l ──── W ─── (+b) ──────────▶ h            (input scaling, "feed-forward")

Every l starts at ones, so the adapted model starts exactly at the pretrained one. Because the
rescaling is linear it merges: W' = diag(l) W (rows) or W diag(l) (columns), i.e.
ΔW = W ⊙ (l - 1) along the right axis; an output scaling also scales the bias, b' = l ⊙ b.

peft's ``IA3Config`` is matched exactly: ``feedforward_modules`` names the layers that scale their
input (a subset of the targets, by name suffix or regex), the vectors are stored as peft stores
them, ``ia3_l`` of shape (d_out, 1) or (1, d_in), and the defaults are peft's (k_proj, v_proj,
down_proj for Llama; key, value, output.dense for BERT, where "output.dense" names both the
attention output and the feed-forward output, and both scale their input).

On a convolution (peft: nn.Conv2d and nn.Conv3d) l scales channels: h = l ⊙ conv(x; W) + ... with
l of shape (1, C, 1, 1[, 1]) broadcast over the positions, as peft stores it. Merging scales W's
output rows, or its input channels: with groups = g the weight (C_out, C_in/g, *kernel) sees only
its group's inputs, so output o (group q = o // (C_out/g)) takes l[q·C_in/g : (q+1)·C_in/g].

The reference runs the base layer a second time on ``l ⊙ x`` for input-scaled layers, for
clarity (the wrapper has already computed ``W x``); merging removes all extra cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import (Adapter, base_of, conv_shape, find_targets, inject, is_conv1d, is_linear,
                            layer_dims, matches)
from peftlab.methods.base import AdapterConfig, LayerActivations, SavedActivations

# peft's defaults (TRANSFORMERS_MODELS_TO_IA3_*_MODULES_MAPPING), by model_type
IA3_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("k_proj", "v_proj", "down_proj"),
    "bert": ("key", "value", "output.dense"),
    "roberta": ("key", "value", "output.dense"),
    "distilbert": ("q_lin", "v_lin", "lin2"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "opt": ("q_proj", "v_proj", "fc2"),
}
IA3_FEEDFORWARD = {
    "llama": ("down_proj",),
    "mistral": ("down_proj",),
    "qwen2": ("down_proj",),
    "bert": ("output.dense",),
    "roberta": ("output.dense",),
    "distilbert": ("lin2",),
    "gpt2": ("mlp.c_proj",),
    "opt": ("fc2",),
}


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    # Targets that scale their INPUT (the paper's l_ff); the other targets scale their output.
    # Name suffixes or a regex, as targets; None: peft's default for the model's architecture.
    feedforward_modules: str | tuple[str, ...] | None = None
    init_ia3_weights: bool = True  # start every l at ones (False: random, for tests only)

    def __post_init__(self) -> None:
        if isinstance(self.feedforward_modules, (list, set)):  # as read back from a JSON file
            object.__setattr__(self, "feedforward_modules", tuple(sorted(self.feedforward_modules)))


def resolve_ia3(model: nn.Module, config: IA3Config) -> IA3Config:
    """Fill in the feed-forward modules for this model's architecture (peft's defaults)."""
    import dataclasses

    if config.feedforward_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return dataclasses.replace(config, feedforward_modules=IA3_FEEDFORWARD.get(model_type, ()))


class IA3(Adapter):
    """h = l ⊙ (W x + b)  or, for a feed-forward layer,  h = W (l ⊙ x) + b."""

    delta_uses_base = True  # ΔW = W ⊙ (l - 1) depends on W
    conv_layers = (nn.Conv2d, nn.Conv3d)  # peft's IA3 has no nn.Conv1d
    layer_types = "a linear layer (nn.Linear, transformers' Conv1D) or an nn.Conv2d / nn.Conv3d (peft's IA3 has no nn.Conv1d)"

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        return is_linear(module) or isinstance(module, cls.conv_layers)

    def __init__(self, base: nn.Module, config: IA3Config, feedforward: bool) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        self.feedforward = feedforward
        self.transposed = is_conv1d(base)  # Conv1D stores W as (d_in, d_out)
        self.conv = conv_shape(base)
        # peft's shapes, so the vectors copy and save 1:1: a column for outputs, a row for inputs;
        # on a convolution one value per channel, (1, C, 1, 1) broadcasting over the positions
        if self.conv is not None:
            shape = (1, d_in if feedforward else d_out) + (1,) * len(self.conv.kernel)
        else:
            shape = (1, d_in) if feedforward else (d_out, 1)
        init = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape)
        self.ia3_l = nn.Parameter(init)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # (d,) broadcasts over a linear layer's last dim; (1, C, 1, 1) over a conv's positions
        scale = self.ia3_l if self.conv is not None else self.ia3_l.flatten()
        if self.feedforward:  # h = W (l ⊙ x) + b: the base layer runs on the rescaled input
            return base((x.to(scale.dtype) * scale).to(x.dtype))
        return (result * scale).to(result.dtype)  # h = l ⊙ (W x + b)

    def _scale_along_weight(self, base: nn.Module) -> Tensor:
        """l shaped to multiply the base weight in its own layout (rows = outputs for nn.Linear)."""
        scale = self.ia3_l  # (d_out, 1) scales rows, (1, d_in) scales columns of (d_out, d_in)
        if self.conv is None:
            return scale.T if self.transposed else scale
        if not self.feedforward:
            return scale.transpose(0, 1)  # (C_out, 1, 1, 1): output rows of (C_out, C_in/g, *kernel)
        c_out, c_in, g = base.out_channels, base.in_channels, self.conv.groups
        ones = (1,) * len(self.conv.kernel)
        # output o sees only its group's C_in/g inputs: repeat each group's slice of l C_out/g times
        per_group = scale.reshape(g, 1, c_in // g).expand(g, c_out // g, c_in // g)
        return per_group.reshape(c_out, c_in // g, *ones)

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: the layer's input x, nothing of its own."""
        return SavedActivations()

    def delta_weight(self, base: nn.Module) -> Tensor:
        return base.weight * (self._scale_along_weight(base) - 1)  # W' = W ⊙ l  =>  ΔW = W ⊙ (l - 1)

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        if self.feedforward or getattr(base, "bias", None) is None:
            return None  # scaling the input leaves the bias alone
        return base.bias * (self.ia3_l.flatten() - 1)  # b' = l ⊙ b


def build_ia3(model: nn.Module, config: IA3Config, adapter_name: str) -> None:
    """Attach IA3 to each target; a target that matches ``feedforward_modules`` scales its input."""
    names = find_targets(model, config.targets, accept=IA3.can_adapt, exclude=config.modules_to_save or (),
                         expected=IA3.layer_types)
    feedforward = config.feedforward_modules or ()
    if feedforward and not any(matches(n, feedforward) for n in names):
        raise ConfigError(
            f"feedforward_modules={feedforward!r} matches none of the IA3 targets ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}). Expected a subset of the targets (peft's rule), "
            "e.g. targets=('k_proj', 'v_proj', 'down_proj'), feedforward_modules=('down_proj',)."
        )
    inject(model, names, lambda name, base: IA3(base, config, matches(name, feedforward) if feedforward else False),
           adapter_name)


def ia3_parameter_count(model: nn.Module, config: IA3Config) -> int:
    """Closed form: d_out per output-scaled target plus d_in per feed-forward target (a
    convolution's channels: C_out or C_in)."""
    total = 0
    feedforward = config.feedforward_modules or ()
    for name in find_targets(model, config.targets, accept=IA3.can_adapt, exclude=config.modules_to_save or (),
                             expected=IA3.layer_types):
        d_in, d_out = layer_dims(base_of(model.get_submodule(name)))
        total += d_in if feedforward and matches(name, feedforward) else d_out
    return total
