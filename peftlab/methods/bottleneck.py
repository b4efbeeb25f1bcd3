"""Bottleneck adapters: Houlsby (serial) and parallel adapters.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751
He et al., 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning",
https://arxiv.org/abs/2110.04366 (the parallel adapter, section 3, figure 1 and table 1)

A bottleneck adapter is a small two-layer MLP: project down to r dimensions, apply a
non-linearity f, project back up. Houlsby puts it in SERIES after a sublayer (attention or
feed-forward), on its output h; the parallel adapter runs BESIDE the whole sublayer, from the
sublayer's input x̂, scaled by s:

    houlsby    h' = h + s · up(f(down(h)))          s = 1 (paper)
    parallel   h' = h + s · up(f(down(x̂)))          s = 4 (He et al.'s best)

         houlsby                                       parallel
    x̂ ── sublayer ── h ──┬──────────(+)──▶ h'      x̂ ──┬── sublayer ── h ───(+)──▶ h'
                         └ down ─ f ─ up ─ ·s ┘         └ down ─ f ─ up ─ ·s ──┘

down: (r, width) and up: (d_out, r), each with a bias; width = d_out for houlsby, d_model (the
width of x̂) for parallel. ``up`` starts at zero, so h' = h and the adapted model starts exactly at
the pretrained one (Houlsby's near-identity initialisation); ``down`` starts as nn.Linear does
(Kaiming-uniform). The non-linearity makes the update depend on the input, so unlike LoRA it can
never be merged into a weight.

Where, exactly (defaults for Llama and BERT). Both kinds attach to the sublayer's LAST
projection, where h is formed, before the residual add; the parallel adapter reads x̂ where the
sublayer itself reads it, at the input of a layer of the same sublayer (``PARALLEL_SOURCES``):

    adapter on (adds to h)       h                                 x̂ (parallel), read at
    Llama self_attn.o_proj       attention output                  RMSNorm(residual): q_proj's input
    Llama mlp.down_proj          feed-forward output               RMSNorm(residual): up_proj's input
    BERT attention.output.dense  attention output, before dropout, the block input: the input of
                                 residual and LayerNorm (Houlsby's attention.self.query
                                 exact place, paper figure 2)
    BERT output.dense            feed-forward output, before       the attention LayerNorm's output:
                                 dropout, residual and LayerNorm   intermediate.dense's input

Reading x̂ is :class:`SublayerInput`'s job: hooks on the smallest module holding both layers
(Llama's ``self_attn``, BERT's ``attention``) catch the source layer's input during each call and
hand it to the adapter. Other architectures: pass ``sources={target: source}``.

peft has no bottleneck adapters; the production path is peftlab's fused form,
``peftlab.production.merged.fuse_bottleneck`` (one module, addmm, Houlsby's down projection folded
into the base matmul where the algebra allows), proven equal to this reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError, closest
from peftlab.inject import Adapter, base_of, find_targets, inject, is_linear, layer_dims
from peftlab.methods.base import AdapterConfig, check_range, is_count

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
# parallel: {target: a layer of the same sublayer whose input is the sublayer's input x̂}
_LLAMA_SOURCES = {"o_proj": "q_proj", "down_proj": "up_proj"}
_BERT_SOURCES = {"attention.output.dense": "attention.self.query", "output.dense": "intermediate.dense"}
PARALLEL_SOURCES = {
    "llama": _LLAMA_SOURCES, "mistral": _LLAMA_SOURCES, "qwen2": _LLAMA_SOURCES, "qwen3": _LLAMA_SOURCES,
    "gemma": _LLAMA_SOURCES, "bert": _BERT_SOURCES, "roberta": _BERT_SOURCES,
    "distilbert": {"out_lin": "q_lin", "lin2": "lin1"},
    "gpt2": {"attn.c_proj": "attn.c_attn", "mlp.c_proj": "mlp.c_fc"},
    "opt": {"out_proj": "q_proj", "fc2": "fc1"},
}


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    kind: str = "houlsby"  # "houlsby": serial, on the sublayer output; "parallel": beside it
    r: int | None = None  # bottleneck size; None: d_out // reduction_factor
    reduction_factor: int = 16  # Houlsby's and the adapters library's default
    non_linearity: str = "relu"  # relu, gelu, silu (= swish) or tanh
    scaling: float | None = None  # s; None: 1.0 for houlsby, 4.0 for parallel (He et al.)
    # parallel only: {target name (suffix): layer of the same sublayer reading x̂, named the same
    # way}, e.g. {"o_proj": "q_proj"}; None: PARALLEL_SOURCES for the model's architecture
    sources: dict[str, str] | None = None

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
            if value is not None and not is_count(value):
                raise ConfigError(f"{name}={value!r} is invalid. Expected a positive integer (e.g. r=8 "
                                  "or reduction_factor=16).")
        if self.sources is not None and (self.kind != "parallel" or not isinstance(self.sources, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.sources.items())):
            raise ConfigError(f"sources={self.sources!r} is invalid with kind={self.kind!r}. Expected, for "
                              "kind='parallel' only, a dict from target to source layer names, e.g. "
                              "{'o_proj': 'q_proj', 'down_proj': 'up_proj'}.")
        if self.scaling is None:
            object.__setattr__(self, "scaling", DEFAULT_SCALING[self.kind])
        check_range("scaling", self.scaling)

    def bottleneck_size(self, d_out: int) -> int:
        return self.r if self.r is not None else max(1, d_out // self.reduction_factor)


def layer_parameter_count(d_out: int, config: BottleneckConfig, d_model: int | None = None) -> int:
    """One adapted layer: down (r x width) + r + up (d_out x r) + d_out, where width is d_out
    for houlsby (it reads the sublayer output) and d_model for parallel (the sublayer input)."""
    r = config.bottleneck_size(d_out)
    width = d_out if config.kind == "houlsby" else d_model
    return r * width + r + d_out * r + d_out


def bottleneck_parameter_count(model: nn.Module, config: BottleneckConfig) -> int:
    """Trainable parameters of the adapter on ``model`` (targets resolved): the sum over layers."""
    total = 0
    for name in find_targets(model, config.targets, exclude=config.modules_to_save or ()):
        d_model = None if config.kind == "houlsby" else _sublayer(model, name, config)[3]
        total += layer_parameter_count(layer_dims(base_of(model.get_submodule(name)))[1], config, d_model)
    return total


class Bottleneck(Adapter):
    """houlsby: h' = h + s·up(f(down(h)));  parallel: h' = h + s·up(f(down(x̂)))."""

    mergeable = False
    unmergeable_reason = ("the non-linearity between its down and up projections makes its update "
                          "depend on the input, so no fixed ΔW exists (bottleneck adapters stay a side branch)")

    def __init__(self, base: nn.Module, config: BottleneckConfig, d_model: int | None = None) -> None:
        super().__init__()
        _, d_out = layer_dims(base)
        if config.kind == "parallel" and (isinstance(base, nn.Embedding) or d_model is None):
            raise ConfigError("A parallel bottleneck adapter reads its sublayer's input, which only a model "
                              "can hand it. Expected a linear target, built with peftlab.adapt(model, "
                              "'bottleneck', kind='parallel'); or try kind='houlsby'.")
        r = config.bottleneck_size(d_out)
        self.serial = config.kind == "houlsby"
        self.scaling = config.scaling
        self.non_linearity = config.non_linearity
        self.down = nn.Linear(d_out if self.serial else d_model, r)  # (r, width) + bias
        self.up = nn.Linear(r, d_out)  # (d_out, r) + bias
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # up = 0: the adapter starts as the identity
        nn.init.zeros_(self.up.bias)
        self.tap: SublayerInput | None = None  # parallel: where x̂ comes from (build_bottleneck)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        source = result if self.serial else self.sublayer_input(x)  # serial reads h, parallel x̂
        hidden = ACTIVATIONS[self.non_linearity](self.down(source.to(self.down.weight.dtype)))  # (..., r)
        return (result + self.scaling * self.up(hidden)).to(result.dtype)  # (..., d_out)

    def sublayer_input(self, x: Tensor) -> Tensor:
        """x̂ of the running call, (..., d_model); ``x`` is this layer's own input, for the checks."""
        x_hat = self.tap.value if self.tap is not None else None
        where = f"the input of {self.tap.source!r}" if self.tap is not None else "its sublayer's input"
        if x_hat is None:
            raise ConfigError(
                f"This parallel bottleneck adapter reads {where}, caught while the model runs, and none "
                "was caught for this call: the layer ran on its own, or that layer did not run first. "
                "Expected the layer to run inside the model's (or its sublayer's) forward; call those.")
        if x_hat.shape[:-1] != x.shape[:-1]:
            raise ConfigError(
                f"The sublayer input has shape {tuple(x_hat.shape)} but this layer's input {tuple(x.shape)}: "
                "a mixed batch (adapter_names=...) hands a parallel bottleneck adapter only its own rows. "
                "Expected one adapter for the whole batch; try running each adapter's examples separately.")
        return x_hat

    def release(self) -> None:
        """Take a parallel adapter's hooks off the model (called as the adapter is removed)."""
        if self.tap is not None:
            self.tap.remove()

    def extra_repr(self) -> str:
        reads = "h" if self.serial else f"x̂ = input of {self.tap.source if self.tap else '?'}"
        return f"kind={'houlsby' if self.serial else 'parallel'}, scaling={self.scaling}, reads {reads}"


class SublayerInput:
    """Hands a parallel adapter its sublayer's input x̂, read at the source layer's input.

    Two hooks on ``home``, the smallest module holding source and target (Llama's self_attn):
    entering it, a pre-hook goes on whatever module sits at the source path now (plain, or wrapped
    by another adapter) and keeps its input; leaving it, even after an error, that hook comes off
    and x̂ is dropped. So each call, gradient checkpointing's recomputation included, reads its own
    x̂, and nothing outlives the call. ``remove()`` takes the hooks off with the adapter.
    """

    def __init__(self, home: nn.Module, source: str, target: str, adapter: Bottleneck) -> None:
        self.source, self.target, self.adapter = source, target, adapter  # paths relative to home
        self.value: Tensor | None = None
        self._read = None
        self._hooks = [home.register_forward_pre_hook(self._enter),
                       home.register_forward_hook(self._leave, always_call=True)]

    def _enter(self, home: nn.Module, args: tuple) -> None:
        self._leave(home, args, None)
        if not self._attached(home):  # the adapter left the model another way: take the hooks off
            self.remove()
            return
        self._read = home.get_submodule(self.source).register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = args[0] if args else next(iter(kwargs.values()))  # (..., d_model)

    def _leave(self, home: nn.Module, args: tuple, output: object) -> None:
        if self._read is not None:
            self._read.remove()
            self._read = None
        self.value = None

    def _attached(self, home: nn.Module) -> bool:
        try:
            layer = home.get_submodule(self.target)
        except AttributeError:
            return False
        layer = layer.__dict__.get("_original", layer)  # a FusedBottleneck stands for its AdaptedLayer
        return any(a is self.adapter for a in getattr(layer, "adapters", {}).values())

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._leave(None, (), None)


def build_bottleneck(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> None:
    """Wrap each target; for parallel, find every target's x̂ first (refusing early), then hook it."""
    names = find_targets(model, config.targets, exclude=config.modules_to_save or ())
    if config.kind == "houlsby":
        inject(model, names, lambda _name, base: Bottleneck(base, config), adapter_name)
        return
    plan = {name: _sublayer(model, name, config) for name in names}  # name -> (home, source, target, d_model)
    layers = inject(model, names, lambda name, base: Bottleneck(base, config, plan[name][3]), adapter_name)
    for name, layer in zip(names, layers):
        home, source, target, _ = plan[name]
        adapter = layer.adapters[adapter_name]
        adapter.tap = SublayerInput(model.get_submodule(home), source, target, adapter)


def _sublayer(model: nn.Module, target: str, config: BottleneckConfig) -> tuple[str, str, str, int]:
    """(home path, source and target relative to home, d_model) of a parallel adapter on ``target``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    sources = config.sources or PARALLEL_SOURCES.get(model_type)
    if sources is None:
        raise ConfigError(
            f"A parallel bottleneck adapter reads the input of the whole sublayer, and peftlab does not know "
            f"where that is in a {model_type or type(model).__name__} model (it knows: "
            f"{', '.join(PARALLEL_SOURCES)}). Expected a known architecture; try kind='houlsby', or "
            "sources={target: a layer of the same sublayer reading its input}, e.g. {'o_proj': 'q_proj'}.")
    suffixes = [s for s in sources if target == s or target.endswith("." + s)]
    if not suffixes:
        raise ConfigError(
            f"A parallel bottleneck adapter on {target!r} needs its sublayer's input, and no entry of "
            f"sources {sources} names it. Expected targets among: {', '.join(sources)} (the last layer "
            "of each sublayer); try targets=None for these, kind='houlsby', or add it to sources=...")
    suffix = max(suffixes, key=len)  # BERT: "attention.output.dense" before "output.dense"
    source = target[: len(target) - len(suffix)] + sources[suffix]
    try:
        layer = base_of(model.get_submodule(source))
    except AttributeError:
        layer = None
    if layer is None or not is_linear(layer):
        raise ConfigError(
            f"The parallel adapter on {target!r} should read the input of {source!r}, which is not a linear "
            "layer of this model. Expected a layer of the same sublayer that reads the sublayer's input "
            "(e.g. q_proj for o_proj); check sources=..., or try kind='houlsby'.")
    a, b = source.split(".")[:-1], target.split(".")[:-1]
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    home = ".".join(a[:common])  # the smallest module holding both layers
    cut = len(home) + 1 if home else 0
    return home, source[cut:], target[cut:], layer_dims(layer)[0]
