"""The Lab's preview: what a choice costs before any weight is loaded (trainable parameters, memory).

The Lab previews every choice instantly. Loading SmolLM2's weights takes seconds; building the
same architecture on PyTorch's ``meta`` device (shapes only, no memory, no values) takes a few
milliseconds once its config is read. So the preview builds a meta model per model name (cached),
deep-copies it, applies ``peftlab.adapt`` to the copy and counts with
``peftlab.count_parameters``: the very code paths training will use, so the numbers match.

A few methods compute something from the weight values while they are built (DoRA's column
norms, LoftQ's quantisation): on a meta model those fail, and the preview falls back to the
method's closed-form per-layer count (``Method.params_per_layer``), which the contract tests
prove equal to the built count.

The memory estimate is ``peftlab.memory.estimate_memory`` for the choice's method, backend,
rank, targets, dropout and batch shape (rows padded to max_length: an upper bound, since a batch
is padded only to its longest row). For a model it cannot read, the preview falls back to the
arithmetic one can do from the counts: weights (fp32 4 B, NF4 ~0.52 B per value: 4 bits plus one
fp32 absmax per 64 values, itself double-quantised), plus per trainable value 4 B of weights, 4 B
of gradient and 8 B of AdamW moments. Activations depend on batch and sequence length and are
only in ``estimate_memory``'s figure.

This is arithmetic on models and configs, so it lives in the analysis layer (ARCHITECTURE.md);
``peftlab.widgets.plan`` re-exports it and renders the estimate for the Lab.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabWarning
from peftlab.metrics import ParameterCount

NF4_BYTES = (4 + 32 / 64 / 4 + 32 / 256 / 64 * 8) / 8  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax
ADAMW_BYTES = 4 + 4 + 8  # fp32 weight + gradient + two moments, per trainable value

_META: dict[tuple[str, int | None], nn.Module] = {}


@dataclass(frozen=True)
class Choice:
    """Everything the Lab's controls pick; one frozen value per run."""

    model: str = "smollm2-135m"
    dataset: str = "chatterbot-qa"  # trained on when no task is picked
    task: str | None = None  # "sentiment/generate": its data, its metric measured live
    method: str = "lora"
    backend: str = "reference"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | tuple[str, ...] | None = None  # None: the method's default for the model
    quantization: str | None = None
    lr: float = 2e-4
    steps: int = 20
    batch_size: int = 4
    max_length: int = 64

    def hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments for ``peftlab.adapt``: only those the method's config takes."""
        from peftlab.methods import get_method

        accepted = set(get_method(self.method).config.field_names())
        wanted = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets,
                  "total_step": self.steps}  # AdaLoRA's schedule needs the run length
        return {k: v for k, v in wanted.items() if k in accepted and v is not None}


@dataclass
class Estimate:
    """What :func:`estimate` finds for a choice: the counts, the memory and how they were got."""

    count: ParameterCount
    memory: dict[str, float]  # category -> bytes
    closed_form: bool = False  # True when counted from the formula, not a built model
    notes: list[str] = field(default_factory=list)


def is_classifier(model: nn.Module) -> bool:
    """A ``*ForSequenceClassification`` model: it answers with a label, it does not generate."""
    return type(model).__name__.endswith("ForSequenceClassification")


def meta_model(name: str, num_labels: int | None = None) -> nn.Module:
    """The architecture of ``name`` on the meta device (cached): bundled, folder or hub id."""
    key = (name, num_labels)
    if key not in _META:
        _META[key] = _build_meta(name, num_labels)
    return _META[key]


def _build_meta(name: str, num_labels: int | None) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    from peftlab.models import SEQUENCE_CLASSIFICATION, bundled_task, model_config

    config = model_config(name, num_labels)
    classifier = (bundled_task(name) == SEQUENCE_CLASSIFICATION if bundled_task(name)
                  else any(a.endswith("ForSequenceClassification") for a in (config.architectures or ())))
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    if not classifier and getattr(config, "is_encoder_decoder", False):
        auto = AutoModelForSeq2SeqLM  # T5, BART
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        return auto.from_config(config)


def linear_modules(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{module-name suffix: (d_in, d_out, how many)} of the linear layers an adapter can target."""
    from peftlab.inject import candidate_modules, layer_dims

    out: dict[str, tuple[int, int, int]] = {}
    for name, module in candidate_modules(model).items():
        try:
            d_in, d_out = layer_dims(module)
        except Exception:  # noqa: BLE001 (not a weight layer: skip it in the picker)
            continue
        suffix = name.rsplit(".", 1)[-1]
        prev = out.get(suffix)
        out[suffix] = (d_in, d_out, (prev[2] if prev else 0) + 1)
    return out


def per_layer_params(method: str, d_in: int, d_out: int, choice: Choice) -> int | None:
    """Trainable parameters the method adds to one (d_in -> d_out) layer, if it has a closed form."""
    from peftlab.api import make_config
    from peftlab.methods import get_method

    spec = get_method(method)
    hp = {k: v for k, v in choice.hyperparameters().items() if k != "targets"}
    if method == "bottleneck":  # the Lab's kind, houlsby: down reads the layer's own output
        from peftlab.methods.bottleneck import layer_parameter_count

        return int(layer_parameter_count(d_out, make_config(spec, None, **hp)))
    if spec.params_per_layer is None:
        return None
    return int(spec.params_per_layer(d_in, d_out, make_config(spec, None, **hp)))


@contextlib.contextmanager
def _warnings_as_notes(notes: list[str]):
    """PeftlabWarnings raised inside become notes (each once); other warnings pass on as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PeftlabWarning)
        try:
            yield
        finally:
            others = [w for w in caught if not issubclass(w.category, PeftlabWarning)]
            notes.extend(m for m in dict.fromkeys(str(w.message) for w in caught if w not in others)
                         if m not in notes)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def estimate(choice: Choice, num_labels: int | None = None) -> Estimate:
    """Trainable parameters (by layer type) and memory of ``choice``, without loading weights."""
    import peftlab  # the facade's adapt: it registers the method hooks (X-LoRA) as training's does
    from peftlab.api import make_config
    from peftlab.inject import candidate_modules, find_targets
    from peftlab.methods import get_method, layer_parameter_count, shapes_stand_in

    base = meta_model(choice.model, num_labels)
    model = copy.deepcopy(base)
    notes: list[str] = []
    closed_form = False
    method, hyperparameters = shapes_stand_in(choice.method, choice.hyperparameters())
    if get_method(choice.method).params_per_layer is None and method != choice.method:  # EVA
        notes.append(f"{choice.method}: counted as {method} at rank r on every target; it moves rank between "
                     f"layers from the data ({get_method(choice.method).formula}).")
    try:
        with _warnings_as_notes(notes):
            peftlab.adapt(model, method, **hyperparameters)
        count = peftlab.count_parameters(model)
    except (NotImplementedError, RuntimeError) as exc:
        if "meta" not in str(exc):
            raise
        # the method reads weight values while it is built: count with its closed form
        spec = get_method(choice.method)
        config = make_config(spec, base, **choice.hyperparameters())
        base_count = peftlab.count_parameters(base)
        if spec.params_per_layer is None:
            raise
        modules = candidate_modules(base)
        added = sum(layer_parameter_count(spec, modules[n], config.for_layer(n))
                    for n in find_targets(base, config.targets, exclude=config.modules_to_save or ()))
        by_type = {k: dict(v, trainable=0) for k, v in base_count.by_type.items()}
        by_type[spec.name] = {"trainable": int(added), "total": int(added)}
        count = ParameterCount(int(added), base_count.total + int(added), by_type)
        closed_form = True
        notes.append(f"{choice.method}: counted with its closed form ({spec.formula}).")
    return Estimate(count, memory_estimate(model, count, choice, notes), closed_form, notes)


def memory_estimate(model: nn.Module, count: ParameterCount, choice: Choice,
                    notes: list[str]) -> dict[str, float]:
    """{category: bytes}: peftlab.memory.estimate_memory, else (a model it cannot read) the
    count arithmetic."""
    from peftlab.memory import estimate_memory
    from peftlab.production.fused import FUSED_METHODS

    backend = choice.backend
    if backend == "fused" and choice.method not in FUSED_METHODS:
        notes.append(f"backend='fused' has no kernels for {choice.method}: memory estimated for "
                     "the reference path.")
        backend = "reference"
    try:
        # the choice's own method, backend, rank, targets (None: the method's default), dropout
        # and batch shape; rows of unequal length are padded (an attention mask) once there are two
        hp = choice.hyperparameters()
        result = estimate_memory(model, choice.method, r=hp.pop("r", choice.r),
                                 batch=choice.batch_size, seq_len=choice.max_length,
                                 quantization=choice.quantization, backend=backend,
                                 padded=choice.batch_size > 1, targets=hp.pop("targets", None), **hp)
        return {k: float(v) for k, v in result.as_dict().items() if k != "total"}
    except Exception as exc:  # noqa: BLE001 (the arithmetic below still gives a figure)
        notes.append(f"peftlab.memory.estimate_memory failed ({type(exc).__name__}: {exc}); "
                     "showing the weights + optimizer arithmetic instead.")
    frozen = count.total - count.trainable
    if choice.quantization == "nf4":
        from peftlab.inject import output_head_names

        # bitsandbytes quantizes the linear layers, except the output head (kept in full precision)
        heads = output_head_names(model)
        linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                     if type(m) is nn.Linear and n not in heads and not n.endswith("base_layer"))
        linear += sum(m.base_layer.in_features * m.base_layer.out_features
                      for n, m in model.named_modules()
                      if type(getattr(m, "base_layer", None)) is nn.Linear and n not in heads)
        linear = min(linear, frozen)
        weights = linear * NF4_BYTES + (frozen - linear) * 4
    else:
        weights = frozen * 4
    return {"frozen weights": float(weights), "adapter weights": count.trainable * 4.0,
            "gradients": count.trainable * 4.0, "optimizer (AdamW)": count.trainable * 8.0}


__all__ = ["Choice", "Estimate", "estimate", "linear_modules", "meta_model", "per_layer_params",
           "is_classifier", "memory_estimate"]
