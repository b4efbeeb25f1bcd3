"""VB-LoRA: extreme parameter-efficient fine-tuning with a shared vector bank.

Li et al., 2024, VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks,
https://arxiv.org/abs/2405.15179

LoRA's factors A (r x d_in) and B (d_out x r) are cut into sub-vectors of length L, and every
sub-vector is a mix of k vectors picked from one bank V (N x L) that all adapted layers share
(paper, eq. 3): each sub-vector has N logits z; its top-k pick the vectors, their softmax mixes them

        sub-vector = Σ_{i ∈ top-k(z)} softmax(z_top-k)_i · V_i        h = W0 x + B A dropout(x)

        V (N x L, shared, trained) ─┐
        logits_A (r, d_in/L, N) ────┴─ top-k mix ─▶ A (r x d_in) ─┐
        logits_B (d_out/L, r, N) ───── top-k mix ─▶ B (d_out x r) ─┴─▶ ΔW = B A

Only the bank and the logits train; d_in and d_out must be multiples of L. The bank starts
U(-b, b) and the logits N(0, σ²), so ΔW != 0 at init (peft's default, as the paper's): the
model does not start exactly at the pretrained one. peft keeps the bank once, on the model
(``base_model.vblora_vector_bank.<adapter>``); peftlab gives every layer the same module, as VeRA
does with its matrices. ``save_only_topk_weights`` stores each logit vector's top-k indices and
k - 1 weights instead (a smaller file that can no longer resume training): see hf_peft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError
from peftlab.inject import LinearAdapter, adapted_layers, base_of, find_targets, inject, is_conv1d, layer_dims
from peftlab.methods.base import AdapterConfig, check_range, check_rank, in_base_layout, is_count


@dataclass(frozen=True)
class VBLoRAConfig(AdapterConfig):
    r: int = 4  # rank of B A
    num_vectors: int = 256  # N: vectors in the shared bank
    vector_length: int = 256  # L: length of a bank vector; divides every adapted d_in and d_out
    topk: int = 2  # k: bank vectors mixed into each sub-vector
    dropout: float = 0.0  # dropout on the adapter's input
    save_only_topk_weights: bool = False  # save top-k indices and weights, not the logits (inference only)
    init_vector_bank_bound: float = 0.02  # the bank starts U(-bound, bound)
    init_logits_std: float = 0.1  # the logits start N(0, std²)

    def __post_init__(self) -> None:
        check_rank(self.r)
        for name in ("num_vectors", "vector_length", "topk"):
            if not is_count(getattr(self, name)):
                raise ConfigError(f"VB-LoRA {name}={getattr(self, name)!r} is invalid. Expected a positive integer.")
        if self.topk > self.num_vectors:
            raise ConfigError(f"VB-LoRA topk={self.topk} is above num_vectors={self.num_vectors}: it picks from the "
                              "bank. Expected topk <= num_vectors; try topk=2.")
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_range("init_vector_bank_bound", self.init_vector_bank_bound, low=0.0)
        check_range("init_logits_std", self.init_logits_std, low=0.0)


def vblora_layer_parameter_count(d_in: int, d_out: int, config: VBLoRAConfig) -> int:
    """One layer's logits: N · r · (d_in + d_out) / L (the bank is counted once per model)."""
    return config.num_vectors * config.r * (d_in + d_out) // config.vector_length


class VectorBank(nn.Module):
    """The bank V (N, L) every VB-LoRA layer of one adapter reads: one module, referenced by each."""

    def __init__(self, config: VBLoRAConfig) -> None:
        super().__init__()
        bound = config.init_vector_bank_bound
        bank = torch.empty(config.num_vectors, config.vector_length).uniform_(-bound, bound)
        self.vblora_vector_bank = nn.Parameter(bank)  # V (N, L), trained


def mix(logits: Tensor, bank: Tensor, k: int) -> Tensor:
    """(..., N) logits -> (..., L): the softmax-weighted sum of the bank's top-k vectors."""
    top, indices = logits.topk(k, dim=-1)  # (..., k)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


class VBLoRA(LinearAdapter):
    """h = W0 x + B A dropout(x), A and B mixed from a shared bank by their top-k logits."""

    def __init__(self, base: nn.Module, config: VBLoRAConfig, bank: VectorBank) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        L = config.vector_length
        if d_in % L or d_out % L:
            raise ConfigError(f"VB-LoRA vector_length={L} must divide this layer's d_in={d_in} and d_out={d_out} "
                              "(peft refuses it too). Expected a common divisor of every adapted layer's sides; "
                              "try vector_length=256 on real models, or 8 or 16 on tiny ones.")
        self.topk, self.transposed, self.bank = config.topk, is_conv1d(base), bank  # bank: shared
        self.vblora_logits_A = nn.Parameter(torch.zeros(config.r, d_in // L, config.num_vectors))
        self.vblora_logits_B = nn.Parameter(torch.zeros(d_out // L, config.r, config.num_vectors))
        with torch.no_grad():
            self.vblora_logits_A.normal_(0, config.init_logits_std)
            self.vblora_logits_B.normal_(0, config.init_logits_std)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A (r, d_in), B (d_out, r)) mixed from the bank."""
        V, logits_A, logits_B = self.bank.vblora_vector_bank, self.vblora_logits_A, self.vblora_logits_B
        if self.training and not logits_A.is_meta and logits_A[0, 0].isinf().any():
            raise ConfigError("VB-LoRA logits hold -inf: this adapter was loaded from a save_only_topk_weights "
                              "file, which keeps only the top-k. Expected logits saved in full to train; use "
                              "this one for inference.")
        A = mix(logits_A, V, self.topk).reshape(logits_A.shape[0], -1)  # (r, d_in/L, L) -> (r, d_in)
        B = mix(logits_B, V, self.topk).transpose(1, 2).reshape(-1, logits_B.shape[1])  # (d_out/L, L, r) -> (d_out, r)
        return A, B

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        # h = W0 x + B A dropout(x)
        A, B = self.factors()
        x = self.dropout(x.to(A.dtype))
        return (result + F.linear(F.linear(x, A), B)).to(result.dtype)  # (..., r) -> (..., d_out)

    def delta_weight(self, base: nn.Module) -> Tensor:
        A, B = self.factors()
        return in_base_layout(B @ A, self.transposed)


def build_vblora(model: nn.Module, config: VBLoRAConfig, adapter_name: str) -> None:
    """One bank for the adapter, then VB-LoRA on each target, all reading that bank."""
    names = find_targets(model, config.targets, accept=VBLoRA.can_adapt, exclude=config.modules_to_save or (),
                         expected=VBLoRA.layer_types)
    bank = VectorBank(config)
    inject(model, names, lambda _name, base: VBLoRA(base, config, bank), adapter_name)


def vblora_parameter_count(model: nn.Module, config: VBLoRAConfig) -> int:
    """N · L for the shared bank, plus N · r · (d_in + d_out) / L logits per adapted layer."""
    names = find_targets(model, config.targets, accept=VBLoRA.can_adapt, exclude=config.modules_to_save or (),
                         expected=VBLoRA.layer_types)
    layers = sum(vblora_layer_parameter_count(*layer_dims(base_of(model.get_submodule(n))), config) for n in names)
    return config.num_vectors * config.vector_length + layers


def vector_bank(model: nn.Module, adapter_name: str = "default") -> Tensor:
    """The shared bank V of a model's VB-LoRA adapter ``adapter_name``."""
    for layer in adapted_layers(model).values():
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, VBLoRA):
            return adapter.bank.vblora_vector_bank
    raise ConfigError(f"This model has no VB-LoRA adapter named {adapter_name!r}. Expected a model from "
                      "peftlab.adapt(model, 'vblora').")


def indices_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type peft stores top-k indices in for a bank of ``num_vectors``."""
    for limit, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if num_vectors < limit:
            return dtype
    return torch.int64


def to_topk_file(config: VBLoRAConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """save_only_topk_weights: each "<...>.vblora_logits_X" becomes "<...>_topk_indices" (k indices)
    and "<...>_topk_weights" (the first k - 1 softmax weights: they sum to 1), as peft saves it."""
    if not config.save_only_topk_weights:
        return state
    out = {}
    for key, tensor in state.items():
        if ".vblora_logits_" not in key:
            out[key] = tensor
            continue
        top, indices = tensor.topk(config.topk)
        out[key + "_topk_indices"] = indices.to(indices_dtype(config.num_vectors))
        out[key + "_topk_weights"] = F.softmax(top, dim=-1)[..., :-1].contiguous()
    return out


def from_topk_file(config: VBLoRAConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse for loading: logits log(w) at the top-k indices, -inf elsewhere (peft's)."""
    if not config.save_only_topk_weights:
        return state
    out = {k: v for k, v in state.items() if not k.endswith(("_topk_indices", "_topk_weights"))}
    for key in [k for k in state if k.endswith("_topk_indices")]:
        logits_key = key.removesuffix("_topk_indices")
        weights = state[logits_key + "_topk_weights"]
        weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
        full = torch.full((*weights.shape[:-1], config.num_vectors), float("-inf"), dtype=weights.dtype)
        out[logits_key] = full.scatter(-1, state[key].long(), weights.log())
    return out
