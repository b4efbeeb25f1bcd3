"""LoRA on bare parameters (peft's ``target_parameters``): the weights that are not in an nn.Linear.

A mixture-of-experts block keeps its experts as one 3-D parameter and multiplies with
``torch.bmm``; no nn.Linear is there to wrap. LoRA then adapts the parameter itself: while the
module runs, it sees

    P' = P + ΔP,    ΔP = (alpha / r) · B A                 (a 2-D parameter, d_out x d_in)
    ΔP_e = (alpha / r) · B_e A_e   for every expert e       (a 3-D one: rank r per expert)

and nothing else of the module changes. transformers stores experts as (E, d_out, d_in), or as
(E, d_in, d_out) where the module says ``is_transposed`` (GPT-OSS); then ΔP_e = (B_e A_e)^T. peft
keeps one A (E·r x d_in) and one B (d_out x E·r) for all experts, in its own packing: expert e's
rows of A are e·r ... e·r + r - 1, its columns of B are e, E + e, 2E + e, ... (every E-th).

Several parameters of one module (an expert block's gate_up_proj and down_proj) each get their
own A and B; peft nests one wrapper per parameter, the first registered innermost, which is how
their tensors are named on disk (``experts.base_layer.lora_A.weight`` for the inner one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import Adapter, inject


class ParameterLoRA(Adapter):
    """The module runs with P' = P + (alpha / r) · B A for each of its targeted parameters P."""

    rides_along = True  # its layers are not target_modules; the config names the parameters
    layer_types = "a module holding the named 2-D or 3-D parameters"

    def __init__(self, base: nn.Module, names: Sequence[str], r: int, scaling: float, init: str) -> None:
        super().__init__()
        own = dict(base.named_parameters(recurse=False))
        self.names = [n for n in own if n in names]  # registration order: peft's nesting order
        self.scaling = scaling
        self.transposed = bool(getattr(base, "is_transposed", False))  # experts stored (E, d_in, d_out)
        self.experts: dict[str, int] = {}
        for name in self.names:
            shape = own[name].shape
            if len(shape) not in (2, 3):
                raise ConfigError(
                    f"target_parameters names {name!r} of shape {tuple(shape)}. Expected a 2-D "
                    "(d_out x d_in) or 3-D (experts x d_in x d_out) parameter; try a weight matrix."
                )
            experts = shape[0] if len(shape) == 3 else 1
            d_out, d_in = shape[-2:]  # (d_out, d_in), or (E, d_out, d_in)
            if self.transposed and len(shape) == 3:
                d_in, d_out = d_out, d_in  # (E, d_in, d_out)
            a = torch.empty(r * experts, d_in, dtype=own[name].dtype)
            if init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.register_parameter(f"{name}_lora_A", nn.Parameter(a))
            self.register_parameter(f"{name}_lora_B", nn.Parameter(torch.zeros(d_out, r * experts, dtype=a.dtype)))
            self.experts[name] = experts

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(L, R) with ΔP_e = (alpha / r) · L_e R_e for a 3-D P: (B_e, A_e), transposed for a
        transposed expert layout."""
        a, b, experts = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B"), self.experts[name]
        a = a.reshape(experts, -1, a.shape[-1])  # (E, r, d_in): expert e's rows e·r ... e·r + r - 1
        b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, d_out, r): columns e, E + e, ...
        return (a.transpose(-2, -1), b.transpose(-2, -1)) if self.transposed else (b, a)

    def delta(self, base: nn.Module, name: str) -> Tensor:
        """ΔP, shaped as P."""
        param = getattr(base, name)
        if self.experts[name] == 1 and param.dim() == 2:
            a, b = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
            return ((b @ a) * self.scaling).to(param.dtype)
        left, right = self.factors(name)
        return (torch.einsum("eor,eri->eoi", left, right) * self.scaling).to(param.dtype)

    def adapted(self, base: nn.Module, name: str) -> Tensor:
        """P' = P + ΔP; for a 3-D P in one fused multiply-add per expert, as peft runs it."""
        param = getattr(base, name)
        if param.dim() == 3 and param.dtype in (torch.float32, torch.float64):
            left, right = self.factors(name)
            return torch.baddbmm(param, left.to(param.dtype), right.to(param.dtype), alpha=self.scaling)
        return param + self.delta(base, name)

    def layer_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> Tensor:
        weights = {name: self.adapted(base, name) for name in self.names}
        return torch.func.functional_call(base, weights, (x, *args), kwargs, strict=False)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        raise ConfigError(
            "LoRA on parameters changes what the module computes with, so it must run first on its "
            "layer; another adapter is active before it there. Expected it alone on that module; "
            "try peftlab.set_adapter(model, name) to run one adapter at a time."
        )

    def merge_into(self, base: nn.Module, sign: int) -> None:
        """P += sign · ΔP for each targeted parameter (merge: +1, unmerge: -1)."""
        for name in self.names:
            getattr(base, name).data += sign * self.delta(base, name)

    def delta_weight(self, base: nn.Module) -> Tensor:
        if self.names == ["weight"]:
            return self.delta(base, "weight")
        raise NotImplementedError(f"ParameterLoRA adapts {self.names}, not only the weight: see merge_into.")

    def peft_names(self) -> dict[str, str]:
        """{our parameter: peft's in-memory name template}: the first registered parameter is
        the innermost of peft's nested wrappers (base_layer. once per wrapper around it)."""
        out = {}
        for depth, name in enumerate(reversed(self.names)):
            for part in ("A", "B"):
                out[f"{name}_lora_{part}"] = "base_layer." * depth + f"lora_{part}.{{name}}.weight"
        return out


def add_parameter_lora(model: nn.Module, config, adapter_name: str) -> None:
    """Put a ParameterLoRA on each module holding parameters named in config.target_parameters
    (peft's rule: a full name "experts.down_proj" or a suffix of one)."""
    if config.dropout:
        raise ConfigError(
            f"LoRA on parameters (target_parameters) takes no dropout (peft refuses it too); got "
            f"dropout={config.dropout}. Expected dropout=0; try leaving dropout out."
        )
    keys = tuple(config.target_parameters)
    per_module: dict[str, list[str]] = {}
    for wrapped_name, module in model.named_modules():
        # a module already adapted holds its parameters under base_layer: it is adapted again by its name
        module_name = ".".join(part for part in wrapped_name.split(".") if part != "base_layer")
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if key in keys or any(key.endswith("." + k) for k in keys):
                per_module.setdefault(module_name, []).append(param_name)
    if not per_module:
        raise ConfigError(
            f"target_parameters={list(keys)!r} matched no parameter. Expected names such as "
            "'mlp.experts.gate_up_proj' (a module path and its parameter, or a suffix of one); "
            "try [n for n, _ in model.named_parameters()] to see them."
        )
    inject(model, list(per_module), lambda name, base: ParameterLoRA(
        base, per_module[name], config.r, config.scaling, config.init), adapter_name)
