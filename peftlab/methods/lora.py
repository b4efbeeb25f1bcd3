"""LoRA: Low-Rank Adaptation of Large Language Models.

Hu et al., 2021, https://arxiv.org/abs/2106.09685 (rsLoRA scaling: Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732).

The pretrained weight W0 (d_out x d_in) stays frozen; the update is a product of two thin
matrices, so only r (d_in + d_out) numbers train per layer:

        x ──┬──────────── W0 ─────────────┐
            │                             (+) ──▶ h = W0 x + (alpha / r) · B A x
            └─ dropout ─ A (r x d_in) ─ B (d_out x r) ─ · alpha/r ┘

A starts Kaiming-uniform and B at zero, so B A = 0 and the adapted model starts exactly at the
pretrained one (paper, section 4.1). ``scaling = alpha / r`` keeps the update's size roughly
independent of r when alpha is fixed; rsLoRA uses ``alpha / sqrt(r)``, which keeps learning
stable at large ranks.

For an embedding layer the input is token ids, so ``A x`` becomes a row lookup in A's
transpose; for transformers' GPT-2 ``Conv1D`` the base weight is stored transposed. On a
convolution (nn.Conv1d/2d/3d) A and B are themselves convolutions: see :class:`ConvLoRA`; on an
nn.MultiheadAttention, whose forward reads its weights directly, see :class:`MultiheadAttentionLoRA`.

With ``lora_bias=True`` (peft's option, for adapters distilled from a full fine-tune that also
changed biases) B gets a bias b_B (d_out) of its own, scaled with the rest of the update:

        h = W0 x + b0 + scaling · (B A dropout(x) + b_B)      merged: W0 += s B A,  b0 += s b_B

so merging needs a base layer with a bias (as in peft, a layer without one then does not merge);
peft refuses it on embeddings and with inits other than its default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from peftlab.errors import ConfigError
from peftlab.inject import (CONV_LAYERS, Adapter, ConvShape, check_zero_padding, conv_shape, conv_with,
                            embed_scale, is_conv1d, layer_dims)
from peftlab.inject.gather import LowRank
from peftlab.methods.base import (AdapterConfig, LayerActivations, SavedActivations,
                                  check_rank, check_range, is_count, low_rank_activations, pattern_key,
                                  trains_dropout)
from peftlab.methods.lora_init import WEIGHT_INITS, check_init, init_family, init_from_weight


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    r: int = 8  # rank of the update B A
    alpha: float = 8.0  # scale numerator: scaling = alpha / r (alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.0  # dropout on the adapter's input only; the base path never drops
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # "kaiming" (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r)), "loftq" (see
    # peftlab/quant/loftq.py: the base weight becomes NF4-quantised, B A carries the error), or a
    # start chosen from the layer (methods/lora_init.py): "pissa" ("pissa_niter_K"), "olora",
    # "lora_ga" and "eva" (these two need data: methods 'lora_ga' and 'eva', with data=...)
    init: str = "kaiming"
    # a bias b_B on B, trained and merged into the base layer's bias (peft's lora_bias; see above)
    lora_bias: bool = False
    # a few embedding rows trained with the adapter (peft's trainable_token_indices): token ids
    # for the input embedding, or {embedding layer name: ids}; see methods/trainable_tokens.py
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None
    # bare parameters to adapt, e.g. ("mlp.experts.gate_up_proj",) of a mixture-of-experts
    # block (peft's target_parameters); see methods/param_lora.py
    target_parameters: tuple[str, ...] | None = None
    # per-layer rank and alpha (peft's names and matching, methods/base.py pattern_key):
    # {"layers.0.self_attn.q_proj": 16, "v_proj": 4}; a layer no key names keeps r / alpha
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_patterns()
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            object.__setattr__(self, "trainable_token_indices", {k: tuple(v) for k, v in tokens.items()})
        elif tokens is not None:
            object.__setattr__(self, "trainable_token_indices", tuple(tokens))
        if self.target_parameters is not None:
            object.__setattr__(self, "target_parameters", tuple(self.target_parameters))
        check_rank(self.r)
        check_range("alpha", self.alpha, low=0.0, low_open=True)
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_init(self.init)
        if self.target_parameters and self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"init={self.init!r} with target_parameters is not supported: these inits start "
                              "from a linear layer's weight or inputs. Expected init='kaiming' or 'gaussian' "
                              "with target_parameters; try leaving init out.")
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias={self.lora_bias!r} is invalid. Expected True or False; try "
                              "lora_bias=True, or leave it out for no bias on B.")
        if self.lora_bias and self.init != "kaiming":
            raise ConfigError(
                f"lora_bias=True with init={self.init!r} is not supported: peft allows a bias on B only "
                "with its default init (init_lora_weights=True or False). Expected init='kaiming'; try "
                "leaving init out, or lora_bias=False."
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def for_layer(self, name: str) -> LoRAConfig:
        """This config with the rank and alpha that rank_pattern / alpha_pattern give the layer."""
        if not (self.rank_pattern or self.alpha_pattern):
            return self
        r_key, alpha_key = pattern_key(self.rank_pattern, name), pattern_key(self.alpha_pattern, name)
        return dataclasses.replace(self, r=self.rank_pattern[r_key] if r_key is not None else self.r,
                                   alpha=self.alpha_pattern[alpha_key] if alpha_key is not None else self.alpha,
                                   rank_pattern={}, alpha_pattern={})

    def _check_patterns(self) -> None:
        for name, pattern, check in (("rank_pattern", self.rank_pattern, lambda v: is_count(v)),
                                     ("alpha_pattern", self.alpha_pattern,
                                      lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name}={pattern!r} is invalid. Expected a dict {{layer name or regex: value}}, "
                                  f"e.g. {name}={{'v_proj': {16 if name == 'rank_pattern' else 32}}}.")
            bad = {k: v for k, v in pattern.items() if not isinstance(k, str) or not check(v)}
            if bad:
                wanted = "a positive integer rank" if name == "rank_pattern" else "a positive alpha"
                raise ConfigError(f"{name} has invalid entries {bad}. Expected {{layer name or regex: {wanted}}}.")
            object.__setattr__(self, name, dict(pattern))
        if (self.rank_pattern or self.alpha_pattern) and self.target_parameters:
            raise ConfigError("rank_pattern / alpha_pattern with target_parameters is not supported: the "
                              "patterns apply to layers, the parameter LoRAs take r and alpha. Expected one of "
                              "the two; try separate adapters.")


@dataclass(frozen=True)
class LoftQConfig(LoRAConfig):
    """LoRA initialised by LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659)."""

    init: str = "loftq"
    loftq_bits: int = 4  # bits of the quantised base (NF4: only 4)
    loftq_iter: int = 1  # alternating quantise / SVD rounds (peft's default: 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "loftq":
            raise ConfigError(f"The loftq method is LoRA with init='loftq'; got init={self.init!r}. "
                              "Expected init='loftq'; for another init use method 'lora'.")
        if self.loftq_bits != 4:
            raise ConfigError(f"loftq_bits={self.loftq_bits!r} is not supported. Expected 4 (NF4).")
        if not is_count(self.loftq_iter):
            raise ConfigError(f"loftq_iter={self.loftq_iter!r} is invalid. Expected a positive integer.")


@dataclass(frozen=True)
class PiSSAConfig(LoRAConfig):
    """LoRA started from W's principal singular triplets (PiSSA, https://arxiv.org/abs/2404.02948;
    methods/lora_init.py); the frozen base becomes the residual W - s B0 A0."""

    init: str = "pissa"  # "pissa" (exact SVD) or "pissa_niter_K" (randomized SVD, K iterations)

    def __post_init__(self) -> None:
        super().__post_init__()
        if init_family(self.init) != "pissa":
            raise ConfigError(f"The pissa method is LoRA with init='pissa' or 'pissa_niter_K'; got init="
                              f"{self.init!r}. Expected one of those; for another init use method 'lora'.")


@dataclass(frozen=True)
class OLoRAConfig(LoRAConfig):
    """LoRA started from W's QR decomposition (OLoRA, https://arxiv.org/abs/2406.01775;
    methods/lora_init.py); the frozen base becomes the residual W - s B0 A0."""

    init: str = "olora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "olora":
            raise ConfigError(f"The olora method is LoRA with init='olora'; got init={self.init!r}. "
                              "Expected init='olora'; for another init use method 'lora'.")


class LoRA(Adapter):
    """h = W0 x + scaling · (B A dropout(x) + b_B), for nn.Linear, Conv1D and nn.Embedding bases
    (b_B only with lora_bias, not on embeddings)."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        check_rank(config.r, d_in, d_out)
        self.r, self.scaling = config.r, config.scaling
        self.is_embedding = isinstance(base, nn.Embedding)
        self.transposed = is_conv1d(base)  # Conv1D stores W as (d_in, d_out)
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(d_out, config.r))  # (d_out, r)
        if config.lora_bias and self.is_embedding:
            raise ConfigError("lora_bias=True is not supported on an nn.Embedding (peft refuses it too: "
                              "its B is a bare matrix there). Expected lora_bias=False for embedding "
                              "targets; try targets that leave the embedding out.")
        _add_bias_on_B(self, base, d_out, config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters(config.init)
        if config.init == "loftq":  # LoftQ also replaces the base weight W by its NF4 version Q
            from peftlab.quant.loftq import loftq_init_lora

            loftq_init_lora(base, self, getattr(config, "loftq_bits", 4), getattr(config, "loftq_iter", 1))
        if init_family(config.init) in WEIGHT_INITS:  # PiSSA, OLoRA: A, B from W; W becomes W - s B A
            init_from_weight(base, self, config.init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        if self.is_embedding:  # peft's choice for embeddings: A = 0, B ~ N(0, 1)
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:  # same as nn.Linear's default init, applied to A alone
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        if self.is_embedding:  # x holds token ids: "A x" is a lookup of rows of A^T
            update = F.embedding(x, self.lora_A.T) @ self.lora_B.T * self.scaling  # (..., d_out)
            scale = embed_scale(base)  # a scaled embedding (Gemma) scales its update as its rows
            return (result + (update if scale is None else update * scale.to(update.dtype))).to(result.dtype)
        x = self.dropout(x.to(self.lora_A.dtype))
        update = F.linear(F.linear(x, self.lora_A), self.lora_B, self.lora_B_bias)  # (..., r) -> (..., d_out)
        return (result + update * self.scaling).to(result.dtype)  # add in the adapter's precision

    def saved_activations(self, layer: LayerActivations) -> SavedActivations:
        """For the memory ledger: x (or dropout(x) and its mask) for A's gradient, x Aᵀ (N, r) for B's."""
        return low_rank_activations(layer, self.r, self.dropout)

    def delta_weight(self, base: nn.Module) -> Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (d_out, d_in)
        return delta.T if (self.transposed or self.is_embedding) else delta

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        return None if self.lora_B_bias is None else self.lora_B_bias * self.scaling  # (d_out,)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(left, right) with ΔW = left @ right in (d_out, d_in) layout: for spectra via QR."""
        return self.lora_B * self.scaling, self.lora_A

    def low_rank(self) -> LowRank | None:
        """(A, B, s) for a mixed batch to stack (inject/gather.py); None with a bias on B, on an
        embedding (its input is token ids) and while dropout trains (each row its own mask)."""
        if self.is_embedding or self.lora_B_bias is not None or (self.training and trains_dropout(self.dropout)):
            return None
        return LowRank(self.lora_A, self.lora_B, self.scaling)


class ConvLoRA(Adapter):
    """LoRA on a convolution (nn.Conv1d/2d/3d), laid out as peft lays it out:

        h = conv(x; W0) + scaling · (B ⋆ (A ⋆ dropout(x)) + b_B)   ⋆: convolution; b_B: lora_bias

        A: C_in -> r      the layer's kernel, stride and padding     weight (r, C_in, *kernel)
        B: r -> C_out     1 x 1, the layer's groups                  weight (C_out, r/groups, 1, ...)

    Two convolutions in a row with a 1 x 1 second one are one convolution, so with groups = 1

        ΔW[o, i, k] = scaling · Σ_j B[o, j] A[j, i, k]    i.e.  ΔW = scaling · (B A) reshaped,

    B and A flattened to (C_out, r) and (r, C_in·K), K = the kernel's size; ΔW has the conv weight's
    shape (C_out, C_in, *kernel) and merges. With groups = g > 1, B maps each block of r/g channels
    to its block of C_out/g outputs (a block-diagonal (C_out, r) matrix) but A reads all C_in
    channels, so ΔW is a dense (C_out, C_in, *kernel) kernel that the grouped weight
    (C_out, C_in/g, *kernel) cannot hold: like peft, this adapter then does not merge, and r must be
    a multiple of g. Trainable numbers: r·C_in·K + C_out·r/g (+ C_out for b_B).
    """

    conv_layers = CONV_LAYERS
    layer_types = "a convolution (nn.Conv1d, nn.Conv2d, nn.Conv3d)"

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.conv_layers)

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        check_conv_lora(base, config)
        c_in, c_out = layer_dims(base)
        shape = conv_shape(base)
        self.r, self.scaling, self.groups = config.r, config.scaling, shape.groups
        ones = (1,) * len(shape.kernel)
        self.lora_A = nn.Parameter(torch.empty(config.r, c_in, *shape.kernel))  # (r, C_in, *kernel)
        self.lora_B = nn.Parameter(torch.zeros(c_out, config.r // shape.groups, *ones))  # (C_out, r/g, 1..)
        _add_bias_on_B(self, base, c_out, config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / config.r)
        else:  # nn.Conv's default init, applied to A alone; B = 0, so ΔW = 0 at start
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if shape.groups > 1:  # instance attributes: only grouped layers refuse to merge
            self.mergeable = False
            self.unmergeable_reason = (f"its A reads all input channels, so ΔW is a dense kernel that a "
                                       f"conv with groups={shape.groups} cannot hold (peft refuses too)")

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        h = conv_with(base, x, self.lora_A, groups=1)  # (N, r, *out): A sees every input channel
        update = conv_with(base, h, self.lora_B, self.lora_B_bias, stride=1, padding=0)  # (N, C_out, *out)
        return (result + update * self.scaling).to(result.dtype)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(left (C_out, r), right (r, C_in·K)) with the dense update = left @ right; B's groups
        become a block-diagonal left factor."""
        blocks = self.lora_B.flatten(1).chunk(self.groups, dim=0)  # g blocks (C_out/g, r/g)
        return torch.block_diag(*blocks) * self.scaling, self.lora_A.flatten(1)

    def delta_weight(self, base: nn.Module) -> Tensor:
        if not self.mergeable:
            raise ConfigError(f"ConvLoRA has no merge on this layer: {self.unmergeable_reason}.")
        left, right = self.factors()
        return (left @ right).view_as(base.weight)  # (C_out, C_in, *kernel)

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        return None if self.lora_B_bias is None else self.lora_B_bias * self.scaling  # (C_out,)


def check_conv_lora(base: nn.Module, config: LoRAConfig) -> None:
    """The convolutions peft's LoRA computes exactly as its merge does; clear errors for the rest."""
    shape = conv_shape(base)
    if config.init not in ("kaiming", "gaussian"):
        raise ConfigError(f"{_init_name(config.init)} initialises linear layers only (peft's too). Expected "
                          "init='kaiming' or 'gaussian' for convolutions; try targets that name linear layers.")
    if any(d != 1 for d in base.dilation):
        raise ConfigError(
            f"LoRA on a {type(base).__name__} with dilation={base.dilation} is not supported: peft's "
            "A convolution ignores the dilation, so its output has another size (or, with padding="
            "'same', its merge computes something else). Expected dilation=1; try other targets."
        )
    if config.r % shape.groups:
        raise ConfigError(
            f"Rank r={config.r} is not a multiple of the layer's groups={shape.groups}: B is a grouped "
            f"1 x 1 convolution with r/groups inputs per group. Expected r divisible by {shape.groups}; "
            f"try r={max(shape.groups, config.r - config.r % shape.groups)}."
        )
    check_zero_padding(base, "LoRA")
    c_in, c_out = layer_dims(base)
    check_rank(config.r, c_in * shape.taps, c_out)  # ΔW as a matrix: (C_out, C_in·K)


# peft 0.21.2 adds out_proj's update to nn.MultiheadAttention twice (see MultiheadAttentionLoRA)
PEFT_OUT_PROJ_COPIES = 2


class MultiheadAttentionLoRA(Adapter):
    """LoRA on nn.MultiheadAttention (embedding width E), computed as peft 0.21.2 computes it.

    The layer has no linear sub-layer to wrap: its forward reads two weights directly, the packed
    projection in_proj_weight (3E x E: W_q, W_k, W_v stacked) and out_proj.weight (E x E). Each
    gets a LoRA pair, and the layer's own attention runs with the updated weights (through
    torch.func.functional_call, so nothing in the layer changes):

        W_in'  = W_in  + s · B_in A_in            A_in (r, E),  B_in (3E, r)
        W_out' = W_out + 2 s · B_out A_out        A_out (r, E), B_out (E, r)
        b_out' = b_out + s · b_B,out              with lora_bias (b_B,out: E)

        (h, attention) = MultiheadAttention(q, k, v, ...; W_in', b_in, W_out', b_out')

    One A_in serves q, k and v; B_in's row blocks 0:E, E:2E, 2E:3E give each its own update.
    Merging writes the same W_in', W_out' and b_out' into the layer. Trainable numbers:
    r·(E + 3E) + r·(E + E) = 6·r·E, + 3E + E with lora_bias.

    Where peft 0.21.2 differs from the plain equation, this follows peft, so its files give its
    outputs (the "2 s" above; peft PR #3774 reports it): it adds out_proj's ΔW twice, once with a
    gradient and once as a plain value (PEFT_OUT_PROJ_COPIES), and adds b_B,out as a value, so no
    gradient reaches b_B,out. in_proj's b_B (3E) is saved but never used, and dropout does not
    apply: the update is in the weights, not on an input. Like peft, it runs one adapter at a time.
    """

    layer_types = "an nn.MultiheadAttention (query, key and value of one width)"

    @classmethod
    def can_adapt(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        check_attention_lora(base, config)
        width = base.embed_dim
        # in_proj_weight is the weight of a linear map E -> 3E: LoRA sees it through a stand-in
        # of that shape on the meta device (no memory); out_proj is an nn.Linear already
        stand_in = nn.Linear(width, 3 * width, bias=base.in_proj_bias is not None, device="meta")
        self.in_proj = LoRA(stand_in, config)  # lora_A (r, E), lora_B (3E, r)
        self.out_proj = LoRA(base.out_proj, config)  # lora_A (r, E), lora_B (E, r)

    def updated_weights(self, base: nn.Module) -> dict[str, Tensor]:
        """{parameter name: its value with the update in}, the forward's W_in', W_out', b_out'."""
        w_in, w_out = base.in_proj_weight, base.out_proj.weight
        d_in = self.in_proj.delta_weight(base).to(w_in.dtype)  # (3E, E)
        d_out = self.out_proj.delta_weight(base.out_proj).to(w_out.dtype)  # (E, E)
        w_out = w_out + d_out  # the copy the gradient flows through
        for _ in range(PEFT_OUT_PROJ_COPIES - 1):  # peft's extra copies: in the value only
            w_out = w_out + d_out.detach()
        weights = {"in_proj_weight": w_in + d_in, "out_proj.weight": w_out}
        d_bias = self.out_proj.delta_bias(base.out_proj)
        if d_bias is not None:  # peft adds it outside autograd: no gradient reaches b_B,out
            weights["out_proj.bias"] = base.out_proj.bias + d_bias.detach().to(base.out_proj.bias.dtype)
        return weights

    def layer_forward(self, x: Tensor, base: nn.Module, *args, **kwargs) -> tuple[Tensor, Tensor | None]:
        return functional_call(base, self.updated_weights(base), (x, *args), kwargs)  # x: the query

    def forward(self, x: Tensor, base: nn.Module, result: Tensor) -> Tensor:
        raise ConfigError(
            "LoRA on an nn.MultiheadAttention changes the weights the layer computes with, so it runs "
            "one adapter at a time (as in peft); another adapter is active before it on this layer. "
            "Expected one active adapter; try peftlab.set_adapter(model, name)."
        )

    @torch.no_grad()
    def merge_into(self, base: nn.Module, sign: int) -> None:
        """W_in += sign · ΔW_in, W_out += sign · ΔW_out (twice, as peft), b_out += sign · s b_B,out."""
        base.in_proj_weight.data += sign * self.in_proj.delta_weight(base).to(base.in_proj_weight.dtype)
        d_out = self.out_proj.delta_weight(base.out_proj).to(base.out_proj.weight.dtype)
        for _ in range(PEFT_OUT_PROJ_COPIES):
            base.out_proj.weight.data += sign * d_out
        d_bias = self.out_proj.delta_bias(base.out_proj)
        if d_bias is not None:
            base.out_proj.bias.data += sign * d_bias.to(base.out_proj.bias.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        raise ConfigError(
            "LoRA on an nn.MultiheadAttention changes two weights, not one: in_proj_weight (ΔW = "
            "adapter.in_proj.delta_weight(None)) and out_proj.weight (2 x adapter.out_proj.delta_weight"
            "(None), as peft 0.21.2 adds it). Expected a linear layer here; use those two instead."
        )

    def peft_names(self) -> dict[str, str]:
        """{our parameter: peft's in-memory name template}: peft keeps in_proj's pair on the layer
        itself and out_proj's on the LoRA layer that wraps out_proj, inside the layer."""
        names = {}
        for part, where in (("in_proj", ""), ("out_proj", "base_layer.out_proj.")):
            names[f"{part}.lora_A"] = where + "lora_A.{name}.weight"
            names[f"{part}.lora_B"] = where + "lora_B.{name}.weight"
            if getattr(self, part).lora_B_bias is not None:
                names[f"{part}.lora_B_bias"] = where + "lora_B.{name}.bias"
        return names


def check_attention_lora(base: nn.Module, config: LoRAConfig) -> None:
    """The nn.MultiheadAttention layers peft's LoRA runs; clear errors for the rest."""
    if not base._qkv_same_embed_dim:
        raise ConfigError(
            f"LoRA on an nn.MultiheadAttention with kdim={base.kdim}, vdim={base.vdim} (embed_dim="
            f"{base.embed_dim}) is not supported: its q, k, v projections are separate weights, which "
            "peft does not adapt either. Expected kdim = vdim = embed_dim; try other targets."
        )
    if config.init not in ("kaiming", "gaussian"):
        raise ConfigError(f"{_init_name(config.init)} initialises linear layers only. Expected init='kaiming' "
                          "or 'gaussian' for nn.MultiheadAttention; try targets that name linear layers.")
    if config.lora_bias and base.out_proj.bias is None:
        raise ConfigError(
            "lora_bias=True on an nn.MultiheadAttention built with bias=False is not supported: the "
            "update adds b_B to out_proj's bias, which this layer lacks (peft's forward fails on it). "
            "Expected a layer with bias=True; try lora_bias=False."
        )


def _init_name(init: str) -> str:
    return "LoftQ" if init == "loftq" else f"LoRA init={init!r}"


def _add_bias_on_B(adapter: Adapter, base: nn.Module, d_out: int, config: LoRAConfig) -> None:
    """Register B's bias b_B (d_out zeros) with lora_bias, else None. Merging adds s b_B to the base
    layer's bias, so a base without one cannot merge (peft refuses to merge it too)."""
    adapter.register_parameter("lora_B_bias", nn.Parameter(torch.zeros(d_out)) if config.lora_bias else None)
    if config.lora_bias and getattr(base, "bias", None) is None:
        adapter.mergeable = False
        adapter.unmergeable_reason = ("its lora_bias adds b_B to the base layer's bias, and this layer has "
                                      "none (peft refuses to merge it too)")


def lora_parameter_count(d_in: int, d_out: int, config: LoRAConfig, conv: ConvShape | None = None) -> int:
    """r (d_in + d_out) per layer; on a convolution r·C_in·K + C_out·r/groups (A and B above);
    + d_out for B's bias with lora_bias."""
    bias = d_out if config.lora_bias else 0
    if conv is None:
        return config.r * (d_in + d_out) + bias
    return config.r * d_in * conv.taps + d_out * config.r // conv.groups + bias
