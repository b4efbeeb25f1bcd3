"""What is adapted, read the same way from a peftlab model (reference, fused) and a peft model:
the method, its config and targets, the adapted layers, which parameters are the adapter's; and
the usual learning rates of each method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from peftlab.inject import adapted_layers
from peftlab.methods import METHODS
from peftlab.state import peek, records

# (low, high, typical) learning rates with AdamW, from the methods' papers, peft's examples and
# peftlab's own tasks (short runs of 30-60 steps train LoRA at 2e-3..5e-3): outside is "far"
USUAL_LR = {
    "reparameterisation": (1e-5, 1e-2, 2e-4),  # LoRA and relatives: 1e-4..3e-4 is common
    "adaptive": (1e-5, 1e-2, 2e-4),  # AdaLoRA
    "orthogonal": (1e-5, 1e-2, 1e-4),  # OFT, BOFT, HRA
    "rescaling": (1e-4, 1e-1, 3e-3),  # (IA)3 trains scaling vectors: 3e-3 in the paper
    "selective": (1e-5, 1e-2, 1e-3),  # BitFit
    "additive": (1e-5, 1e-2, 1e-4),  # bottleneck adapters
    "soft prompt": (1e-3, 1.0, 3e-2),  # prompt tuning trains embeddings: 0.3 in the paper
    "mixture": (1e-5, 1e-2, 2e-4),  # X-LoRA's router
}
USUAL_LR_BY_METHOD = {"vera": (1e-3, 1e-1, 4e-3), "llama_adapter": (1e-3, 5e-2, 9e-3),
                      "fourierft": (1e-3, 5e-1, 5e-2), "vblora": (1e-4, 2e-2, 1e-3)}



@dataclass(frozen=True)
class AdapterView:
    kind: str  # "peftlab", "peft" or "none"
    method: str | None  # peftlab's name for the method
    config: Any  # the active adapter's config (peftlab's or peft's)
    targets: Any  # the targets it was built with (names / suffixes, or a regex)
    adapted: tuple[str, ...]  # module names that carry it, in the base model's naming
    owned: Callable[[str], bool]  # is this parameter name the adapter's (or a modules_to_save copy's)?


def view_of(model: nn.Module) -> AdapterView:
    if type(model).__module__.startswith("peft."):
        return _peft_view(model)
    recs = records(model)
    if not recs:
        return AdapterView("none", None, None, None, (), lambda name: False)
    state = peek(model)
    name = state.active if state is not None and state.active in recs else next(iter(recs))
    config = recs[name].config
    adapted = tuple(n for n, m in adapted_layers(model).items() if name in m.adapters)
    return AdapterView("peftlab", recs[name].method, config, getattr(config, "targets", None), adapted,
                 lambda p: ".adapters." in p or ".copies." in p)


def _peft_view(model: nn.Module) -> AdapterView:
    from peft.tuners.tuners_utils import BaseTunerLayer

    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    config = model.peft_config[name]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    method = next((m for m, spec in METHODS.items() if spec.peft_type == peft_type), None)
    base = model.get_base_model()
    adapted = tuple(n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer))
    names = list(model.peft_config)

    def owned(param: str) -> bool:
        return "modules_to_save" in param or any(f".{a}." in param or param.endswith(f".{a}") for a in names)

    return AdapterView("peft", method, config, getattr(config, "target_modules", None), adapted, owned)


def lr_range(method: str | None) -> tuple[float, float, float]:
    if method in USUAL_LR_BY_METHOD:
        return USUAL_LR_BY_METHOD[method]
    family = METHODS[method].family if method in METHODS else "reparameterisation"
    return USUAL_LR.get(family, USUAL_LR["reparameterisation"])


__all__ = ["AdapterView", "view_of", "lr_range", "USUAL_LR"]
