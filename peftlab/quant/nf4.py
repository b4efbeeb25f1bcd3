"""NF4 from scratch: QLoRA's 4-bit NormalFloat weights, bit for bit as bitsandbytes stores them.

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
https://arxiv.org/abs/2305.14314 (section 3: NormalFloat, double quantisation).
Checked against bitsandbytes 0.50.2 on CPU.

A weight is flattened (row-major) and cut into blocks of 64. Each block keeps one scale, its
absolute maximum, and each value becomes the index of the nearest entry of a 16-value code book:

    w (flattened) | w0 w1 ... w63 | w64 ... w127 | ...   the last block may be shorter
    absmax        |      a_0      |     a_1      | ...   a_b = max |w_i| in block b   (fp32)
    codes         | q0 q1 ... q63 | q64 ...      | ...   q_i = nearest(CODE, w_i / a_b) (4 bit)
    bytes         | [q0 q1] [q2 q3] ...                  two codes a byte, even index high

    dequantise:    ŵ_i = CODE[q_i] · a_b

NF4's code book holds quantiles of N(0, 1), so for normally distributed weights every code is
used about equally often (``normal_float_code``). Double quantisation stores the absmax values in
8 bits too: subtract their mean μ, cut them into blocks of 256, and quantise each block with an
8-bit "dynamic" code book and one fp32 absmax s:  a_b ≈ CODE8[r_b] · s_{b // 256} + μ.
Bits per weight (paper, section 3): 4 + 32/64 = 4.5 without it, 4 + 8/64 + 32/(64·256) ≈ 4.127
with it.

Bit-exactness with bitsandbytes comes down to copying three details of its CPU code: a value
exactly halfway between two codes takes the lower one (``torch.bucketize``); full blocks are
scaled by ``w * (1 / absmax)`` but the last, shorter block by ``w / absmax``; and the 8-bit
quantiser snaps w/absmax to a 65,536-point grid before picking a code (``_quantize_8bit``).
FP4 (bitsandbytes' 1-sign, 2-exponent, 1-mantissa type) and plain symmetric int4 reuse the same
machinery with other code books, for comparison.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError, closest


# --------------------------------------------------------------------------------------------
# Code books
# --------------------------------------------------------------------------------------------
def normal_float_code(offset: float = 0.9677083) -> Tensor:
    """The 16 NF4 values: 7 negative and 8 positive quantiles of N(0, 1), plus an exact 0.

    Quantiles at probability 0 or 1 are infinite, so the outermost probability is ``offset``
    instead of 1. QLoRA's code sets offset = (1 - 1/(2·15) + 1 - 1/(2·16)) / 2 = 0.96770833...:
    the mean of the centres of the last bin when [0, 1] is cut into 15 or 16 equal bins (NF4 has
    15 non-zero values, 8 on one side). Each half is then evenly spaced in probability from
    ``offset`` down to 0.5 and mapped through the inverse CDF; 0 is added exactly (padding and
    zeros must dequantise to 0), and everything is divided by the largest value to fill [-1, 1].
    bitsandbytes built its table from the literal 0.9677083 and float32 ``linspace`` points; we
    follow both, and get its table exactly (the unrounded offset moves entries by up to 3e-7).
    """
    f64 = torch.float64
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=f64), torch.tensor(1.0, dtype=f64))
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].to(f64)  # 8 probabilities in (0.5, offset]
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].to(f64)  # 7, mirrored below zero
    values = torch.cat([-normal.icdf(p_neg), torch.zeros(1, dtype=f64), normal.icdf(p_pos)])
    values = values.float().sort().values  # round each quantile to fp32, as bnb's table did
    return values / values.max()  # (16,), sorted, code 7 is exactly 0


def fp4_code() -> Tensor:
    """bitsandbytes' FP4, indexed by bit pattern ``s e1 e0 m``: sign, 2 exponent bits, 1 mantissa.

    Magnitude: e = 0 is subnormal, m · 2^-4; otherwise 2^(4 - e) · (1 + m/2) (bnb's exponent
    runs backwards: e = 1 is the largest). Normalised by the largest magnitude, 12.
    """
    magnitudes = []
    for e in range(4):
        for m in range(2):
            magnitudes.append(m * 2.0**-4 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2))
    mag = torch.tensor(magnitudes) / 12.0
    return torch.cat([mag, -mag]) + 0.0  # (16,) in bit-pattern order; "+ 0.0": -0 -> +0 as in bnb


def dynamic_8bit_code() -> Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code book (https://arxiv.org/abs/1511.04561).

    Decade e = 0..6 holds 2^e fractions, the midpoints of an even split of [0.1, 1], times
    10^(e - 6), with both signs; plus 0 and 1: 2 · 127 + 2 = 256 sorted values. Dense near 0,
    sparse near ±1 -- right for the absmax values minus their mean.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1)
        means = 10.0 ** (e - 6) * ((edges[:-1] + edges[1:]) / 2)
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


NF4_CODE = normal_float_code()
FP4_CODE = fp4_code()
INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7  # 15 evenly spaced levels, 0 exact
DYNAMIC_CODE = dynamic_8bit_code()
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


# --------------------------------------------------------------------------------------------
# Quantisation state
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DoubleQuant:
    """Second level: a_b ≈ code[state.absmax[b]] · absmax[b // blocksize] + offset."""

    absmax: Tensor  # (ceil(n_blocks / blocksize),) fp32: one scale per block of absmax values
    offset: Tensor  # () fp32: mean of the original absmax values, subtracted before quantising
    code: Tensor  # (256,) the dynamic 8-bit code book
    blocksize: int = 256


@dataclass(frozen=True, eq=False)
class QuantState:
    """Everything besides the packed codes needed to rebuild a 4-bit weight."""

    shape: torch.Size  # logical shape of the weight, e.g. (d_out, d_in)
    dtype: torch.dtype  # dtype of the original weight; dequantisation returns this by default
    blocksize: int  # values per absmax block (64 in QLoRA)
    quant_type: str  # "nf4", "fp4" or "int4"
    code: Tensor  # (16,) or (15,) code book, indexed by the 4-bit codes
    absmax: Tensor  # (n_blocks,) fp32 scales, or uint8 codes of them when double is set
    double: DoubleQuant | None = None  # the second level of double quantisation


def _check(w: Tensor, blocksize: int) -> None:
    if not w.is_floating_point():
        raise ConfigError(f"Can only quantise floating-point weights; got dtype {w.dtype}. "
                          "Try w.float() first.")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ConfigError(f"blocksize={blocksize!r} is invalid. Expected a positive integer; QLoRA "
                          "uses 64 (bitsandbytes accepts 32, 64, ..., 4096).")


def _scale_blocks(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(x / absmax clamped to [-1, 1], absmax per block), in bitsandbytes' float32 arithmetic."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # a zero block divides by 1e-38, not 0, so its values stay 0 instead of becoming NaN
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:  # the tail block: bnb divides here, where full blocks multiply by a reciprocal
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def _nearest(scaled: Tensor, code: Tensor) -> Tensor:
    """Index into ``code`` (any order) of the nearest entry; exactly halfway takes the lower."""
    sorted_code, order = torch.sort(code, stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]  # bucketize: x == midpoint stays left


def _quantize_8bit(x: Tensor, code: Tensor, blocksize: int = 256) -> tuple[Tensor, Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantiser: (uint8 codes, fp32 absmax per block).

    It does not search for the nearest code directly: x / absmax is first rounded to one of
    65,536 evenly spaced points in [-1, 1], and a table gives each point its nearest code. Values
    within ~1.5e-5 of a midpoint can so land on the farther code; copying this keeps us bit-exact.
    """
    table = _grid_table(tuple(code.tolist())).to(x.device)  # grid point -> nearest code
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).reshape(-1, blocksize)  # zero padding: absmax unchanged
    absmax = blocks.abs().amax(dim=1)
    t = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)
    grid_index = ((t + 1.0) * 0.5 * 65535 + 0.5).to(torch.int64)  # C's truncating float -> int
    codes = torch.where(absmax[:, None] == 0, 0, table[grid_index.clamp(0, 65535)])
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


@functools.lru_cache(maxsize=4)
def _grid_table(code: tuple[float, ...]) -> Tensor:
    """For each of the 65,536 grid points, the index of the nearest code (a tie stays left)."""
    code_t = torch.tensor(code, dtype=torch.float32)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    return torch.searchsorted((code_t[:-1] + code_t[1:]) * 0.5, grid)


def quantize_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True) -> tuple[Tensor, QuantState]:
    """Blockwise absmax 4-bit quantisation. Returns (packed uint8 codes of shape (ceil(n/2), 1),
    state) -- the same layout as ``bitsandbytes.functional.quantize_4bit``."""
    _check(w, blocksize)
    if quant_type not in CODES:
        raise ConfigError(f"Unknown 4-bit type {quant_type!r}.{closest(str(quant_type), CODES)} "
                          f"Expected one of: {', '.join(CODES)}.")
    code = CODES[quant_type].to(w.device)
    scaled, absmax = _scale_blocks(w.detach().reshape(-1).float(), blocksize)
    q = _nearest(F.pad(scaled, (0, scaled.numel() % 2)), code).to(torch.uint8)  # pad to even: 0
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # (ceil(n/2), 1), even index in high nibble
    double = None
    if double_quant:
        offset = absmax.mean()
        absmax, absmax2 = _quantize_8bit(absmax - offset, DYNAMIC_CODE.to(w.device))
        double = DoubleQuant(absmax=absmax2, offset=offset, code=DYNAMIC_CODE.to(w.device))
    return packed, QuantState(w.shape, w.dtype, blocksize, quant_type, code, absmax, double)


def block_scales(state: QuantState) -> Tensor:
    """The fp32 absmax of every block, undoing double quantisation when present."""
    if state.double is None:
        return state.absmax
    d = state.double
    n = state.absmax.numel()
    scale = d.absmax.repeat_interleave(d.blocksize)[:n]  # the 8-bit block scale of each value
    return d.code[state.absmax.long()] * scale + d.offset


def dequantize_4bit(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """ŵ = CODE[q] · absmax, in fp32, then cast to ``dtype`` (default: the original dtype)."""
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: state.shape.numel()].long()
    absmax = block_scales(state)
    scale = absmax.repeat_interleave(state.blocksize)[: q.numel()]  # one scale per value
    return (state.code[q] * scale).to(dtype or state.dtype).reshape(state.shape)


def quantize_nf4(w: Tensor, blocksize: int = 64,
                 double_quant: bool = True) -> tuple[Tensor, QuantState]:
    """QLoRA's NF4 with (by default) double quantisation: ``quantize_4bit(w, "nf4", ...)``."""
    return quantize_4bit(w, "nf4", blocksize, double_quant)


def quantize_fp4(w: Tensor, blocksize: int = 64,
                 double_quant: bool = True) -> tuple[Tensor, QuantState]:
    return quantize_4bit(w, "fp4", blocksize, double_quant)


def quantize_int4(w: Tensor, blocksize: int = 64,
                  double_quant: bool = False) -> tuple[Tensor, QuantState]:
    """Symmetric absmax int4: round(7 · w / absmax) in -7..7 (one 4-bit pattern unused)."""
    return quantize_4bit(w, "int4", blocksize, double_quant)


# One dequantiser serves all three: the code book travels in the state.
dequantize_nf4 = dequantize_fp4 = dequantize_int4 = dequantize_4bit


def bits_per_parameter(state: QuantState, packed: Tensor | None = None) -> float:
    """Storage bits per weight, counted from the real tensors: codes + absmax (+ second level).

    The code books are shared constants, not counted. Without ``packed`` the codes are counted as
    ceil(n/2) bytes, which is what ``quantize_4bit`` produces.
    """
    n = state.shape.numel()
    nbytes = packed.nbytes if packed is not None else (n + 1) // 2
    nbytes += state.absmax.nbytes
    if state.double is not None:
        nbytes += state.double.absmax.nbytes + state.double.offset.nbytes
    return 8 * nbytes / n


@dataclass(frozen=True, eq=False)
class QuantError:
    """Per-element error ŵ - w (flattened, fp32) and its summary."""

    errors: Tensor
    mean_abs: float
    rmse: float
    max_abs: float
    relative: float  # ||ŵ - w|| / ||w||


def quantization_error(w: Tensor, kind: str = "nf4", blocksize: int = 64,
                       double_quant: bool = False) -> QuantError:
    """Quantise and dequantise ``w`` with ``kind`` ("nf4", "fp4", "int4"); measure what was lost."""
    packed, state = quantize_4bit(w, kind, blocksize, double_quant)
    errors = (dequantize_4bit(packed, state, torch.float32) - w.float()).reshape(-1)
    return QuantError(errors, errors.abs().mean().item(), errors.pow(2).mean().sqrt().item(),
                      errors.abs().max().item(), (errors.norm() / w.float().norm()).item())


# --------------------------------------------------------------------------------------------
# A 4-bit linear layer (the frozen base of QLoRA)
# --------------------------------------------------------------------------------------------
class Linear4bitRef(nn.Linear):
    """y = x Ŵᵀ + b with Ŵ dequantised from 4-bit codes on every forward (QLoRA's base layer).

    It subclasses nn.Linear so that everything looking for linear layers (peftlab's injector,
    "all-linear", transformers' helpers) finds it, but skips nn.Linear's __init__: there is no
    float weight parameter. ``weight`` is a read-only property giving the dense Ŵ; codes and
    scales are buffers, so ``.to(device)`` and ``state_dict()`` carry them.
    """

    is_quantized = True  # tells peftlab's injector that merging into this weight is refused

    def __init__(self, packed: Tensor, state: QuantState, bias: Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = state.shape
        self.quant_type, self.blocksize = state.quant_type, state.blocksize
        self.weight_dtype = state.dtype  # what `weight` returns; forward computes in compute_dtype
        self.compute_dtype = compute_dtype  # None: compute in the input's dtype
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code, persistent=False)  # a constant of quant_type
        d = state.double
        self.register_buffer("absmax2", d.absmax if d else None)
        self.register_buffer("offset", d.offset if d else None)
        self.register_buffer("code2", d.code if d else None, persistent=False)
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> Linear4bitRef:
        packed, state = quantize_4bit(linear.weight, quant_type, blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def state(self) -> QuantState:
        double = None
        if self.absmax2 is not None:
            double = DoubleQuant(self.absmax2, self.offset, self.code2)
        return QuantState(torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                          self.blocksize, self.quant_type, self.code, self.absmax, double)

    @property
    def weight(self) -> Tensor:
        """The dense dequantised weight (d_out, d_in) in the original dtype; a fresh tensor."""
        return dequantize_4bit(self.packed, self.state)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype or x.dtype
        weight = dequantize_4bit(self.packed, self.state, dtype)  # (d_out, d_in)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the fp32 scales: buffers may move, never change dtype
        buffers = {k: v for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        for name, old in buffers.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax2 is not None}")


@dataclass(frozen=True)
class QuantizeReport:
    layers: tuple[str, ...]  # names of the replaced layers
    bytes_before: int  # their dense weights
    bytes_after: int  # codes + absmax (+ second level); biases are unchanged and not counted

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


def quantize_model_nf4(model: nn.Module, skip: tuple[str, ...] = ("lm_head",),
                       blocksize: int = 64, double_quant: bool = True,
                       compute_dtype: torch.dtype | None = None,
                       quant_type: str = "nf4") -> QuantizeReport:
    """Replace, in place, every nn.Linear whose name (or name suffix) is not in ``skip`` by a
    Linear4bitRef: the reference QLoRA base. Returns which layers changed and the bytes saved."""
    from peftlab.inject import matches

    names, before, after = [], 0, 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or matches(name, list(skip)):
            continue
        layer = Linear4bitRef.from_linear(module, quant_type, blocksize, double_quant,
                                          compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        names.append(name)
        before += module.weight.nbytes
        after += sum(b.nbytes for k, b in layer.state_dict().items() if k != "bias")
    return QuantizeReport(tuple(names), before, after)
