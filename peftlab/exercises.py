"""Exercises with checkers, for the course notebooks.

A learner writes a function; ``check(name, their_function)`` runs it and the reference on several
seeded random inputs and says precisely what is wrong: the wrong shape, the wrong dtype, an
exception, or how far the values are off and for which input. Nothing is printed but the verdict.

    from peftlab import exercises

    def lora_forward(x, W, A, B, alpha, r):
        return x @ W.T + (alpha / r) * (x @ A.T) @ B.T

    exercises.check("lora_forward", lora_forward)   # -> "✓ lora_forward: correct on 5 random cases"
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from peftlab.errors import UnknownNameError, closest


@dataclass(frozen=True)
class Exercise:
    name: str
    task: str  # what the learner must write, shown by describe()
    reference: Callable
    make_inputs: Callable[[torch.Generator], dict]  # seeded random arguments
    hint: str  # shown when the answer is wrong: a direction, never the answer's code
    atol: float = 1e-5
    forbid_ops: tuple[str, ...] = ()  # torch functions the idea excludes, by name ("kron")
    forbid_names: tuple[str, ...] = ()  # names the answer may not read (peftlab's own constants)
    dense: Callable[[dict], tuple[int, int, int]] | None = None  # (d_out, d_in, r): no d_out x d_in
    # matrix may be built from the factors, and no SVD of anything larger than r x r


def _lora_inputs(g: torch.Generator) -> dict:
    d_in, d_out, r = (int(torch.randint(4, 24, (1,), generator=g)) for _ in range(3))
    r = max(1, min(r, d_in - 1, d_out - 1))  # below both sizes: a (d_out, d_in) product is ΔW
    return {
        "x": torch.randn(3, d_in, generator=g),
        "W": torch.randn(d_out, d_in, generator=g),
        "A": torch.randn(r, d_in, generator=g),
        "B": torch.randn(d_out, r, generator=g),
        "alpha": float(torch.randint(1, 32, (1,), generator=g)),
        "r": r,
    }


def _lora_forward(x: Tensor, W: Tensor, A: Tensor, B: Tensor, alpha: float, r: int) -> Tensor:
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T


def _lora_delta(x: Tensor, W: Tensor, A: Tensor, B: Tensor, alpha: float, r: int) -> Tensor:
    return (alpha / r) * B @ A


def _count_inputs(g: torch.Generator) -> dict:
    return {k: int(torch.randint(1, 4096, (1,), generator=g)) for k in ("d_in", "d_out")} | {
        "r": int(torch.randint(1, 65, (1,), generator=g))
    }


def _absmax_inputs(g: torch.Generator) -> dict:
    return {"w": torch.randn(int(torch.randint(1, 5, (1,), generator=g)) * 64, generator=g), "blocksize": 64}


def _absmax_quantize(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    from peftlab.quant.nf4 import NF4_CODE

    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax[:, None]
    codes = (scaled[..., None] - NF4_CODE).abs().argmin(dim=-1)
    return codes.reshape(-1).to(torch.uint8), absmax


def _target_shapes_inputs(g: torch.Generator) -> dict:
    n = int(torch.randint(1, 15, (1,), generator=g))
    shapes = [tuple(int(v) for v in torch.randint(1, 1025, (2,), generator=g)) for _ in range(n)]
    return {"shapes": shapes, "r": int(torch.randint(1, 65, (1,), generator=g))}


def _ddp_batch_inputs(g: torch.Generator) -> dict:
    return {k: int(torch.randint(1, 17, (1,), generator=g)) for k in ("batch_size", "grad_accum", "num_processes")}


_SCRIPT_NAMES = ("train_lora.py", "train_dora.py", "finetune.py", "run_qlora.py")


def _launch_inputs(g: torch.Generator) -> dict:
    return {"script": _SCRIPT_NAMES[int(torch.randint(0, len(_SCRIPT_NAMES), (1,), generator=g))],
            "num_processes": int(torch.randint(1, 4, (1,), generator=g)),
            "on_cpu": bool(torch.randint(0, 2, (1,), generator=g))}


def _launch_command(script: str, num_processes: int, on_cpu: bool) -> str:
    if num_processes == 1:
        return f"python {script}"
    prefix = "ACCELERATE_USE_CPU=1 " if on_cpu else ""  # `--cpu` alone would start one process
    return f"{prefix}accelerate launch --multi_gpu --num_processes {num_processes} {script}"

# lessons 06, 07, 09: OFT's Cayley transform and block rotation, IA3 merging, BitFit counting,
# a Houlsby adapter and LLaMA-Adapter's gated prompt attention
def _cayley_inputs(g: torch.Generator) -> dict:
    b = int(torch.randint(2, 9, (1,), generator=g))
    return {"params": 0.5 * torch.randn(b * (b - 1) // 2, generator=g, dtype=torch.float64), "b": b}


def _cayley_rotation(params: Tensor, b: int) -> Tensor:
    rows, cols = torch.triu_indices(b, b, offset=1)
    upper = params.new_zeros(b, b)
    upper[rows, cols] = params
    Q = upper - upper.T  # skew-symmetric
    eye = torch.eye(b, dtype=params.dtype)
    return (eye - Q) @ torch.linalg.inv(eye + Q)


def _oft_block_inputs(g: torch.Generator) -> dict:
    n, b, d_out = (int(torch.randint(1, 5, (1,), generator=g)) + extra for extra in (0, 1, 1))
    return {"x": torch.randn(3, n * b, generator=g), "W0": torch.randn(d_out, n * b, generator=g),
            "blocks": torch.linalg.qr(torch.randn(n, b, b, generator=g)).Q}


def _ia3_inputs(g: torch.Generator) -> dict:
    d_in, d_out = (int(torch.randint(2, 12, (1,), generator=g)) for _ in range(2))
    feedforward = bool(torch.randint(0, 2, (1,), generator=g))
    return {"W": torch.randn(d_out, d_in, generator=g), "b": torch.randn(d_out, generator=g),
            "l": 1 + 0.3 * torch.randn(d_in if feedforward else d_out, generator=g), "feedforward": feedforward}


def _ia3_merged_weight(W: Tensor, b: Tensor, l: Tensor, feedforward: bool) -> tuple[Tensor, Tensor]:
    if feedforward:  # h = W (l ⊙ x) + b: l scales W's columns, the bias stays
        return W * l, b
    return l[:, None] * W, l * b  # h = l ⊙ (W x + b): l scales W's rows and the bias


def _bert_size_inputs(g: torch.Generator) -> dict:
    return {"n_layers": int(torch.randint(1, 25, (1,), generator=g)),
            "d": 32 * int(torch.randint(1, 33, (1,), generator=g)),
            "d_ff": 128 * int(torch.randint(1, 33, (1,), generator=g))}


def _houlsby_inputs(g: torch.Generator) -> dict:
    d, r = int(torch.randint(4, 24, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
    return {"h": torch.randn(3, d, generator=g), "W_down": torch.randn(r, d, generator=g),
            "b_down": torch.randn(r, generator=g), "W_up": torch.randn(d, r, generator=g),
            "b_up": torch.randn(d, generator=g), "s": float(torch.randint(1, 5, (1,), generator=g))}


def _houlsby_forward(h: Tensor, W_down: Tensor, b_down: Tensor, W_up: Tensor, b_up: Tensor, s: float) -> Tensor:
    return h + s * (torch.relu(h @ W_down.T + b_down) @ W_up.T + b_up)


def _prompt_attention_inputs(g: torch.Generator) -> dict:
    T, K, d = (int(torch.randint(2, 12, (1,), generator=g)) for _ in range(3))
    return {"q": torch.randn(T, d, generator=g), "k_p": torch.randn(K, d, generator=g),
            "v_p": torch.randn(K, d, generator=g), "gate": float(torch.randn(1, generator=g))}


def _prompt_attention(q: Tensor, k_p: Tensor, v_p: Tensor, gate: float) -> Tensor:
    return gate * torch.softmax(q @ k_p.T / math.sqrt(q.shape[-1]), dim=-1) @ v_p


# lessons 02, 10, 12: singular values from LoRA's factors, subspace similarity, AdaLoRA's budget
# schedule and importance EMAs, one LoftQ round
def _factors_inputs(g: torch.Generator) -> dict:
    d_in, d_out = (int(torch.randint(6, 30, (1,), generator=g)) for _ in range(2))
    r = int(torch.randint(1, 6, (1,), generator=g))
    return {"A": torch.randn(r, d_in, generator=g, dtype=torch.float64),
            "B": torch.randn(d_out, r, generator=g, dtype=torch.float64),
            "scaling": float(torch.randint(1, 9, (1,), generator=g)) / 4}


def _lora_singular_values(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    from peftlab.spectra import factored_svdvals

    return factored_svdvals(scaling * B, A)


def _phi_inputs(g: torch.Generator) -> dict:
    d, r1, r2 = int(torch.randint(16, 40, (1,), generator=g)), 4, 12
    shared = torch.randn(2, d, generator=g, dtype=torch.float64)  # two directions both runs found
    A1 = torch.cat([shared, torch.randn(r1 - 2, d, generator=g, dtype=torch.float64)]) * 3
    A2 = torch.cat([shared, torch.randn(r2 - 2, d, generator=g, dtype=torch.float64)])
    return {"A1": A1, "A2": A2, "i": int(torch.randint(1, r1 + 1, (1,), generator=g)),
            "j": int(torch.randint(1, r2 + 1, (1,), generator=g))}


def _subspace_phi(A1: Tensor, A2: Tensor, i: int, j: int) -> Tensor:
    from peftlab.spectra import subspace_similarity

    return subspace_similarity(A1, A2, i, j)[i - 1, j - 1].double()


def _budget_inputs(g: torch.Generator) -> dict:
    total = int(torch.randint(10, 200, (1,), generator=g))
    tinit, tfinal = (int(torch.randint(0, total // 4, (1,), generator=g)) for _ in range(2))
    init_r = int(torch.randint(2, 17, (1,), generator=g))
    return {"step": int(torch.randint(0, total + 1, (1,), generator=g)), "init_r": init_r,
            "target_r": int(torch.randint(1, init_r + 1, (1,), generator=g)),
            "n_layers": int(torch.randint(1, 60, (1,), generator=g)),
            "tinit": tinit, "tfinal": tfinal, "total_step": total}


def _adalora_budget(step: int, init_r: int, target_r: int, n_layers: int, tinit: int, tfinal: int,
                    total_step: int) -> int:
    from peftlab.methods.adalora import AdaLoRAConfig, RankAllocator

    config = AdaLoRAConfig(total_step=total_step, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal)
    return RankAllocator(config, [f"layer{k}" for k in range(n_layers)]).budget(step)[0]


def _importance_inputs(g: torch.Generator) -> dict:
    shape = tuple(int(v) for v in torch.randint(1, 9, (2,), generator=g))
    return {"w": torch.randn(shape, generator=g), "grad": torch.randn(shape, generator=g),
            "ibar": torch.rand(shape, generator=g), "ubar": torch.rand(shape, generator=g),
            "beta1": 0.85, "beta2": float(torch.rand(1, generator=g)) * 0.9 + 0.05}


def _adalora_importance(w: Tensor, grad: Tensor, ibar: Tensor, ubar: Tensor, beta1: float,
                        beta2: float) -> tuple[Tensor, Tensor]:
    now = (w * grad).abs()  # I = |w · ∂L/∂w|
    ibar = beta1 * ibar + (1 - beta1) * now
    return ibar, beta2 * ubar + (1 - beta2) * (now - ibar).abs()  # Ū uses the new Ī, as peft does


def _nf4_round_trip(w: Tensor) -> Tensor:
    from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4

    return dequantize_nf4(*quantize_nf4(w, 64, double_quant=False), torch.float32)  # as LoftQ and peft


def _loftq_inputs(g: torch.Generator) -> dict:
    d_out, d_in = (int(torch.randint(8, 40, (1,), generator=g)) for _ in range(2))
    r = int(torch.randint(1, 6, (1,), generator=g))
    return {"W": torch.randn(d_out, d_in, generator=g), "A": 0.3 * torch.randn(r, d_in, generator=g),
            "B": 0.3 * torch.randn(d_out, r, generator=g), "quantize": _nf4_round_trip}


def _loftq_step(W: Tensor, A: Tensor, B: Tensor, quantize) -> tuple[Tensor, Tensor, Tensor]:
    from peftlab.quant.loftq import low_rank

    Q = quantize(W - B @ A)  # quantise what the adapter does not carry
    B_new, A_new = low_rank(W - Q, A.shape[0])  # the best rank-r part of what Q misses
    return Q, A_new, B_new


def _code_book_inputs(g: torch.Generator) -> dict:
    return {"offset": 0.9 + 0.09 * float(torch.rand(1, generator=g))}


def _code_book(offset: float) -> Tensor:
    from peftlab.quant.nf4 import normal_float_code

    return normal_float_code(offset)


def _pack_inputs(g: torch.Generator) -> dict:
    n = int(torch.randint(1, 200, (1,), generator=g))  # odd lengths too
    return {"codes": torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)}


def _pack_4bit(codes: Tensor) -> Tensor:
    q = torch.nn.functional.pad(codes, (0, codes.numel() % 2))  # odd length: one padding code 0
    return (q[0::2] << 4) | q[1::2]  # even index in the high nibble, as bitsandbytes


def _dora_inputs(g: torch.Generator) -> dict:
    d_in, d_out, r = (int(torch.randint(4, 24, (1,), generator=g)) for _ in range(3))
    r = max(1, min(r, d_in, d_out))
    return {"W0": torch.randn(d_out, d_in, generator=g), "A": torch.randn(r, d_in, generator=g),
            "B": 0.3 * torch.randn(d_out, r, generator=g), "m": 0.5 + torch.rand(d_out, generator=g),
            "scaling": float(torch.randint(1, 5, (1,), generator=g))}


def _dora_weight(W0: Tensor, A: Tensor, B: Tensor, m: Tensor, scaling: float) -> Tensor:
    V = W0 + scaling * B @ A  # (d_out, d_in)
    return (m / V.norm(dim=1)).unsqueeze(1) * V  # one norm per output unit: a row here


def _loha_inputs(g: torch.Generator) -> dict:
    d_in, d_out, r = (int(torch.randint(4, 24, (1,), generator=g)) for _ in range(3))
    r = max(1, min(r, 6))
    shapes = {"w1a": (d_out, r), "w1b": (r, d_in), "w2a": (d_out, r), "w2b": (r, d_in)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()} | {
        "scaling": float(torch.randint(1, 5, (1,), generator=g)) / 4}


def _loha_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scaling: float) -> Tensor:
    return scaling * (w1a @ w1b) * (w2a @ w2b)


def _kron_inputs(g: torch.Generator) -> dict:
    a, c, b, d = (int(torch.randint(1, 7, (1,), generator=g)) for _ in range(4))
    return {"W1": torch.randn(a, c, generator=g), "W2": torch.randn(b, d, generator=g)}


def _kronecker(W1: Tensor, W2: Tensor) -> Tensor:
    return torch.kron(W1, W2)


# lessons 08, 11, 13: a soft prompt before the input, merging LoRA adapters (cat, TIES), counting
def _soft_prompt_inputs(g: torch.Generator) -> dict:
    batch, tokens, n = (int(torch.randint(1, 6, (1,), generator=g)) for _ in range(3))
    d = 4 * int(torch.randint(1, 5, (1,), generator=g))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, : int(torch.randint(0, tokens, (1,), generator=g))] = 0  # a left-padded first row
    return {"embeds": torch.randn(batch, tokens, d, generator=g), "attention_mask": mask,
            "prompt": torch.randn(n, d, generator=g)}


def _prepend_soft_prompt(embeds: Tensor, attention_mask: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
    batch, n = embeds.shape[0], prompt.shape[0]
    virtual = prompt.unsqueeze(0).expand(batch, -1, -1)  # (B, n, d): the same prompt for every row
    return (torch.cat([virtual, embeds], dim=1),  # (B, n + T, d)
            torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1))  # (B, n + T)


def _cat_inputs(g: torch.Generator) -> dict:
    n, r, d_in, d_out = (int(torch.randint(lo, hi, (1,), generator=g))
                         for lo, hi in ((2, 5), (1, 5), (4, 20), (4, 20)))
    return {"As": torch.randn(n, r, d_in, generator=g), "Bs": torch.randn(n, d_out, r, generator=g),
            "weights": torch.randn(n, generator=g), "scalings": 0.5 + torch.rand(n, generator=g)}


def _lora_cat(As: Tensor, Bs: Tensor, weights: Tensor, scalings: Tensor) -> tuple[Tensor, Tensor]:
    A = torch.cat([w * s * A_i for A_i, w, s in zip(As, weights, scalings)], dim=0)  # (n·r, d_in)
    B = torch.cat(list(Bs), dim=1)  # (d_out, n·r)
    return A, B


def _ties_inputs(g: torch.Generator) -> dict:
    n, d = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(8, 40, (1,), generator=g))
    return {"tensors": torch.randn(n, d, generator=g), "weights": 0.25 + torch.rand(n, generator=g),
            "density": (0.2, 0.5, 0.8)[int(torch.randint(0, 3, (1,), generator=g))]}


def _ties_merge(tensors: Tensor, weights: Tensor, density: float) -> Tensor:
    from peftlab.compose import merge_tensors

    return merge_tensors("ties", list(tensors), weights, density)


_COUNT_METHODS = ("lora", "dora", "loha", "vera")


def _per_layer_inputs(g: torch.Generator) -> dict:
    return {"method": _COUNT_METHODS[int(torch.randint(0, len(_COUNT_METHODS), (1,), generator=g))],
            "d_in": int(torch.randint(1, 4096, (1,), generator=g)),
            "d_out": int(torch.randint(1, 4096, (1,), generator=g)),
            "r": int(torch.randint(1, 65, (1,), generator=g))}


def _per_layer_count(method: str, d_in: int, d_out: int, r: int) -> int:
    from peftlab.methods import get_method

    spec = get_method(method)
    return spec.params_per_layer(d_in, d_out, spec.config(r=r))


def _training_bytes_inputs(g: torch.Generator) -> dict:
    n_params = int(torch.randint(1, 10**9, (1,), generator=g))
    return {"n_params": n_params, "n_trainable": int(torch.randint(0, n_params + 1, (1,), generator=g))}


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in [
        # -- lesson 00 exercises --
        Exercise(
            "adamw_training_bytes",
            "adamw_training_bytes(n_params, n_trainable) -> bytes that fp32 training with AdamW keeps for the "
            "parameters: every weight, plus a gradient and AdamW's two moments for each trainable one "
            "(activations not counted).",
            lambda n_params, n_trainable: 4 * n_params + 12 * n_trainable,
            _training_bytes_inputs,
            "fp32 is 4 bytes a number. Frozen weights need only themselves; a trainable weight also has a "
            "gradient and two moments (exp_avg, exp_avg_sq): 4 numbers in all.",
            atol=0,
        ),
        # -- lesson 01 exercises --
        Exercise(
            "lora_forward",
            "lora_forward(x, W, A, B, alpha, r) -> h = x W^T + (alpha / r) (x A^T) B^T, for x of shape (n, d_in).",
            _lora_forward,
            _lora_inputs,
            "Rows of x are examples, so every linear map multiplies x by its weight transposed. Send x "
            "through A first (d_in -> r), then through B (r -> d_out), and scale by alpha / r: that way no "
            "d_out x d_in matrix is ever built.",
            dense=lambda inputs: (inputs["B"].shape[0], inputs["A"].shape[1], inputs["A"].shape[0]),
        ),
        Exercise(
            "lora_delta_weight",
            "lora_delta_weight(x, W, A, B, alpha, r) -> ΔW = (alpha / r) B A, shape (d_out, d_in).",
            _lora_delta,
            _lora_inputs,
            "ΔW has W's shape (d_out, d_in): B is (d_out, r) and A is (r, d_in).",
        ),
        Exercise(
            "lora_param_count",
            "lora_param_count(d_in, d_out, r) -> the number of trainable numbers LoRA adds to one layer.",
            lambda d_in, d_out, r: r * (d_in + d_out),
            _count_inputs,
            "A is r x d_in and B is d_out x r.",
            atol=0,
        ),
        Exercise(
            "nf4_absmax_quantize",
            "nf4_absmax_quantize(w, blocksize) -> (codes uint8 of len(w), absmax per block): scale each block "
            "by its largest |value|, then pick the nearest of the 16 NF4 code values.",
            _absmax_quantize,
            _absmax_inputs,
            "Work on rows of blocksize values. A row's scale is its largest absolute value; divided by it, "
            "every value lies in [-1, 1]. Then each value's code is the index of the nearest of the 16 "
            "entries of peftlab.quant.nf4.NF4_CODE (compare every value with every entry by broadcasting).",
            atol=0,
        ),
        # -- lesson 02 exercises --
        Exercise(
            "lora_singular_values",
            "lora_singular_values(A, B, scaling) -> the r singular values of ΔW = scaling · B A, descending, "
            "without forming ΔW: thin QR of B and of Aᵀ, then the SVD of the small r x r core.",
            _lora_singular_values,
            _factors_inputs,
            "Multiplying by a matrix with orthonormal columns does not change singular values. A thin QR "
            "factorisation writes B as (orthonormal d_out x r) times (r x r), and Aᵀ the same way: what is "
            "left between the two orthonormal factors of ΔW is a small r x r matrix.",
            dense=lambda inputs: (inputs["B"].shape[0], inputs["A"].shape[1], inputs["A"].shape[0]),
        ),
        Exercise(
            "subspace_phi",
            "subspace_phi(A1, A2, i, j) -> φ = ‖U_iᵀ V_j‖_F² / min(i, j), U_i the top-i right singular vectors "
            "of A1 (r1, d), V_j the top-j of A2 (r2, d): a 0-d tensor between 0 and 1.",
            _subspace_phi,
            _phi_inputs,
            "The right singular vectors of A1 are the input directions it reads; torch.linalg.svd returns "
            "them sorted, as the rows of Vh. Take A1's top i and A2's top j as orthonormal bases of two "
            "subspaces of R^d; how much one lies in the other is the squared Frobenius norm of the product "
            "of the two bases.",
        ),
        # -- lesson 03 exercises --
        Exercise(
            "nf4_code_book",
            "nf4_code_book(offset) -> the 16 sorted NF4 values: the N(0, 1) quantiles Φ⁻¹(p) of 8 probabilities "
            "evenly spaced from offset down to 0.5 (0.5 excluded), the negatives of 7 more (offset down to 0.5, "
            "0.5 excluded), and an exact 0; divided by the largest value.",
            _code_book,
            _code_book_inputs,
            "Quantiles come from torch.distributions.Normal(0.0, 1.0).icdf. The probabilities run evenly "
            "from offset to 0.5 with 0.5 itself left out (its quantile is the 0, added separately): count "
            "how many points each half needs. Then sort and normalise so the largest value is 1.",
            forbid_names=("NF4_CODE", "FP4_CODE"),
        ),
        Exercise(
            "pack_4bit",
            "pack_4bit(codes) -> uint8 tensor of ceil(n / 2) bytes: codes[0] in the high 4 bits of byte 0, "
            "codes[1] in its low 4 bits, and so on; an odd n gets one padding code 0.",
            _pack_4bit,
            _pack_inputs,
            "Pair neighbours: the code at an even position goes into the high 4 bits of its byte (a shift "
            "left by 4), the one after it into the low 4 bits (a bitwise or). An odd count needs one extra "
            "0 code at the end first.",
            atol=0,
        ),
        # -- lesson 04 exercises --
        Exercise(
            "dora_weight",
            "dora_weight(W0, A, B, m, scaling) -> W' = m ⊙ V / ||V||_c with V = W0 + scaling · B A, shape "
            "(d_out, d_in); ||V||_c is the L2 norm of each output unit's weights (one per row here).",
            _dora_weight,
            _dora_inputs,
            "First the direction V: W0 plus the scaled low-rank update. An output unit's weights are one "
            "row of V, so there is one norm per row; divide each row by its norm and multiply it by its "
            "magnitude. A factor per row needs shape (d_out, 1) to broadcast.",
        ),
        # -- lesson 05 exercises --
        Exercise(
            "loha_delta_weight",
            "loha_delta_weight(w1a, w1b, w2a, w2b, scaling) -> ΔW = scaling · (w1a w1b) ⊙ (w2a w2b), shape "
            "(d_out, d_in); w1a, w2a are (d_out, r), w1b, w2b are (r, d_in).",
            _loha_delta,
            _loha_inputs,
            "Each pair (w1a, w1b) and (w2a, w2b) is a LoRA-style low-rank product of shape (d_out, d_in); "
            "LoHa combines the two products entry by entry (the Hadamard product), not as a matrix product.",
            atol=1e-4,
        ),
        Exercise(
            "kronecker",
            "kronecker(W1, W2) -> W1 ⊗ W2 of shape (a·b, c·d) for W1 (a, c) and W2 (b, d): block (i, j) is "
            "W1[i, j] · W2. Write it without torch.kron.",
            _kronecker,
            _kron_inputs,
            "Block (i, j) is W1[i, j] times all of W2. Give each factor two singleton axes so that broadcasting "
            "multiplies every entry of W1 with every entry of W2 in a 4-d tensor, then reshape it to "
            "(a·b, c·d); which axes you interleave decides whether the blocks come out in the right places.",
            forbid_ops=("kron",),
            atol=1e-6,
        ),
        # -- lesson 06 exercises --
        Exercise(
            "oft_cayley",
            "cayley_rotation(params, b) -> the (b, b) orthogonal block R = (I - Q)(I + Q)^-1, where Q is "
            "skew-symmetric (Q = -Q^T) with its strict upper triangle filled row by row from params "
            "(b(b-1)/2 numbers, the order of torch.triu_indices(b, b, offset=1)).",
            _cayley_rotation,
            _cayley_inputs,
            "Build Q first: a zero b x b matrix with params in its strict upper triangle (torch.triu_indices "
            "lists those positions in the right order), minus its own transpose. The Cayley transform then "
            "needs an identity of params' dtype and one inverse (or a solve).",
            atol=1e-9,
        ),
        Exercise(
            "oft_block_forward",
            "oft_forward(x, W0, blocks) -> h = x R W0^T for x of shape (n, d_in), where R = "
            "block_diag(blocks[0], ..., blocks[-1]) and blocks has shape (n_blocks, b, b), n_blocks · b = d_in.",
            lambda x, W0, blocks: x @ torch.block_diag(*blocks) @ W0.T,
            _oft_block_inputs,
            "The rotation acts on the input features before W0. Rows of x are examples, so a row vector is "
            "multiplied by R from the left: cut each row into n_blocks chunks of b features, turn chunk i "
            "with blocks[i], put the chunks back together, then apply W0 as a linear layer does.",
        ),
        # -- lesson 07 exercises --
        Exercise(
            "ia3_merge",
            "ia3_merged_weight(W, b, l, feedforward) -> (W', b') with W' x + b' equal to the IA3 layer: "
            "l ⊙ (W x + b) when feedforward is False (l has d_out entries), W (l ⊙ x) + b when True "
            "(l has d_in entries). W is (d_out, d_in).",
            _ia3_merged_weight,
            _ia3_inputs,
            "An output scale multiplies whole output units: W's rows, and the bias too. An input scale "
            "multiplies input features, W's columns; the bias is added after W and never sees the input.",
        ),
        Exercise(
            "bitfit_bert_count",
            "bert_bitfit_count(n_layers, d, d_ff) -> how many numbers BitFit trains in a BERT encoder: the "
            "biases of query, key, value, attention output (d each), intermediate (d_ff) and output (d) "
            "and of the two LayerNorms (d each) in every layer, plus the embedding LayerNorm's and the "
            "pooler's biases (d each). The classifier head is not counted.",
            lambda n_layers, d, d_ff: n_layers * (7 * d + d_ff) + 2 * d,
            _bert_size_inputs,
            "Walk through one encoder layer and list every bias vector with its size: the attention's "
            "projections and output, the feed-forward's two linear layers (one widens to d_ff, one narrows "
            "back), the LayerNorms. Then the ones outside the layers the task names.",
            atol=0,
        ),
        # -- lesson 08 exercises --
        Exercise(
            "soft_prompt_prepend",
            "prepend_soft_prompt(embeds, attention_mask, prompt) -> (embeds', mask'): put the n soft-prompt "
            "vectors (prompt, shape (n, d)) before every row of embeds (B, T, d), giving (B, n + T, d), and "
            "widen the mask (B, T) to (B, n + T) with ones in front (the model must see the prompt).",
            _prepend_soft_prompt,
            _soft_prompt_inputs,
            "The same n vectors go before every row: give the prompt a batch axis and repeat it B times "
            "(expand costs no memory), then concatenate along the sequence axis. The mask grows the same "
            "way, with ones in the mask's own dtype.",
        ),
        # -- lesson 09 exercises --
        Exercise(
            "houlsby_adapter",
            "houlsby_forward(h, W_down, b_down, W_up, b_up, s) -> h + s · up(relu(down(h))), where "
            "down(h) = h W_down^T + b_down (d -> r) and up(z) = z W_up^T + b_up (r -> d); h is (n, d).",
            _houlsby_forward,
            _houlsby_inputs,
            "Rows of h are examples, so each linear layer multiplies by its weight transposed and adds its "
            "bias. Down-project, ReLU, up-project, scale by s, and add h back (the residual).",
        ),
        Exercise(
            "gated_prompt_attention",
            "prompt_attention(q, k_p, v_p, gate) -> gate · softmax(q k_p^T / sqrt(d)) v_p: T queries "
            "(T, d) attend over K prompt keys and values (K, d) with their own softmax, scaled by gate.",
            _prompt_attention,
            _prompt_attention_inputs,
            "Score every query against every prompt key, scaled by the square root of the head size: a "
            "(T, K) matrix. The softmax runs over the K prompts; the weighted sum of the prompt values is "
            "then scaled by the gate.",
        ),
        # -- lesson 10 exercises --
        Exercise(
            "adalora_budget",
            "adalora_budget(step, init_r, target_r, n_layers, tinit, tfinal, total_step) -> the total rank b(t) "
            "AdaLoRA allows at this step: init_r · n_layers up to tinit, then a cubic fall to target_r · n_layers "
            "at total_step - tfinal, then target_r · n_layers (an int, rounded down).",
            _adalora_budget,
            _budget_inputs,
            "Three phases: the full budget up to and including tinit, the target budget after "
            "total_step - tfinal, and in between the excess over the target shrinks with the cube of the "
            "share of the middle phase still to go. Budgets are ranks times layers; round down at the end.",
            atol=0,
        ),
        Exercise(
            "adalora_importance",
            "adalora_importance(w, grad, ibar, ubar, beta1, beta2) -> (new Ī, new Ū): the sensitivity "
            "I = |w · grad|, its EMA Ī with beta1, and the EMA Ū of |I - Ī| with beta2 (using the new Ī).",
            _adalora_importance,
            _importance_inputs,
            "Both are exponential moving averages (new = beta · old + (1 - beta) · value). Order matters: "
            "update Ī first, and measure the deviation of the sensitivity from that updated Ī.",
        ),
        # -- lesson 11 exercises --
        Exercise(
            "lora_cat_combine",
            "cat_combine(As, Bs, weights, scalings) -> (A_cat, B_cat), for n LoRA adapters As (n, r, d_in), "
            "Bs (n, d_out, r): A_cat stacks w_i · s_i · A_i on top of each other (n·r, d_in), B_cat puts the "
            "B_i side by side (d_out, n·r), so that B_cat A_cat = Σ_i w_i s_i B_i A_i exactly (peft's 'cat').",
            _lora_cat,
            _cat_inputs,
            "A block product: B's side by side times A's stacked is the sum of the B_i A_i. Each adapter's "
            "weight and scaling must appear once in its term, so put them on one factor only.",
        ),
        Exercise(
            "ties_merge",
            "ties_merge(tensors, weights, density) -> (d,): TIES-merge n flat tensors (n, d) with weights (n,). "
            "1) trim: in each tensor keep its int(density · d) largest |entries|, zero the rest; 2) elect: per "
            "entry, the sign of the sum of the trimmed tensors (a sum of 0 elects +); 3) disjoint mean: add "
            "weights[i] · trimmed[i] over the tensors whose entry has the elected sign, and divide by how many "
            "they are (at least 1).",
            _ties_merge,
            _ties_inputs,
            "Three passes, as the task says. Trim: per tensor, the positions of its k largest magnitudes "
            "(torch.topk on absolute values), zero elsewhere. Elect: per entry, the sign of the sum over "
            "the trimmed tensors. Mean: per entry, only the tensors whose sign matches (a trimmed 0 never "
            "matches) count, in the weighted sum and in the divisor.",
        ),
        # -- lesson 12 exercises --
        Exercise(
            "loftq_step",
            "loftq_step(W, A, B, quantize) -> (Q, A_new, B_new): one LoftQ round. Q = quantize(W - B A); "
            "B_new A_new = the best rank-r approximation of W - Q, with B_new = U_r √S_r and A_new = √S_r V_rᵀ.",
            _loftq_step,
            _loftq_inputs,
            "Quantise what the adapter does not carry; then the adapter takes the best rank-r "
            "approximation of what the quantiser missed (Eckart-Young: a truncated SVD), with the square "
            "root of the singular values split evenly between B_new and A_new.",
        ),
        # -- lesson 13 exercises --
        Exercise(
            "per_layer_count",
            "per_layer_count(method, d_in, d_out, r) -> trainable numbers one adapted (d_out x d_in) layer "
            "gets, for method in 'lora' (A, B), 'dora' (LoRA + one magnitude per output), 'loha' (two LoRA "
            "pairs, multiplied elementwise) and 'vera' (frozen shared random A, B; trains d and b vectors).",
            _per_layer_count,
            _per_layer_inputs,
            "Count the shapes of what each method trains. LoRA: A reads d_in features into r, B writes r "
            "into d_out. DoRA adds one magnitude per output unit. LoHa has two LoRA pairs. VeRA freezes "
            "and shares A and B and trains one scale per row of A and one per output.",
            atol=0,
        ),
        # -- lesson 14 exercises --
        Exercise(
            "lora_trainable_total",
            "lora_trainable_total(shapes, r) -> trainable numbers of LoRA rank r on every layer in shapes, "
            "a list of (d_in, d_out) pairs (one per adapted layer).",
            lambda shapes, r: sum(r * (d_in + d_out) for d_in, d_out in shapes),
            _target_shapes_inputs,
            "Each layer adds A (r x d_in) and B (d_out x r); add up over the layers.",
            atol=0,
        ),
        # -- lesson 15 exercises --
        Exercise(
            "effective_batch_size",
            "effective_batch_size(batch_size, grad_accum, num_processes) -> rows per optimizer step "
            "under DDP (batch_size rows per micro-batch and per process).",
            lambda batch_size, grad_accum, num_processes: batch_size * grad_accum * num_processes,
            _ddp_batch_inputs,
            "Each process runs grad_accum micro-batches of batch_size rows, then DDP averages the "
            "gradients of all processes into one optimizer step.",
            atol=0,
        ),
        Exercise(
            "launch_command",
            "launch_command(script, num_processes, on_cpu) -> the command line: 'python SCRIPT' for one "
            "process, else 'accelerate launch --multi_gpu --num_processes N SCRIPT', prefixed with "
            "'ACCELERATE_USE_CPU=1 ' when on_cpu.",
            _launch_command,
            _launch_inputs,
            "One process needs no launcher. Several CPU processes need --multi_gpu plus the "
            "environment variable ACCELERATE_USE_CPU=1: `--cpu --num_processes N` starts one process.",
            atol=0,
        ),
    ]
}


def describe(name: str) -> str:
    """The task text of an exercise."""
    return _get(name).task


def check(name: str, fn: Callable, cases: int = 5, seed: int = 0) -> bool:
    """Run ``fn`` and the reference on ``cases`` seeded random inputs; print the verdict.

    The answer must also keep to the exercise's idea: it may not call into peftlab (the checker's own
    reference included: write it yourself), nor use what the exercise excludes (``torch.kron`` where
    the point is to build the Kronecker product, a dense ΔW where the point is never to form it).
    An unwritten answer (``raise NotImplementedError()``, the learner notebooks' stub) gets a
    message, not a traceback.
    """
    exercise = _get(name)
    if getattr(fn, "__module__", "") and str(fn.__module__).split(".")[0] == "peftlab":
        print(f"✗ {name}: that is peftlab's own {getattr(fn, '__qualname__', 'function')}; the exercise is to "
              f"write it yourself.\n  {exercise.task}")
        return False
    names = _names_read(fn) & set(exercise.forbid_names)
    if names:
        print(f"✗ {name}: your function reads {', '.join(sorted(names))}, the answer itself; build it from "
              f"the definition instead.\n  Hint: {exercise.hint}")
        return False
    g = torch.Generator().manual_seed(seed)
    for case in range(cases):
        inputs = exercise.make_inputs(g)
        expected = exercise.reference(**inputs)
        watch = _Watch(exercise, inputs)
        try:
            with watch:
                got = fn(**inputs)
        except NotImplementedError:
            print(f"✗ {name}: not written yet. Replace `raise NotImplementedError()` with your code, run the "
                  f"cell again.\n  {exercise.task}")
            return False
        except Exception as err:  # the learner's code: report, never crash the notebook
            frame = traceback.extract_tb(err.__traceback__)[-1]
            print(f"✗ {name}: raised {type(err).__name__}: {err} (line {frame.lineno}) on case {case}: "
                  f"{_shapes(inputs)}.\n  Hint: {exercise.hint}")
            return False
        if watch.problem:
            print(f"✗ {name}: {watch.problem} (case {case}: {_shapes(inputs)}).\n  Hint: {exercise.hint}")
            return False
        problem = _compare(got, expected, exercise.atol)
        if problem:
            print(f"✗ {name}: {problem} on case {case}: {_shapes(inputs)}.\n  Hint: {exercise.hint}")
            return False
    print(f"✓ {name}: correct on {cases} random cases")
    return True


_SVD_OPS = frozenset({"svd", "svdvals", "svd_lowrank", "pca_lowrank", "eig", "eigh", "eigvals", "eigvalsh"})


class _Watch(TorchFunctionMode):
    """While the answer runs: every torch call (``TorchFunctionMode``) and every Python call
    (``sys.setprofile``), to catch what the exercise's idea excludes. The first problem is kept."""

    def __init__(self, exercise: Exercise, inputs: dict) -> None:
        super().__init__()
        self.exercise, self.problem = exercise, None
        self.dense = exercise.dense(inputs) if exercise.dense else None
        self._allowed = {id(getattr(v, "__code__", None)) for v in inputs.values() if callable(v)}
        self._inside_allowed = 0
        self._previous_profile = None

    def __enter__(self):
        self._previous_profile = sys.getprofile()
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc):
        sys.setprofile(self._previous_profile)
        return super().__exit__(*exc)

    def _profile(self, frame, event, arg) -> None:
        # an input callable (LoftQ's `quantize`) may run peftlab code; the answer itself may not
        if id(frame.f_code) in self._allowed:
            self._inside_allowed += {"call": 1, "return": -1}.get(event, 0)
            return
        if event != "call" or self._inside_allowed or self.problem or frame.f_code in _OWN_CODE:
            return
        module = str(frame.f_globals.get("__name__", ""))
        caller = str(frame.f_back.f_globals.get("__name__", "")) if frame.f_back else ""
        if module.split(".")[0] == "peftlab" and caller.split(".")[0] != "peftlab":
            self.problem = (f"your function calls peftlab's {module}.{frame.f_code.co_name}; the exercise is "
                            "to write it yourself")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.problem is None and not self._inside_allowed:
            self.problem = self._inspect(getattr(func, "__name__", ""), args, out)
        return out

    def _inspect(self, op: str, args, out) -> str | None:
        if op in self.exercise.forbid_ops:
            return f"your function uses torch's {op}, which this exercise asks you to build yourself"
        if self.dense is None:
            return None
        d_out, d_in, r = self.dense
        big = {(d_out, d_in), (d_in, d_out)}
        tensors = [a for a in _flat(args) if isinstance(a, Tensor)]
        if op in _SVD_OPS and any(t.dim() >= 2 and min(t.shape[-2:]) > r for t in tensors):
            return (f"your function takes the {op} of a {'x'.join(map(str, tensors[0].shape))} matrix; the "
                    f"point is that an {r} x {r} one is enough")
        if (isinstance(out, Tensor) and out.dim() >= 2 and tuple(out.shape[-2:]) in big
                and not any(t.dim() >= 2 and tuple(t.shape[-2:]) in big for t in tensors)):
            return (f"your function builds a {d_out} x {d_in} matrix from the factors (that is ΔW); the "
                    "point is never to form it")
        return None


_OWN_CODE = frozenset(f.__code__ for f in (_Watch.__torch_function__, _Watch._inspect, _Watch.__exit__))


def _flat(items) -> list:
    out = []
    for item in items:
        out.extend(_flat(item) if isinstance(item, (list, tuple)) else [item])
    return out


def _names_read(fn: Callable) -> set[str]:
    """Every global or attribute name ``fn``'s code (nested functions included) refers to."""
    code = getattr(fn, "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return names


def predicted(what: str, prediction, measured, tolerance: float = 0.1) -> bool:
    """An open exercise's verdict: the learner's prediction beside the measurement.

    ``prediction`` is None until the learner writes one (the learner notebooks' stub), which gets a
    message, not a traceback. Numbers count as right within ``tolerance`` (relative); anything
    else must be equal. Prints one line and returns whether the prediction held.

        prediction = None  # the learner's guess, written before running the measurement
        exercises.predicted("trainable parameters of LoRA r=16", prediction, measured)
    """
    if prediction is None:
        print(f"✗ {what}: no prediction yet. Write yours in the cell above (replace None), run it, then "
              "run this cell.")
        return False
    if isinstance(measured, (int, float)) and not isinstance(measured, bool):
        try:
            guess = float(prediction)
        except (TypeError, ValueError):
            print(f"✗ {what}: expected a number as the prediction, got {prediction!r}.")
            return False
        off = (guess - measured) / measured if measured else guess - measured
        ok = abs(off) <= tolerance
        print(f"{'✓' if ok else '✗'} {what}: you predicted {_num(guess)}, measured {_num(measured)} "
              f"({off:+.1%}{'' if ok else f', more than {tolerance:.0%} off: look at what you left out'})")
        return ok
    ok = prediction == measured
    print(f"{'✓' if ok else '✗'} {what}: you predicted {prediction!r}, measured {measured!r}")
    return ok


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 and float(x).is_integer() else f"{x:,.4g}"


def _compare(got, expected, atol: float) -> str | None:
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} values, got {type(got).__name__}"
        for i, (a, b) in enumerate(zip(got, expected)):
            problem = _compare(a, b, atol)
            if problem:
                return f"item {i}: {problem}"
        return None
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        diff = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
        if not math.isfinite(diff) or diff > atol:
            return f"values differ from the reference by up to {diff:.3g} (allowed {atol:g})"
        return None
    if got != expected:
        return f"got {got!r}, expected {expected!r}"
    return None


def _shapes(inputs: dict) -> str:
    return ", ".join(f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v}" for k, v in inputs.items())


def _get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise UnknownNameError(
            f"No exercise called {name!r}.{closest(name, EXERCISES)} Expected one of: {', '.join(EXERCISES)}."
        )
    return EXERCISES[name]
