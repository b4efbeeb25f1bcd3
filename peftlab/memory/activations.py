"""The activations of one training step in closed form: what each block keeps for backward.

**Activations of a Llama decoder block**, N = batch · seq_len tokens, h hidden size, k the key /
value width (n_kv_heads · head_dim), i the MLP width, r the rank, e bytes per activation value
(4 fp32, 2 bf16), a bytes per adapter value (peftlab's adapters are fp32), n_h heads, T tokens
per sequence, S = B·n_h·T² attention scores:

    RMSNorm (x2)            N·h·4 + N·4         (it up-casts to fp32 and keeps x and 1/rms;
                            a trained norm weight also x/rms, N·h·e)
    attention, SDPA         2·N·h·e + 2·N·k·e + N·n_h·4    (q, out, k, v, logsumexp)
    attention, eager        3·N·h·e + S·4 [+ S·e if e ≠ 4]  (q, k and v repeated to h wide, the
                            fp32 softmax output and its down-cast); "math" SDPA is the same
    MLP (SwiGLU)            3·N·i·e              (gate, up, silu(gate))
    each LoRA layer         N·r·a (x Aᵀ) + its input x: when a = e the input is a tensor the
                            model keeps anyway, shared by q/k/v and by gate/up (norm outputs
                            N·h·e each, silu(gate)·up N·i·e; o_proj's is SDPA's output, kept
                            already, but a fresh N·h·e after eager attention); when a ≠ e each
                            layer keeps its own up-cast copy, N·d_in·a
    LoRA with dropout       its own dropout(x), N·d_in·a, and the mask: on the CPU a noise
                            tensor as wide (N·d_in·a), on CUDA one byte per value; x itself is no
                            longer kept for it
    DoRA, each layer        + 2·N·d_out·a: W0 x and B A x, kept for the magnitude's gradient

The first block is cheaper when the embeddings are frozen: its input needs no gradient, so its
input norm keeps nothing, dropout there keeps no mask, and eager attention keeps q only if k
needs a gradient (q·kᵀ), k only if q does, and so on: each matmul keeps an operand only for the
other operand's gradient. The same rule drops terms in any block when nothing upstream trains.

**The fused backend** (``backend="fused"``, peftlab/production/fused/) keeps less: each RMSNorm
N·h·e + N·4 (x as it came, not up-cast); the SwiGLU MLP 2·N·i·e (gate and up; silu(gate) and the
product, the down_proj LoRA's input, are recomputed), unless down_proj has DoRA or dropout; every
LoRA layer's input in the compute dtype, so shared as above even when a ≠ e (with dropout: its
dropout(x) in the compute dtype, N·d_in·e, and mask); DoRA + N·d_out·e (z = W0 x + s B A x); and
the loss keeps d(hidden), N·h·e, instead of the N·V·4 log-probabilities, with one chunk of logits
(~8M values) as its temporaries.

Outside the blocks: the final norm (as above), RoPE's cos and sin (2·T·head_dim·e), and the loss:
``log_softmax`` keeps its fp32 output, N·V·4 bytes, and the targets N·8; the logits' gradient
(two fp32 N·V buffers at the head of backward) is the ``temporaries`` line. Full fine-tuning adds
the head's input (N·h·e) and the embedding's token ids (N·8). With gradient checkpointing, a block
keeps only its input (N·h·e), so activations = L·N·h·e + the rest; one block at a time is
recomputed during backward, after the loss's buffers are freed, and counts as a temporary.

**BERT** blocks (post-LayerNorm, GELU): LayerNorm (x2) N·h·e + 2·N·4 (input, mean, 1/std);
attention as above with k = h (CPU SDPA has no kernel for attention dropout in training, so with
``attention_probs_dropout_prob`` > 0 it runs the eager way, plus the dropout mask and the dropped
probabilities, S·e each); MLP N·i·e (GELU's input); LoRA as above (intermediate.dense reads the
first LayerNorm's output, output.dense the GELU output: N·h·e and N·i·e of their own); two
hidden-dropout masks per block (N·h·e each on the CPU, N·h bytes on CUDA); after the blocks the
pooler's tanh output and the classifier's input (B·h·e each, and a dropout mask between them).
**Soft prompts.** An input prompt (prompt tuning, P-tuning) puts n virtual tokens before every
input: the whole model runs on T + n positions (logits included) and the first block's input
needs a gradient. A prefix (prefix tuning) gives every attention n trained keys and values: SDPA
then gets an explicit (B, 1, T, n + T) mask (kept, B·T·(n+T)·e) and k, v repeated to h wide over
n + T positions.

**Other methods.** Each adapted layer reports what it keeps for backward (its adapter's
``saved_activations``, peftlab/methods/base.py), besides its input x (shared as above): LoRA,
LoftQ, AdaLoRA N·r·a (x Aᵀ; AdaLoRA at its starting rank); VeRA N·(r + d_out)·a and not x (its A
is frozen); LoHa two Hadamard factors, 2·d_out·d_in·a, and LoKr none, plus for both a
materialised ΔW (d_out·d_in·a) wherever x needs a gradient; BitFit nothing (not even x). IA3 and
soft prompts are as above; an adapter that reports nothing is counted as LoRA of its ``r``. The
registry entry of a method names the architectures this formula covers for it
(``Method.activation_formula``); OFT, BOFT, bottleneck adapters, LLaMA-Adapter and X-LoRA name
none (OFT's rotation series, LLaMA-Adapter's gated prompts, X-LoRA's classifier), so their
activations, like every architecture's outside ``FORMULA_ARCHITECTURES``, are traced on the meta
device (peftlab/memory/traced.py).

References: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (https://arxiv.org/abs/2205.05198, per-layer activation arithmetic); Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost" (https://arxiv.org/abs/1604.06174, checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.inject import AdaptedLayer, Adapter
from peftlab.memory.ledger import is_bert, is_causal
from peftlab.methods import FORMULA_ARCHITECTURES, METHODS
from peftlab.methods.base import LayerActivations, PromptPositions, SavedActivations, low_rank_activations

# The methods whose activations the formula models on some architecture (their registry entries'
# ``activation_formula``), and full fine-tuning (None or "full"); every other pair is traced
# (peftlab.memory.traced.traced_activation_bytes).
FORMULA_METHODS = frozenset({None, "full", *(name for name, spec in METHODS.items()
                                             if spec.activation_formula)})


def formula_models(config, method: str | None) -> bool:
    """Whether the closed-form ledger covers this architecture and method: full fine-tuning on
    ``FORMULA_ARCHITECTURES``, a method on the architectures its registry entry names (a prefix
    on Llama-style models only: BERT's explicit-mask attention path is not the one its terms
    describe)."""
    model_type = getattr(config, "model_type", None)
    if method in (None, "full"):
        return model_type in FORMULA_ARCHITECTURES
    spec = METHODS.get(method)
    return spec is not None and model_type in spec.activation_formula


@dataclass
class Fusion:
    """What ``backend="fused"`` replaces in a model (peftlab.production.fused decides the same
    way): the SwiGLU MLPs, the RMSNorms, the loss."""

    swiglu: bool  # Llama-style MLPs: silu(gate) and the product recomputed in backward
    rms_norm: bool  # Llama-style RMSNorms: x and one float per row kept
    loss: bool  # the chunked cross-entropy: no logits kept


def fusion_of(model: nn.Module) -> Fusion:
    """What the fused backend would replace in ``model``."""
    from peftlab.production.fused import is_rms_norm, is_swiglu_mlp, loss_can_fuse

    modules = list(model.modules())
    return Fusion(swiglu=any(is_swiglu_mlp(m) for m in modules),
                  rms_norm=any(is_rms_norm(m) for m in modules), loss=loss_can_fuse(model))


@dataclass(frozen=True)
class StepShape:
    """The numbers of the formula (module docstring), from the model's config and the step."""

    n: int  # N = batch · seq_len tokens
    t: int  # T, positions per sequence
    b: int  # B, sequences
    e: int  # bytes per activation value
    a: int  # bytes per adapter value (e for full fine-tuning)
    h: int  # hidden size
    heads: int  # n_h
    head_dim: int
    kv: int  # k, the key / value width (h for BERT)
    inter: int  # i, the MLP width
    layers: int
    llama: bool  # a Llama-style decoder (else BERT-style)
    qkv: tuple[str, str, str]  # the block's linears by short name: q, k, v
    out: str  # attention's output projection
    ups: tuple[str, ...]  # the MLP's input projections (gate, up; BERT's intermediate.dense)
    down: str  # the MLP's output projection
    hidden_p: float  # BERT's hidden dropout
    attn_p: float  # attention dropout
    math_attention: bool  # attention runs matmul-softmax-(dropout)-matmul through autograd
    cuda: bool  # dropout masks are one byte per value (a noise tensor on the CPU)
    fusion: Fusion | None  # what the fused backend replaces; None: the reference path
    full: bool  # full fine-tuning
    trained_input: bool  # the first block's input needs a gradient (an input soft prompt)
    prefix: int  # trained keys and values every attention reads first (prefix tuning)
    padded: bool  # the batch has an attention mask with zeros

    @property
    def fused(self) -> bool:
        return self.fusion is not None

    def mask(self, value_bytes: int) -> int:
        """Bytes per value of a dropout mask."""
        return 1 if self.cuda else value_bytes

    def width(self, name: str) -> tuple[int, int]:
        """(input, output) width of a block's linear layer, by short name."""
        h, kv, inter = self.h, self.kv, self.inter
        widths = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
                  "query": (h, h), "key": (h, h), "value": (h, h), "dense": (h, h),
                  "intermediate.dense": (h, inter), "output.dense": (inter, h)}
        return widths.get(name, (h, h))

    def rms_norm(self) -> int:
        """A Llama RMSNorm: x (fp32 unless fused) and 1/rms; a trained weight also x/rms (in e)."""
        fused_norm = self.fused and self.fusion.rms_norm
        trained_weight = self.n * self.h * self.e if self.full else 0
        return self.n * self.h * (self.e if fused_norm else 4) + self.n * 4 + trained_weight


def step_shape(config, batch: int, seq_len: int, dtype: torch.dtype, adapter_dtype: torch.dtype,
               attn: str, full: bool, fusion: Fusion | None, cuda: bool, trained_input: bool,
               prefix: int, padded: bool) -> StepShape:
    """The formula's numbers for one step of a model with ``config`` (see activation_bytes)."""
    e = torch.empty((), dtype=dtype).element_size()
    h, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    llama = not is_bert(config)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim if llama else h
    if llama:
        qkv, out, ups, down = ("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_proj", "up_proj"), "down_proj"
    else:
        qkv, out, ups, down = ("query", "key", "value"), "dense", ("intermediate.dense",), "output.dense"
    attn_p = float(getattr(config, "attention_dropout" if llama else "attention_probs_dropout_prob",
                           0.0) or 0.0)
    return StepShape(
        n=batch * seq_len, t=seq_len, b=batch, e=e,
        a=torch.empty((), dtype=adapter_dtype).element_size() if not full else e,
        h=h, heads=heads, head_dim=head_dim, kv=kv, inter=int(config.intermediate_size),
        layers=int(config.num_hidden_layers), llama=llama, qkv=qkv, out=out, ups=ups, down=down,
        hidden_p=0.0 if llama else float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0),
        attn_p=attn_p,
        # eager attention, or SDPA with dropout on the CPU (it has no fused kernel for that), runs
        # matmul-softmax-(dropout)-matmul through autograd; otherwise one fused SDPA kernel
        math_attention=attn == "eager" or (attn_p > 0 and not cuda),
        cuda=cuda, fusion=fusion, full=full, trained_input=trained_input, prefix=prefix, padded=padded)


def activation_bytes(config, model: nn.Module, batch: int, seq_len: int, dtype: torch.dtype,
                     adapter_dtype: torch.dtype, checkpointing: bool, attn: str,
                     full: bool, fusion: Fusion | None = None, cuda: bool = False,
                     trained_input: bool = False, prefix: int = 0,
                     padded: bool = False) -> tuple[int, dict[str, int]]:
    """The per-block formula of the module docstring; returns (total, {term: bytes}).
    ``fusion``: what the fused backend replaces (None: the reference path); ``cuda``: dropout
    keeps a one-byte mask there, a noise tensor of the input's dtype on the CPU;
    ``trained_input``: the first block's input needs a gradient (an input soft prompt);
    ``prefix``: trained keys and values every attention layer reads first (prefix tuning);
    ``padded``: the batch has an attention mask with zeros."""
    s = step_shape(config, batch, seq_len, dtype, adapter_dtype, attn, full, fusion, cuda,
                   trained_input, prefix, padded)
    # {short name: adapter} of layer 0's adapted linears; full fine-tuning: every linear
    # "adapted" (None), its weight's gradient needing x and nothing more
    adapters = dict.fromkeys(block_linears(model)) if full else first_block_adapters(model)
    terms = block_terms(s, adapters, first=False)
    per_block = {"block": sum(terms.values())}
    if checkpointing:  # each block keeps its input; one block is recomputed at a time, in
        per_block["checkpoint_inputs"] = s.layers * s.n * s.h * s.e  # backward (a temporary, see above)
        per_block["recomputed_block"] = per_block["block"]
        total = per_block["checkpoint_inputs"]
    else:
        per_block["first_block"] = sum(block_terms(s, adapters, first=True).values())
        total = per_block["first_block"] + (s.layers - 1) * per_block["block"]
    rest = outside_terms(s, config, model)
    total += sum(rest.values())
    return total, {**{f"per_block.{k}": v for k, v in terms.items()}, **per_block, **rest,
                   "blocks": s.layers}


def saved_by(adapter: nn.Module | None, layer: LayerActivations) -> SavedActivations:
    """What an adapted layer saves, as its adapter reports it (``saved_activations``,
    peftlab/methods/base.py); one that does not report is counted as LoRA of its ``r``; None
    (full fine-tuning) keeps x for its weight's gradient and nothing more."""
    if adapter is None:
        return SavedActivations()
    report = getattr(adapter, "saved_activations", None)
    if report is None:
        rank = int(getattr(adapter, "r", 0) or 0)
        return low_rank_activations(layer, rank, getattr(adapter, "dropout", None))
    return report(layer)


def block_terms(s: StepShape, adapters: dict[str, nn.Module | None], first: bool) -> dict[str, int]:
    """{term: bytes} one block keeps; ``first``: the first block, whose input needs no gradient
    when the embeddings are frozen (only what the adapted layers make trainable does)."""
    grad_in = s.full or s.trained_input or not first
    saved = {k: saved_by(ad, LayerActivations(
        tokens=s.n, d_in=s.width(k)[0], d_out=s.width(k)[1], adapter_bytes=s.a, compute_bytes=s.e,
        input_grad=k not in s.qkv or grad_in, fused=s.fused)) for k, ad in adapters.items()}
    qg, kg, vg = (grad_in or k in saved or (s.prefix > 0 and k != s.qkv[0]) for k in s.qkv)
    mid_grad = qg or kg or vg or s.out in saved  # the residual after attention
    mlp_grad = mid_grad or bool(saved.keys() & {*s.ups, s.down})
    # the fused MLP runs when down_proj is frozen or carries LoRA without dropout
    down = saved.get(s.down)
    swiglu = s.fused and s.fusion.swiglu and not (down is not None and (down.dropout or down.outputs > 0))
    terms: dict[str, int] = {}
    if s.llama:
        terms["norms"] = s.rms_norm() * (int(grad_in) + int(mid_grad))
    else:  # post-LayerNorm: input, mean and 1/std
        terms["norms"] = (s.n * s.h * s.e + 2 * s.n * 4) * (int(mid_grad) + int(mlp_grad))
    terms["attention"] = attention_bytes(s, qg, kg, vg)
    terms.update(mlp_terms(s, mid_grad, mlp_grad, saved.keys(), swiglu))
    att_kept = terms["attention"] > 0 and not s.math_attention
    terms["adapter_inputs"] = adapter_input_bytes(s, saved, grad_in, att_kept, swiglu)
    terms["adapter_tensors"] = sum(report.own for report in saved.values())
    if any(report.outputs for report in saved.values()):  # DoRA's W0 x and B A x, fused z
        terms["dora_outputs"] = sum(report.outputs for report in saved.values())
    return terms


def attention_bytes(s: StepShape, qg: bool, kg: bool, vg: bool) -> int:
    """What attention keeps when q, k, v need gradients as flagged."""
    n, h, e, b, t = s.n, s.h, s.e, s.b, s.t
    if not (qg or kg or vg):
        return 0
    if s.prefix or (s.padded and s.llama):  # an explicit mask (B, 1, T, P + T) goes in, and with it
        # k and v repeated to h wide over P + T positions (no grouped-query shortcut with a mask)
        return 2 * n * h * e + 2 * b * (s.prefix + t) * h * e + b * t * (s.prefix + t) * e + n * s.heads * 4
    if not s.math_attention:  # q, out, k, v and the logsumexp
        return 2 * n * h * e + 2 * n * s.kv * e + n * s.heads * 4
    scores, probs_grad = b * s.heads * t * t, qg or kg
    # q·kᵀ keeps q for dk and k for dq; probs·v keeps v for d(probs), probs for dv (k and v
    # repeated to h wide in Llama)
    total = n * h * e * (int(kg) + int(qg) + int(probs_grad))
    soft = 4 if s.llama else e  # Llama's eager softmax runs in fp32
    if probs_grad:
        total += scores * soft  # softmax keeps its output
    if s.attn_p > 0:
        total += (scores * s.mask(e) if probs_grad else 0) + (scores * e if vg else 0)
    elif vg and (soft != e or not probs_grad):
        total += scores * e  # the probabilities as probs·v reads them
    return total


def mlp_terms(s: StepShape, mid_grad: bool, mlp_grad: bool, adapted, swiglu: bool) -> dict[str, int]:
    """The MLP's own tensors (and BERT's hidden-dropout masks), given which gradients flow."""
    n, e, inter = s.n, s.e, s.inter
    if s.llama:
        g_grad, u_grad = mid_grad or s.ups[0] in adapted, mid_grad or s.ups[1] in adapted
        if swiglu:
            return {"mlp": 2 * n * inter * e if (g_grad or u_grad or s.down in adapted) else 0}
        # silu keeps gate; the product keeps silu(gate) and up
        return {"mlp": n * inter * e * (2 * int(g_grad) + int(u_grad))}
    terms = {"mlp": n * inter * e if mid_grad or s.ups[0] in adapted else 0}  # GELU's input
    if s.hidden_p > 0:  # after attention.output.dense and output.dense
        terms["dropout_masks"] = n * s.h * s.mask(e) * (int(mid_grad) + int(mlp_grad))
    return terms


def adapter_input_bytes(s: StepShape, saved: dict[str, SavedActivations], qkv_grad: bool,
                        att_kept: bool, swiglu: bool) -> int:
    """Bytes the adapted layers add by keeping their inputs."""
    n, h, e = s.n, s.h, s.e
    # a layer with dropout keeps its own dropout(x) (the fused path in the compute dtype)
    # and the dropout mask (none where x needs no gradient); x itself is no longer needed
    kept = e if s.fused else s.a
    total = sum(n * s.width(k)[0] * (kept + (s.mask(kept) if k not in s.qkv or qkv_grad else 0))
                for k, report in saved.items() if report.dropout)
    plain = {k for k, report in saved.items() if report.keeps_input and not report.dropout}
    if s.a != e and not s.fused:  # the reference up-casts x: each layer keeps its own copy
        return total + sum(n * s.width(k)[0] * s.a for k in plain)
    # otherwise a layer's input is a tensor shared by the layers reading it
    if plain & set(s.qkv):
        total += n * h * e  # the block's (normed) input
    if s.out in plain and not att_kept:
        total += n * h * e  # the attention output (a fused SDPA kernel keeps it anyway)
    if plain & set(s.ups):
        total += n * h * e  # the second norm's output
    if s.down in plain and not swiglu:
        total += n * s.inter * e  # silu(gate) * up, or GELU's output (the fused MLP recomputes it)
    return total


def outside_terms(s: StepShape, config, model: nn.Module) -> dict[str, int]:
    """What the model keeps outside its blocks: final norm, RoPE, loss; BERT's pooler and head."""
    n, h, e, b = s.n, s.h, s.e, s.b
    rest: dict[str, int] = {}
    if s.llama:
        rest["final_norm"] = s.rms_norm()
        rest["rope"] = 2 * s.t * s.head_dim * e
        if s.full:  # the trained head keeps its input, the trained embeddings their token ids
            rest["head_and_embedding_inputs"] = n * h * e + n * 8
    elif s.full:  # trained embeddings: their LayerNorm and dropout
        rest["embeddings"] = n * h * e + 2 * n * 4 + (n * h * s.mask(e) if s.hidden_p > 0 else 0)
    if is_causal(config):
        if s.fused and s.fusion.loss:  # the chunked loss keeps d(hidden) only
            rest["loss_hidden_grad"] = n * h * e
        else:
            rest["log_softmax"] = n * int(config.vocab_size) * 4
        rest["targets"] = n * 8
    else:  # tanh's output, the trained classifier's input, and dropout between them
        rest["pooler_and_head"] = 2 * b * h * e + (b * h * s.mask(e) if s.hidden_p > 0 else 0)
        if s.full or pooler_adapted(model):  # a trained pooler keeps the last hidden states
            rest["pooler_input"] = n * h * e  # (its input, the first token's, is a view of them)
    return rest


# --------------------------------------------------------------------------------------------
# Where things are in a model
# --------------------------------------------------------------------------------------------
def block_prefix(model: nn.Module) -> str | None:
    """The module path of the first block, with a trailing dot ('model.layers.0.'); None if none."""
    for name, _ in model.named_modules():
        for marker in (".layers.0.", ".layer.0."):
            padded = name + "."
            if marker in padded:
                return padded[: padded.index(marker) + len(marker)]
    return None


def block_linears(model: nn.Module) -> list[str]:
    """Short names of the first block's nn.Linear layers."""
    prefix = block_prefix(model)
    if prefix is None:
        return []
    names = []
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, nn.Linear):
            names.append(short_name(name[len(prefix):]))
    return names


def first_block_adapters(model: nn.Module) -> dict[str, nn.Module]:
    """{short layer name: its (first) adapter} for the adapted linears of the first block."""
    prefix = block_prefix(model)
    out: dict[str, nn.Module] = {}
    if prefix is None:
        return out
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, AdaptedLayer) and module.adapters:
            out[short_name(name[len(prefix):])] = next(iter(module.adapters.values()))
    return out


def soft_prompt_positions(model: nn.Module) -> PromptPositions:
    """The positions the model's soft prompt adds (its ``prompt_positions``); none if none."""
    for module in model.modules():
        report = getattr(module, "prompt_positions", None) if isinstance(module, Adapter) else None
        if report is not None:
            return report()
    return PromptPositions()


def pooler_adapted(model: nn.Module) -> bool:
    """Whether a BERT pooler's dense layer carries an adapter (it then keeps its input)."""
    return any(name.endswith("pooler.dense") and isinstance(module, AdaptedLayer)
               for name, module in model.named_modules())


def short_name(relative: str) -> str:
    """'self_attn.q_proj' -> 'q_proj'; BERT's 'attention.output.dense' -> 'dense', keeping the
    two MLP denses apart ('intermediate.dense', 'output.dense')."""
    parts = relative.split(".")
    if parts[-1] == "dense" and len(parts) >= 2 and parts[0] in ("intermediate", "output"):
        return f"{parts[0]}.dense"
    return parts[-1]
