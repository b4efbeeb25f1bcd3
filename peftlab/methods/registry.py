"""The registry's parts: the ``Method`` record, the generic layer builder and the facts each
catalogue entry shares (default targets, the memory ledger's architectures, hook names).

The tables of methods themselves live in ``catalogue_classic.py`` and ``catalogue_recent.py``;
``peftlab.methods`` joins them into ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, conv_shape, find_targets, inject, layer_dims
from peftlab.methods.base import AdapterConfig

# Where each method goes by default, by `model.config.model_type` (peft's defaults for LoRA).
ATTENTION_QV = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "opt": ("q_proj", "v_proj"),
}


# The architectures (``config.model_type``) whose activations the memory ledger's closed form
# models term by term (peftlab/memory/activations.py; tests/test_memory.py holds them within 2% of
# a measurement), for the methods whose adapters report what they save (methods/base.py).
FORMULA_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "bert", "roberta"})
# a prefix's terms are those of Llama-style attention (BERT's explicit-mask path differs)
DECODER_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})


HOOKS = ("prepare", "write_folder", "read_folder", "peft_config_from_folder")  # see Method.hooks


@dataclass(frozen=True)
class Method:
    name: str
    config: type[AdapterConfig]
    # build(model, config, adapter_name): adds the adapter to the model in place
    build: Callable[[nn.Module, AdapterConfig, str], None]
    family: str  # reparameterisation, orthogonal, adaptive, additive, rescaling, selective, soft prompt, mixture
    description: str  # one line for learners
    paper: str  # citation with link
    formula: str  # trainable parameters, in words a learner can check
    # trainable parameters of one adapted layer of shape (d_in, d_out) (a convolution's channels,
    # its kernel and groups in the optional 4th argument, a ConvShape): the contract tests'
    # closed form (see layer_parameter_count); None for methods whose count is not per layer
    params_per_layer: Callable[..., int] | None
    mergeable: bool
    peft_type: str | None  # the peft method it bridges to, None where peft lacks it
    default_targets: dict[str, tuple[str, ...]] = field(default_factory=lambda: ATTENTION_QV)
    # resolve(model, config) -> config: fills model-dependent defaults after the targets (IA3's
    # feed-forward modules, LLaMA-Adapter's layer count) and refuses unsupported models early
    resolve: Callable[[nn.Module, AdapterConfig], AdapterConfig] | None = None
    # parameter_count(model, config): the closed-form trainable count, for methods whose count
    # is not per layer (params_per_layer None)
    parameter_count: Callable[[nn.Module, AdapterConfig], int] | None = None
    # as_saved(config, state) -> config: what a saved file's tensors fix and its config may not
    # say (BOFT's butterfly factors), applied by load_adapter before the adapter is built
    as_saved: Callable[[AdapterConfig, dict], AdapterConfig] | None = None
    # params_per_embedding(num_embeddings, embedding_dim, config): the count on an nn.Embedding
    # where it is not params_per_layer's (OFT turns each looked-up row); None: params_per_layer
    params_per_embedding: Callable[[int, int, AdapterConfig], int] | None = None
    # the architectures (model_type) on which the memory ledger's closed form models this
    # method's activations (its adapters report them: methods/base.py); on the others, and for
    # methods with none, the ledger traces one step of the model on the meta device
    activation_formula: frozenset[str] = frozenset()
    # a method whose adapters have this one's shapes, built in its place where only shapes count
    # (the memory ledger's meta-device model): LoftQ only chooses LoRA's start values
    shapes_like: str | None = None
    # what a layer above the methods registers for this method (register_hooks), so that api
    # and io reach it through the registry and never by the method's name:
    #   prepare(model, config, adapter_name) -> config   before build (X-LoRA: put its experts on)
    #   write_folder(model, folder, adapter_name, final)  save_adapter's own folder layout
    #   read_folder(model, folder, raw_config, adapter_name) -> model   load_adapter's
    #   peft_config_from_folder(folder) -> peft config    load_adapter(..., backend="peft")'s
    hooks: dict[str, Callable] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # hooks the method cannot work without
    hooks_from: str | None = None  # the module that registers them (named in the error when missing)

    @property
    def learns_from_data(self) -> bool:
        """Whether the method's start is computed from a few batches (its config's ``data``:
        EVA, LoRA-GA, CorDA); callers that train pass them (peftlab.train.start_data)."""
        return "data" in self.config.field_names()

    def targets_for(self, model: nn.Module) -> str | tuple[str, ...]:
        """This method's default targets for the model's architecture ("all-linear" if unknown)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return self.default_targets.get(model_type, "all-linear")


# which methods adapt convolutions, for the error that refuses a convolution to the others
CONV_HINT = ("nn.Conv1d/2d/3d layers are adapted by method 'lora' and 'dora' (1d, 2d, 3d), 'loha' "
             "and 'lokr' (1d, 2d), 'ia3' (2d, 3d), 'adalora', 'boft' (2d) and 'oft' (2d)")


def layer_method(adapter: type[Adapter], conv: type[Adapter] | None = None,
                 others: tuple[type[Adapter], ...] = ()) -> Callable[[nn.Module, AdapterConfig, str], None]:
    """Builder for a method that wraps layers: find the targets, attach ``adapter`` to each (or
    ``conv`` to the convolutions, where the method has a separate adapter for them, and each of
    ``others`` to the layers it can adapt, e.g. LoRA's for nn.MultiheadAttention)."""
    kinds = [adapter] + ([conv] if conv is not None else []) + list(others)
    expected = ", or ".join(k.layer_types for k in kinds)
    if not any(k.conv_layers for k in kinds):
        expected += f" ({CONV_HINT})"

    def pick(base: nn.Module) -> type[Adapter]:
        return next(k for k in reversed(kinds) if k.can_adapt(base))

    def build(model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        # adapt() has already replaced targets=None by the method's default for this model
        names = find_targets(model, config.targets, accept=lambda m: any(k.can_adapt(m) for k in kinds),
                             exclude=config.modules_to_save or (), expected=expected)
        inject(model, names, lambda name, base: pick(base)(base, config.for_layer(name)), adapter_name)

    return build



def method_hook(spec: Method, hook: str) -> Callable | None:
    """The method's ``hook`` if registered; None if the method has none; a clear error if it
    needs one that its module has not registered (that module was never imported)."""
    if hook in spec.hooks:
        return spec.hooks[hook]
    if hook in spec.needs:
        raise ConfigError(
            f"Method {spec.name!r} needs its {hook!r} hook, which {spec.hooks_from} registers, and that "
            f"module has not been imported. Expected it imported; try `import {spec.hooks_from}`, or "
            "call peftlab's own functions (peftlab.adapt, peftlab.load_adapter), which import it."
        )
    return None



def layer_parameter_count(spec: Method, layer: nn.Module, config: AdapterConfig) -> int:
    """The closed-form trainable count of one (unadapted) layer: ``params_per_layer`` with the
    layer's (d_in, d_out), and its kernel and groups when it is a convolution."""
    if isinstance(layer, nn.Embedding) and spec.params_per_embedding is not None:
        return spec.params_per_embedding(*layer_dims(layer), config)
    if isinstance(layer, nn.MultiheadAttention):  # two linear maps: in_proj E -> 3E, out_proj E -> E
        width = layer.embed_dim
        return spec.params_per_layer(width, 3 * width, config) + spec.params_per_layer(width, width, config)
    conv = conv_shape(layer)
    extra = () if conv is None else (conv,)
    return spec.params_per_layer(*layer_dims(layer), config, *extra)
