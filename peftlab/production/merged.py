"""Production paths for the methods Hugging Face peft lacks: BitFit and bottleneck adapters.

Every peftlab method exists twice, a readable reference and a production path, proven equal.
Where peft has the method, peft is the production path; for these two it is the form
a practitioner would ship, written here and tested against the reference:

- **BitFit** (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199): no wrapper at all. The
  selection is done with ``requires_grad`` on the original model's own biases (and norm weights
  with ``include_norms=True``); everything else is frozen. :func:`bitfit` does that, and
  :func:`copy_reference_to_plain` gives a plain model the reference adapter's trained tensors.

- **Bottleneck adapters** (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; He et al.
  2021, https://arxiv.org/abs/2110.04366): :func:`fuse_bottleneck` replaces each
  ``AdaptedLayer(base, adapters={name: Bottleneck})`` by one :class:`FusedBottleneck` module: no
  ModuleDict lookup or adapter loop, 2-D ``torch.addmm`` calls with the biases and the scale s
  folded in:

      y = addmm(b, x, Wᵀ)                         the frozen base layer
      z = addmm(a, y or x̂, Aᵀ)                    down projection (houlsby reads y, parallel the
                                                  sublayer input x̂, handed over as the reference's)
      h = addmm(y + s·u, f(z), Uᵀ, alpha=s)       up projection, scaled, added to y

  Without gradients (evaluation, generation) Houlsby's down projection is folded into the base
  matmul, so one GEMM of width d_out + r replaces two:

      houlsby    [y | z] = x [W; A W]ᵀ + [b | A b + a]           (z = A (W x + b) + a)

  The folded weight is cached and rebuilt whenever a parameter changes (torch's version
  counters), so training after evaluation stays correct. While training, folding would make
  autograd compute a gradient for the frozen W rows too, so the training path keeps them apart.
  The parallel adapter's down projection reads x̂, not this layer's input x, so it has no GEMM
  here to share (its natural partner, the sublayer's first projection, lives in another module):
  it runs as its own addmm in both paths.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer, set_module, adapted_layers
from peftlab.methods.bottleneck import ACTIVATIONS, Bottleneck


# --------------------------------------------------------------------------------------------
# BitFit: requires_grad on the model's own biases
# --------------------------------------------------------------------------------------------
def bitfit(
    model: nn.Module,
    targets: str | tuple[str, ...] = ".*",
    include_norms: bool = False,
    modules_to_save: tuple[str, ...] | None = None,
) -> list[str]:
    """Make ``model`` train exactly what BitFit trains, in place, with no wrapper: its own biases
    (and norm weights with ``include_norms``) and the whole ``modules_to_save`` (None: the head of
    a sequence-classification model). Returns the names of the trainable parameters.

    Same selection and same errors as ``peftlab.adapt(model, "bitfit", ...)`` (a model without
    biases raises ConfigError offering include_norms=True).
    """
    from peftlab.inject import default_modules_to_save
    from peftlab.inject import matches
    from peftlab.methods.bitfit import BitFitConfig, bitfit_targets

    if modules_to_save is None:
        modules_to_save = default_modules_to_save(model)
    config = BitFitConfig(targets=targets, include_norms=include_norms, modules_to_save=tuple(modules_to_save))
    selected = bitfit_targets(model, config)
    model.requires_grad_(False)
    for name, tensors in selected.items():
        for tensor in tensors:
            getattr(model.get_submodule(name), tensor).requires_grad_(True)
    for name, module in model.named_modules():
        if name and matches(name, tuple(modules_to_save)):
            module.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def copy_reference_to_plain(reference: nn.Module, plain: nn.Module, adapter_name: str = "default") -> None:
    """Copy a reference adapter's tensors into a plain model of the same architecture.

    The weight bridge gives them under their on-disk names, ``base_model.model.<module>.<tensor>``:
    for BitFit and trainable copies those are exactly the plain model's own parameter names.
    """
    from peftlab.production.hf_peft import PREFIX, reference_state_dict

    params = dict(plain.named_parameters())
    for key, tensor in reference_state_dict(reference, adapter_name).items():
        name = key.removeprefix(PREFIX)
        if name not in params:
            raise ConfigError(
                f"The plain model has no parameter {name!r} for the adapter tensor {key!r}. Expected "
                "a BitFit adapter and a plain model of the same architecture."
            )
        params[name].copy_(tensor)


# --------------------------------------------------------------------------------------------
# Bottleneck adapters: one fused module per adapted layer
# --------------------------------------------------------------------------------------------
class FusedBottleneck(nn.Module):
    """A linear layer and its bottleneck adapter in one forward (same Parameter objects as the
    reference, so training continues and names differ only by ``.adapters.<name>``)."""

    def __init__(self, layer: AdaptedLayer, adapter_name: str) -> None:
        super().__init__()
        adapter = layer.adapters[adapter_name]
        self.base_layer = layer.base_layer  # frozen W, b
        self.down, self.up = adapter.down, adapter.up  # (r, width) + a, (d_out, r) + u
        self.serial, self.scaling = adapter.serial, adapter.scaling
        self.activation = adapter.non_linearity
        # for unfuse, and (parallel) the reference's sublayer_input; not submodules (no duplicate names)
        self.__dict__["_original"], self.__dict__["_adapter"] = layer, adapter
        self._folded: tuple | None = None  # (parameter versions, [W; A W] weight, [b | A b + a] bias)

    def forward(self, x: Tensor) -> Tensor:
        W, b = self.base_layer.weight, self.base_layer.bias
        A, a, U, u = self.down.weight, self.down.bias, self.up.weight, self.up.bias
        x2 = x.reshape(-1, x.shape[-1]).to(W.dtype)  # (N, d_in)
        if self.serial and not torch.is_grad_enabled():  # one GEMM for the base and the down projection
            weight, bias = self._folded_weight()
            yz = torch.addmm(bias, x2, weight.t())  # (N, d_out + r)
            y, z = yz[:, : W.shape[0]], yz[:, W.shape[0]:]
        else:
            y = torch.addmm(b, x2, W.t()) if b is not None else x2 @ W.t()  # (N, d_out)
            if self.serial:
                z = torch.addmm(a, y, A.t())  # (N, r)
            else:  # parallel: down reads the sublayer input x̂ (the reference's own), not x
                x_hat = self._adapter.sublayer_input(x)  # (..., d_model)
                z = torch.addmm(a, x_hat.reshape(-1, x_hat.shape[-1]).to(A.dtype), A.t())  # (N, r)
        out = torch.addmm(y + self.scaling * u, ACTIVATIONS[self.activation](z), U.t(), alpha=self.scaling)
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def _folded_weight(self) -> tuple[Tensor, Tensor]:
        W, b = self.base_layer.weight, self.base_layer.bias
        A, a = self.down.weight, self.down.bias
        tensors = [t for t in (W, b, A, a) if t is not None]
        versions = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._folded is None or self._folded[0] != versions:
            b0 = b if b is not None else W.new_zeros(W.shape[0])
            # z = A (W x + b) + a = (A W) x + (A b + a)
            weight, bias = torch.cat([W, A @ W]), torch.cat([b0, A @ b0 + a])
            self._folded = (versions, weight, bias)
        return self._folded[1], self._folded[2]

    def extra_repr(self) -> str:
        kind = "houlsby" if self.serial else "parallel"
        return f"kind={kind}, r={self.down.out_features}, scaling={self.scaling}, activation={self.activation}"


def fuse_bottleneck(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Replace every adapted layer running one bottleneck adapter (default: the active one) by a
    :class:`FusedBottleneck`, in place. Outputs and gradients stay those of the reference.

    Layers in another state (several active adapters, disabled, a non-Linear base such as GPT-2's
    Conv1D) are left as they are. Undo with :func:`unfuse_bottleneck` (e.g. before saving).
    """
    fused = 0
    for name, layer in adapted_layers(model).items():
        key = adapter_name or (layer.active[0] if layer.active else None)
        if (key is None or layer.active != [key] or layer.disabled or layer.merged
                or not isinstance(layer.adapters[key], Bottleneck) or type(layer.base_layer) is not nn.Linear):
            continue
        set_module(model, name, FusedBottleneck(layer, key))
        fused += 1
    if not fused:
        raise ConfigError(
            "No layer carries an active bottleneck adapter on an nn.Linear, so nothing was fused. "
            "Expected a model from peftlab.adapt(model, 'bottleneck')."
        )
    return model


def unfuse_bottleneck(model: nn.Module) -> nn.Module:
    """Put the reference AdaptedLayers back (same parameters): saving and merging work again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedBottleneck):
            set_module(model, name, module._original)
    return model


__all__ = ["bitfit", "copy_reference_to_plain", "FusedBottleneck", "fuse_bottleneck", "unfuse_bottleneck"]
