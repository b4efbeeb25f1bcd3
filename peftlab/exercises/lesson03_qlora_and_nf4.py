"""The exercises of lesson 3 (notebooks/03_qlora_and_nf4.ipynb): the NF4 code book and packing two
4-bit codes into a byte.

For each: the seeded random inputs, the reference answer and the hint. ``LESSON_EXERCISES``
lists them in the lesson's order; ``peftlab.exercises.EXERCISES`` collects every lesson's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftlab.exercises.exercise import Exercise


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


LESSON_EXERCISES: tuple[Exercise, ...] = (
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
)


__all__ = ["LESSON_EXERCISES"]
