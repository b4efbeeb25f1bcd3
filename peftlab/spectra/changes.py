"""What training changed in a model's weights: ΔW layer by layer, for adapters and full fine-tuning.

An adapted model carries its W and ΔW (the frozen base weight and the adapter's update, as factors
where it has them). A fully fine-tuned model does not: take a :func:`snapshot` of the layers before
training and :func:`weight_changes` subtracts it afterwards (``peftlab.spectra.reports.update_report``
summarises each ΔW the same way for both).

    before = snapshot(model, ("q_proj", "v_proj"))      # before full fine-tuning
    ...                                                  # train every weight
    for name, W, delta in weight_changes(model, before): ...
    for name, W, delta in weight_changes(lora_model): ...   # an adapted model needs no snapshot
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import matches
from peftlab.spectra.layers import base_weight, layer_update, layers_with_update
from peftlab.spectra.svd import Update, working_copy


def dense(update: Update) -> Tensor:
    """ΔW as a matrix, from the matrix or its factors (left, right)."""
    return update[0] @ update[1] if isinstance(update, tuple) else update


def snapshot(model: nn.Module, layers: str | Sequence[str]) -> dict[str, Tensor]:
    """A copy of the weights of ``layers`` (a regex or names, the rule of ``targets``) before
    training: what :func:`weight_changes` compares a fully fine-tuned model with."""
    out = {name: module.weight.detach().clone() for name, module in model.named_modules()
           if isinstance(module, nn.Linear) and matches(name, layers)}
    if not out:
        raise ConfigError(f"No linear layer of this model matches layers={layers!r}. Expected module names "
                          "or a regex, as for targets, e.g. ('q_proj', 'v_proj').")
    return out


def weight_changes(
    model: nn.Module, before: dict[str, Tensor] | None = None, layers: str | Sequence[str] | None = None
) -> Iterator[tuple[str, Tensor, Update]]:
    """(layer name, W, ΔW) for each changed layer, in (d_out, d_in) layout.

    An adapted model (either backend): W is the frozen base weight, ΔW the active adapter's update
    (as factors where it has them). A fully fine-tuned model: pass ``before`` (from
    :func:`snapshot`); ΔW is the weight now minus the weight then.
    """
    if before is None:
        for name, layer, chosen in layers_with_update(model, None, layers):
            yield name, base_weight(layer), layer_update(layer, chosen)
        return
    modules = dict(model.named_modules())
    for name, weight in before.items():
        if layers is not None and not matches(name, layers):
            continue
        if name not in modules:
            raise ConfigError(f"The snapshot names {name!r}, which this model does not have. Expected the "
                              "model the snapshot was taken from.")
        now = modules[name].weight
        yield name, working_copy(weight), working_copy(now).to(weight.device) - working_copy(weight)

