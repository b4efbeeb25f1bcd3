"""NF4 through bitsandbytes: the QLoRA base (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

``quantization="nf4"`` loads go through bitsandbytes, which quantizes while the weights are loaded.
On CPUs with AVX512-BF16 bitsandbytes also has a trap that stops gradients reaching the adapter;
:func:`disable_cpu_weight_repack` disarms it, and every 4-bit load does so.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.models.quiet import quiet_bitsandbytes


def nf4_config(compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for QLoRA's NF4: double quantization, ``compute_dtype`` matmuls."""
    quiet_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 4-bit NormalFloat code book (QLoRA section 3)
        bnb_4bit_use_double_quant=True,  # quantize the fp32 block scales too: ~0.37 bit/param saved
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_4bit_trainable(model: nn.Module) -> None:
    """Guard against a bitsandbytes CPU trap: on CPUs with AVX512-BF16 an eval-mode no-grad
    forward of a ``Linear4bit`` (an evaluation, generate()) repacks its weight and silently drops
    autograd support, after which no gradient reaches the adapter. See
    :func:`disable_cpu_weight_repack`."""
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):  # avoid importing bnb otherwise
        disable_cpu_weight_repack(model)


def disable_cpu_weight_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on AVX512-BF16 CPUs; return layers changed.

    On such CPUs, the first eval-mode no-grad forward of a ``Linear4bit`` (``generate()``, an
    evaluation) repacks its weights for a faster kernel that has no backward: afterwards no
    gradient reaches LoRA layers built on it and training silently stops learning. Turning the
    flag off on every layer keeps the autograd-capable path (generation gets ~2x slower).
    :func:`load_model` already does this; call it again on 4-bit models built some other way.
    """
    quiet_bitsandbytes()
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
