"""The one shared injector: find target layers, wrap them, freeze the rest, merge and unmerge.

Every weight-space method (LoRA, DoRA, LoHa, ...) is written as an :class:`Adapter`: a small
module that, given a layer's input ``x`` and the frozen base layer's output, returns the adapted
output. The injector does the rest, the same way for every method and every model:

    model.layers.0.self_attn.q_proj            nn.Linear (frozen)
                     │ inject(...)
                     ▼
    model.layers.0.self_attn.q_proj            AdaptedLayer
        ├── base_layer                         nn.Linear (frozen, untouched)
        └── adapters["default"]                e.g. LoRA: lora_A (r, d_in), lora_B (d_out, r)

    AdaptedLayer.forward(x) = adapter(x, base_layer, base_layer(x))  for each active adapter

A method that changes what the base layer *sees* (OFT and BOFT rotate its inputs) may also define
``layer_forward(x, base_layer)``, which runs the base layer itself: h = W0 (R^T x) + b, the
paper's equation and peft's order of operations. It is used when that adapter runs first.

Several named adapters can sit on one layer; ``active`` says which run. Merging adds each
adapter's ``delta_weight()`` into the base weight, so a merged model runs at base speed.
Nothing here knows any particular model: targets are found by module name and type.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError

# HF transformers' GPT-2 style `Conv1D` stores its weight as (d_in, d_out); matched by name so
# that this module does not import transformers.
_CONV1D = "Conv1D"
# torch's convolutions, whose weight is (C_out, C_in / groups, *kernel)
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------------------------
# Looking at base layers
# --------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == _CONV1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit/Linear8bitLt subclass it) or HF's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_of(module: nn.Module) -> nn.Module:
    """The layer itself, or its frozen base layer if it already carries adapters."""
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def is_conv(module: nn.Module) -> bool:
    """nn.Conv1d, nn.Conv2d or nn.Conv3d (grouped ones included; transposed convolutions are not)."""
    return isinstance(module, CONV_LAYERS)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like or embedding layer, in logical (not packed) units; for a
    convolution (C_in, C_out), its channels (the kernel and groups: :func:`conv_shape`)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        d_in, d_out = module.weight.shape  # Conv1D stores (d_in, d_out)
        return d_in, d_out
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if is_conv(module):
        return module.in_channels, module.out_channels
    raise ConfigError(
        f"{type(module).__name__} is not a layer peftlab can adapt. Expected nn.Linear, "
        "nn.Embedding, transformers' Conv1D or nn.Conv1d/2d/3d. Try targets that name linear "
        "layers, or 'all-linear'."
    )


@dataclass(frozen=True)
class ConvShape:
    """What a convolution adds to (C_in, C_out): its weight is (C_out, C_in / groups, *kernel)."""

    kernel: tuple[int, ...]  # (k,), (kh, kw) or (kd, kh, kw)
    groups: int  # input and output channels split into this many independent groups

    @property
    def taps(self) -> int:
        """K = kd·kh·kw: how many input positions one output position reads per input channel."""
        return math.prod(self.kernel)


def conv_shape(module: nn.Module) -> ConvShape | None:
    """The kernel and groups of an nn.Conv1d/2d/3d; None for any other layer."""
    return ConvShape(tuple(module.kernel_size), module.groups) if is_conv(module) else None


def matrix_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of the layer's weight seen as a matrix. A convolution's weight
    (C_out, C_in/g, *kernel) is a matrix (C_out, C_in/g · K) applied to every patch of its input
    (im2col), so there d_in = C_in/g · K; other layers: :func:`layer_dims`."""
    d_in, d_out = layer_dims(module)
    shape = conv_shape(module)
    return (d_in // shape.groups * shape.taps, d_out) if shape is not None else (d_in, d_out)


def apply_weight(base: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
    """ΔW x for a ΔW in matrix layout (d_out, d_in): a linear map, or, on a convolution, the
    convolution with ΔW reshaped to the weight's shape (same stride, padding, dilation, groups)."""
    if is_conv(base):
        return conv_with(base, x, delta.reshape(base.weight.shape))
    return F.linear(x, delta)


def conv_with(base: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None, **overrides) -> Tensor:
    """``x`` through the convolution ``base`` with another ``weight`` and ``bias`` (default none):
    the same stride, padding, dilation and groups unless ``overrides`` say otherwise."""
    settings = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation,
                "groups": base.groups} | overrides
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]  # weight (C_out, C_in/g, *kernel)
    return conv(x, weight, bias, **settings)


def check_zero_padding(base: nn.Module, method: str) -> None:
    """peft computes a conv adapter's own path with zero padding; with another padding_mode the
    base pads differently, so the merged layer would compute something else: refuse it."""
    if is_conv(base) and base.padding_mode != "zeros":
        raise ConfigError(
            f"{method} on a {type(base).__name__} with padding_mode={base.padding_mode!r} is not "
            "supported: peft's adapter path pads with zeros, so merging would change the output. "
            "Expected padding_mode='zeros'; try other targets."
        )


def embed_scale(base: nn.Module) -> Tensor | None:
    """The constant a scaled embedding multiplies its rows by in its forward (Gemma's √d_model,
    ``embed_scale``), which an adapter's own lookup must apply too; None for a plain embedding."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, dtype=base.weight.dtype, device=base.weight.device)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return scale
    return None


def is_quantized(weight: Tensor) -> bool:
    """True for bitsandbytes' 4-bit parameters (packed uint8 storage plus a quant_state)."""
    return getattr(weight, "quant_state", None) is not None


def dense_weight(module: nn.Module) -> Tensor:
    """The base layer's weight as a float tensor in its own layout, dequantising 4-bit weights."""
    weight = module.weight
    if is_quantized(weight):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight


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
        if self.disabled and self.merged:
            self.unmerge()  # "disabled" must mean the base model, so take merged updates out
        pending = [] if self.disabled else [name for name in self.active if name not in self.merged]
        first = self.adapters[pending[0]] if pending and self.example_adapters is None else None
        if first is not None and hasattr(first, "layer_forward"):
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

    def _per_example(self, x: Tensor, result: Tensor, names: list[str]) -> Tensor:
        """Example i runs adapter names[i] alone: each adapter sees only its rows of the batch."""
        if self.merged:
            raise ConfigError(
                f"Adapters {self.merged} are merged into the base weight, so they would apply to every "
                "example. Expected unmerged adapters for a mixed batch; try peftlab.unmerge(model) first."
            )
        for name in dict.fromkeys(names):  # each distinct name once, in order of appearance
            if name == "__base__" or name not in self.adapters:
                continue  # base rows (and adapters that skip this layer) keep the base output
            if hasattr(self.adapters[name], "merge_into"):  # MultiheadAttention, parameters: whole-layer changes
                raise ConfigError(
                    f"Adapter {name!r} changes what this layer computes with ({type(self.adapters[name]).__name__}), "
                    "so it cannot run on some rows of a batch only. Expected adapters that add to the "
                    "layer's output (LoRA on linear layers, ...); try one adapter per batch with set_adapter."
                )
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
            if hasattr(adapter, "merge_into"):  # it changes parameters other than weight (LoRA on parameters)
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
            if hasattr(self.adapters[name], "merge_into"):
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


# --------------------------------------------------------------------------------------------
# Finding targets
# --------------------------------------------------------------------------------------------
Targets = str | Sequence[str]


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's outputs (LM head, classifier)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that could be a target: skips the insides of already adapted layers."""
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (AdaptedLayer, TrainableCopy)):
            skip.append(name)
        if name:
            out[name] = module
    return out


def matches(name: str, targets: Targets) -> bool:
    """peft's matching rule: a string is a full regex; a list matches a name or a name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(
    model: nn.Module,
    targets: Targets,
    accept: Callable[[nn.Module], bool] = lambda m: is_linear(m) or isinstance(m, nn.Embedding),
    exclude: Iterable[str] = (),
    expected: str = "a linear layer (nn.Linear, Conv1D) or, for some methods, an nn.Embedding",
) -> list[str]:
    """Names of the modules a method should adapt.

    ``targets`` is ``"all-linear"`` (every linear layer except the output head), a regex string,
    or a list of module names / name suffixes. Raises :class:`ConfigError` listing the available
    names when nothing matches, or when a match is the output head or a type ``accept`` refuses
    (``expected`` says, in words, what it accepts).
    """
    # a layer that already carries an adapter is judged by its base layer, so that a second
    # named adapter can go on the same layers
    modules = {n: base_of(m) for n, m in candidate_modules(model).items()}
    heads = output_head_names(model) | set(exclude)
    # nn.MultiheadAttention never calls its out_proj (it reads out_proj.weight itself), so an
    # adapter there would be ignored: the attention block is the target instead
    inside_attention = {f"{n}.out_proj" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    if targets == "all-linear":
        found = [n for n, m in modules.items() if is_linear(m) and n not in heads | inside_attention
                 and not any(n.startswith(h + ".") for h in heads)]
    else:
        found = [n for n in modules if matches(n, targets)]
        for name in found:
            if name in inside_attention:
                raise ConfigError(
                    f"Target {name!r} is the out_proj of an nn.MultiheadAttention, which never calls it "
                    "(it reads the weight directly), so an adapter there would change nothing. Expected "
                    f"the attention module itself; try targets=[{name.rsplit('.', 1)[0].rsplit('.', 1)[-1]!r}] "
                    "with method 'lora' (it adapts in_proj and out_proj together)."
                )
            if name in heads:
                raise ConfigError(
                    f"Target {name!r} is the model's output head. Adapting it is rarely intended "
                    "and peft refuses it too. Expected attention/MLP layers; try 'all-linear' or "
                    "names such as 'q_proj', 'v_proj'. To train the head fully, pass "
                    f"modules_to_save=[{name.rsplit('.', 1)[-1]!r}]."
                )
            if not accept(modules[name]):
                raise ConfigError(
                    f"Target {name!r} is a {type(modules[name]).__name__}, which this method cannot "
                    f"adapt. Expected {expected}. Try a more specific pattern."
                )
    if not found:
        raise ConfigError(
            f"Targets {targets!r} matched no module. Expected names (or name suffixes) of linear "
            f"layers such as: {_summarise_linear_names(modules)}. Try one of these, or 'all-linear'."
        )
    return found


def _summarise_linear_names(modules: dict[str, nn.Module]) -> str:
    """Distinct last name parts of linear layers, e.g. 'q_proj, k_proj, ...' (the useful ones)."""
    seen: dict[str, None] = {}
    for name, module in modules.items():
        if is_linear(module) or isinstance(module, nn.Embedding):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return ", ".join(seen) or "(none: the model has no linear layers)"


# --------------------------------------------------------------------------------------------
# Injecting, freezing, and whole-model operations
# --------------------------------------------------------------------------------------------
def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(
    model: nn.Module,
    names: Iterable[str],
    make_adapter: Callable[[str, nn.Module], Adapter],
    adapter_name: str = "default",
) -> list[AdaptedLayer]:
    """Wrap each named module in an AdaptedLayer (once) and add ``make_adapter(name, base)``."""
    layers = []
    for name in names:
        module = model.get_submodule(name)
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
        if adapter_name in layer.adapters:
            raise ConfigError(
                f"Layer {name!r} already has an adapter named {adapter_name!r}. Expected a new "
                "name; try adapter_name='other', or delete the old adapter first."
            )
        try:
            adapter = make_adapter(name, layer.base_layer)
        except ConfigError as err:  # say which layer: "the layer is 32 x 64" alone is a riddle
            raise ConfigError(f"Layer {name!r}: {err}") from err
        weight = getattr(layer.base_layer, "weight", None)
        if weight is not None and not is_quantized(weight) and weight.is_floating_point():
            adapter.to(device=weight.device)
        else:
            adapter.to(device=next(layer.base_layer.parameters()).device)
        layer.adapters[adapter_name] = adapter
        layer.active = [adapter_name]
        if layer is not module:
            set_module(model, name, layer)
        layers.append(layer)
    return layers


def default_modules_to_save(model: nn.Module) -> tuple[str, ...]:
    """A sequence-classification model's new head must train with the adapter (peft does the
    same for task_type SEQ_CLS): its weights are random, not pretrained."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return tuple(n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module))
    return ()


def modules_to_save_paths(model: nn.Module, entries: Iterable[str]) -> tuple[str, ...]:
    """The modules peft trains whole for ``modules_to_save`` entries: every module whose full
    name ends with an entry, compared as plain strings (peft's rule: so "classifier" also takes
    DistilBERT's "pre_classifier", the first layer of its new head). Entries that match nothing
    are dropped, as peft does: for SEQ_CLS it lists both "classifier" and "score"."""
    found: dict[str, None] = {}
    for entry in entries:
        for name in candidate_modules(model):
            if name.endswith(entry):
                found.setdefault(name, None)
    return tuple(found)


def wrap_modules_to_save(model: nn.Module, names: Iterable[str], adapter_name: str) -> None:
    """Give each named module a trainable copy for this adapter (peft's modules_to_save)."""
    for name in names:
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
        wrapper.add(adapter_name)
        if wrapper is not module:
            set_module(model, name, wrapper)


def freeze_all_but_adapters(model: nn.Module, adapter_name: str | None = None) -> None:
    """requires_grad only for the parameters of one adapter (default: every adapter) and of its
    trainable copies; the base model and other adapters stay frozen."""
    tags = [""] if adapter_name is None else [adapter_name + "."]
    if adapter_name is not None:  # an adapter may train others with it (X-LoRA's experts)
        for layer in adapted_layers(model).values():
            if adapter_name in layer.adapters:
                tags += [n + "." for n in getattr(layer.adapters[adapter_name], "trains_with", ())]
    for name, param in model.named_parameters():
        param.requires_grad = any(f".adapters.{t}" in name or f".copies.{t}" in name for t in set(tags))


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """{module name: AdaptedLayer} for every adapted layer in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight (outputs unchanged, base speed)."""
    layers = adapted_layers(model)
    tied = _tied_parameter_ids(model)
    for name, layer in layers.items():
        weight = getattr(layer.base_layer, "weight", None)
        mergeable = all(layer.adapters[a].mergeable for a in layer.active)  # else layer.merge says why
        if layer.active and mergeable and weight is not None and id(weight) in tied:
            raise ConfigError(
                f"Cannot merge into {name!r}: its weight is tied to another module (typically the "
                "input embedding shared with the output head), so merging would change both. "
                "Expected an untied weight. Keep the adapter unmerged, or untie first (e.g. "
                "model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone()))."
            )
    for layer in layers.values():
        layer.merge()
    return model


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters owned by more than one module (tied weights)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    for layer in adapted_layers(model).values():
        layer.unmerge()
    return model


def set_disabled(model: nn.Module, disabled: bool) -> None:
    """Switch every adapter off (the model is then exactly the base model) or back on."""
    for module in model.modules():
        if isinstance(module, (AdaptedLayer, TrainableCopy)):
            module.disabled = disabled


def set_active(model: nn.Module, adapter_name: str) -> None:
    """Make one named adapter the only active one, model-wide (as peft's ``set_adapter``):
    layers that lack it run their base layer alone."""
    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            if module.merged:
                module.unmerge()
            module.active = [adapter_name] if adapter_name in module.adapters else []
        elif isinstance(module, TrainableCopy):
            module.active = [adapter_name] if adapter_name in module.copies else []
