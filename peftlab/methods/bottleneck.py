"""Bottleneck adapters: Houlsby (serial) and parallel adapters.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751
He et al., 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning",
https://arxiv.org/abs/2110.04366 (the parallel adapter, section 3 and table 1)

A bottleneck adapter is a small two-layer MLP: project down to r dimensions, apply a
non-linearity f, project back up. Houlsby puts it in SERIES after a sublayer, on its output h;
the parallel adapter runs BESIDE a sublayer, from that sublayer's input x, scaled by s:

    houlsby    h' = h + s · up(f(down(h)))          s = 1 (paper)
    parallel   h' = h + s · up(f(down(x)))          s = 4 (He et al.'s best)

         houlsby                                parallel
    x ── W ── h ──┬──────────(+)──▶ h'      x ──┬── W ──── h ───(+)──▶ h'
                  └ down ─ f ─ up ─ ·s ┘        └ down ─ f ─ up ─ ·s ┘

down: (r, ·) and up: (d_out, r), each with a bias. ``up`` starts at zero, so h' = h and the
adapted model starts exactly at the pretrained one (Houlsby's near-identity initialisation);
``down`` starts as nn.Linear does (Kaiming-uniform). The non-linearity makes the update depend on
the input, so unlike LoRA it can never be merged into W.

Where, exactly (defaults for Llama and BERT; any linear layer can be a target). peftlab attaches
the adapter to the sublayer's LAST projection, the output projection of attention and the down
projection of the feed-forward block, so ``x`` and ``h`` are that projection's input and output:

    layer                        h (read by houlsby)                 x (read by parallel)
    Llama self_attn.o_proj       attention output, before the        the heads' context softmax(QKᵀ/√d)V,
                                 residual add                        n_heads·head_dim wide
    Llama mlp.down_proj          feed-forward output, before the     SiLU(gate(x̂)) ⊙ up(x̂), d_ff wide
                                 residual add                        (x̂ = RMSNorm of the residual stream)
    BERT attention.output.dense  attention output, before dropout,   the heads' context
                                 residual and LayerNorm (Houlsby's
                                 exact place, paper figure 2)
    BERT output.dense            feed-forward output, before         GELU(intermediate.dense(·)), d_ff wide
                                 dropout, residual and LayerNorm

So the serial adapter is exactly Houlsby's. The parallel one is parallel to the projection
(it reads the projection's input); He et al.'s adapter reads the input of the whole sublayer
(for the feed-forward block, x̂ itself), which in the wrapper design would need the sublayer's
input at its last layer. The two share the idea (a nonlinear, scaled side branch that adds to
the sublayer's output) and parameter budget r·(d_in + d_out) + r + d_out.

peft has no bottleneck adapters; the production path is peftlab's fused form,
``peftlab.production.merged.fuse_bottleneck`` (one module, addmm, the down projection folded into
the base matmul where the algebra allows), proven equal to this reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError, closest
from peftlab.inject import Adapter, layer_dims
from peftlab.methods.base import AdapterConfig, check_range

KINDS = ("houlsby", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": F.tanh}
DEFAULT_SCALING = {"houlsby": 1.0, "parallel": 4.0}

# the attention output projection and the feed-forward down projection, by model_type
BOTTLENECK_TARGETS = {
    "llama": ("o_proj", "down_proj"),
    "mistral": ("o_proj", "down_proj"),
    "qwen2": ("o_proj", "down_proj"),
    "qwen3": ("o_proj", "down_proj"),
    "gemma": ("o_proj", "down_proj"),
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "distilbert": ("out_lin", "lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "opt": ("out_proj", "fc2"),
}


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    kind: str = "houlsby"  # "houlsby": serial, on the sublayer output; "parallel": beside it
    r: int | None = None  # bottleneck size; None: d_out // reduction_factor
    reduction_factor: int = 16  # Houlsby's and the adapters library's default
    non_linearity: str = "relu"  # relu, gelu, silu (= swish) or tanh
    scaling: float | None = None  # s; None: 1.0 for houlsby, 4.0 for parallel (He et al.)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Bottleneck kind={self.kind!r} is not known.{closest(str(self.kind), KINDS)} "
                              f"Expected one of: {', '.join(KINDS)}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(
                f"non_linearity={self.non_linearity!r} is not known.{closest(str(self.non_linearity), ACTIVATIONS)} "
                f"Expected one of: {', '.join(ACTIVATIONS)}.")
        for name in ("r", "reduction_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer (e.g. r=8 "
                                  "or reduction_factor=16).")
        if self.scaling is None:
            object.__setattr__(self, "scaling", DEFAULT_SCALING[self.kind])
        check_range("scaling", self.scaling)

    def bottleneck_size(self, d_out: int) -> int:
        return self.r if self.r is not None else max(1, d_out // self.reduction_factor)


def bottleneck_parameter_count(d_in: int, d_out: int, config: BottleneckConfig) -> int:
    """down (r x width) + its bias + up (d_out x r) + its bias; width = d_out (houlsby) or d_in."""
    r = config.bottleneck_size(d_out)
    width = d_out if config.kind == "houlsby" else d_in
    return r * width + r + d_out * r + d_out


class Bottleneck(Adapter):
    """houlsby: h' = h + s·up(f(down(h)));  parallel: h' = h + s·up(f(down(x)))."""

    mergeable = False
    unmergeable_reason = ("the non-linearity between its down and up projections makes its update "
                          "depend on the input, so no fixed ΔW exists (bottleneck adapters stay a side branch)")

    def __init__(self, base: nn.Module, config: BottleneckConfig) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        if isinstance(base, nn.Embedding) and config.kind == "parallel":
            raise ConfigError("A parallel bottleneck adapter reads the layer's input, which for an "
                              "embedding is token ids. Expected linear targets; try kind='houlsby'.")
        r = config.bottleneck_size(d_out)
        self.serial = config.kind == "houlsby"
        self.scaling = config.scaling
        self.non_linearity = config.non_linearity
        self.down = nn.Linear(d_out if self.serial else d_in, r)  # (r, width) + bias
        self.up = nn.Linear(r, d_out)  # (d_out, r) + bias
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # up = 0: the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        source = result if self.serial else x  # serial reads the layer's output, parallel its input
        hidden = ACTIVATIONS[self.non_linearity](self.down(source.to(self.down.weight.dtype)))  # (..., r)
        return (result + self.scaling * self.up(hidden)).to(result.dtype)  # (..., d_out)

