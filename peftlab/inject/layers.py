"""What the injector knows about a layer: its kind (linear, Conv1D, convolution, embedding),
its (d_in, d_out) as a matrix, and how to run it with another weight. Nothing model-specific."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import ConfigError

# HF transformers' GPT-2 style `Conv1D` stores its weight as (d_in, d_out); matched by name so
# that this module does not import transformers.
_CONV1D = "Conv1D"
# torch's convolutions, whose weight is (C_out, C_in / groups, *kernel)
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------------------------
# Looking at base layers
# --------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == _CONV1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit/Linear8bitLt subclass it) or HF's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv(module: nn.Module) -> bool:
    """nn.Conv1d, nn.Conv2d or nn.Conv3d (grouped ones included; transposed convolutions are not)."""
    return isinstance(module, CONV_LAYERS)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like or embedding layer, in logical (not packed) units; for a
    convolution (C_in, C_out), its channels (the kernel and groups: :func:`conv_shape`)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        d_in, d_out = module.weight.shape  # Conv1D stores (d_in, d_out)
        return d_in, d_out
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if is_conv(module):
        return module.in_channels, module.out_channels
    raise ConfigError(
        f"{type(module).__name__} is not a layer peftlab can adapt. Expected nn.Linear, "
        "nn.Embedding, transformers' Conv1D or nn.Conv1d/2d/3d. Try targets that name linear "
        "layers, or 'all-linear'."
    )


@dataclass(frozen=True)
class ConvShape:
    """What a convolution adds to (C_in, C_out): its weight is (C_out, C_in / groups, *kernel)."""

    kernel: tuple[int, ...]  # (k,), (kh, kw) or (kd, kh, kw)
    groups: int  # input and output channels split into this many independent groups

    @property
    def taps(self) -> int:
        """K = kd·kh·kw: how many input positions one output position reads per input channel."""
        return math.prod(self.kernel)


def conv_shape(module: nn.Module) -> ConvShape | None:
    """The kernel and groups of an nn.Conv1d/2d/3d; None for any other layer."""
    return ConvShape(tuple(module.kernel_size), module.groups) if is_conv(module) else None


def matrix_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of the layer's weight seen as a matrix. A convolution's weight
    (C_out, C_in/g, *kernel) is a matrix (C_out, C_in/g · K) applied to every patch of its input
    (im2col), so there d_in = C_in/g · K; other layers: :func:`layer_dims`."""
    d_in, d_out = layer_dims(module)
    shape = conv_shape(module)
    return (d_in // shape.groups * shape.taps, d_out) if shape is not None else (d_in, d_out)


def apply_weight(base: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
    """ΔW x for a ΔW in matrix layout (d_out, d_in): a linear map, or, on a convolution, the
    convolution with ΔW reshaped to the weight's shape (same stride, padding, dilation, groups)."""
    if is_conv(base):
        return conv_with(base, x, delta.reshape(base.weight.shape))
    return F.linear(x, delta)


def conv_with(base: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None, **overrides) -> Tensor:
    """``x`` through the convolution ``base`` with another ``weight`` and ``bias`` (default none):
    the same stride, padding, dilation and groups unless ``overrides`` say otherwise."""
    settings = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation,
                "groups": base.groups} | overrides
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]  # weight (C_out, C_in/g, *kernel)
    return conv(x, weight, bias, **settings)


def check_zero_padding(base: nn.Module, method: str) -> None:
    """peft computes a conv adapter's own path with zero padding; with another padding_mode the
    base pads differently, so the merged layer would compute something else: refuse it."""
    if is_conv(base) and base.padding_mode != "zeros":
        raise ConfigError(
            f"{method} on a {type(base).__name__} with padding_mode={base.padding_mode!r} is not "
            "supported: peft's adapter path pads with zeros, so merging would change the output. "
            "Expected padding_mode='zeros'; try other targets."
        )


def embed_scale(base: nn.Module) -> Tensor | None:
    """The constant a scaled embedding multiplies its rows by in its forward (Gemma's √d_model,
    ``embed_scale``), which an adapter's own lookup must apply too; None for a plain embedding."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, dtype=base.weight.dtype, device=base.weight.device)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return scale
    return None


def is_quantized(weight: Tensor) -> bool:
    """True for bitsandbytes' 4-bit parameters (packed uint8 storage plus a quant_state)."""
    return getattr(weight, "quant_state", None) is not None


def dense_weight(module: nn.Module) -> Tensor:
    """The base layer's weight as a float tensor in its own layout, dequantising 4-bit weights."""
    weight = module.weight
    if is_quantized(weight):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight
