"""peft's own test cases, as data: the toy models and configurations of peft's
``tests/test_custom_models.py`` (``TEST_CASES``, huggingface/peft main, December 2026) for the
methods peftlab has, run by ``tests/test_peft_cases.py``.

The table is peft's list, filtered to the config classes of peftlab's methods (LoRA and DoRA,
LoHa, LoKr, OFT, BOFT, IA3, VeRA, AdaLoRA), less 8 cases of LoRA variants the installed peft
(0.21.2) does not have (KaSA, VeLoRA, BD-LoRA, MonteCLoRA). The toy models are written here
with peft's module names and shapes, so a case's ``target_modules`` mean what they mean there.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class MLP(nn.Module):
    """peft's "MLP" (10 -> 20 -> 2) and "MLP2" (10 -> 32 -> 2)."""

    def __init__(self, hidden: int = 20) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, hidden)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(hidden, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class LinearUsingParameter(nn.Module):
    """A linear layer that is not an nn.Linear: y = x W + b, W a bare nn.Parameter (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.ones(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class MLPUsingParameters(MLP):
    """peft's "MlpUsingParameters": the MLP's layers as bare parameters (``target_parameters``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.lin1 = LinearUsingParameter(20, 2)


class EmbConv1D(nn.Module):
    """peft's "EmbConv1D": an embedding (100 x 5), transformers' Conv1D (5 -> 1), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(x))))))


class Conv(nn.Module):
    """A convolution (named conv1d / conv2d / conv3d, as peft's) between ``prepare`` (the input
    reshaped as peft's toy reshapes it) and a linear head; where peft's toy has a linear layer
    before the convolution, it is ``lin0`` and the head is ``lin1``."""

    def __init__(self, conv: nn.Module, prepare, flat: int, before: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.conv_name = f"conv{conv.weight.dim() - 2}d"
        if before is not None:
            self.lin0 = nn.Linear(*before)
        setattr(self, self.conv_name, conv)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.head_name = "lin1" if before is not None else "lin0"
        setattr(self, self.head_name, nn.Linear(flat, 2))
        self.sm = nn.LogSoftmax(dim=-1)
        self.prepare, self.before = prepare, before

    def forward(self, x):
        x = x.float()
        if self.before is not None:
            x = self.relu(self.lin0(x.flatten() if self.before[0] == x.numel() else x))
        x = self.relu(getattr(self, self.conv_name)(self.prepare(x)))
        return self.sm(getattr(self, self.head_name)(self.flat(x)))


def _shape(*shape: int):
    return lambda x: x.reshape(*shape)


def _repeat(channels: int):
    return lambda x: torch.cat([x.reshape(-1, 1, 10)] * channels, dim=1)


def _fixed_image(x):  # peft's Conv2dGroups2 ignores its input and convolves a fixed image
    return torch.arange(9 * 16 * 20 * 20, dtype=torch.float32).view(9, 16, 20, 20) / (9 * 16 * 20 * 20)


def _volume(x):  # a 2-D input stacked into a 3-D volume
    return torch.stack([x] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)


class MHA(nn.Module):
    """peft's "MHA": nn.MultiheadAttention(10, 2 heads) as self-attention, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        x = x.float()
        return self.sm(self.lin0(self.mha(x, x, x)[0]))


TOYS = {
    "MLP": lambda: MLP(),
    "MLP2": lambda: MLP(hidden=32),
    "MLPUsingParameters": MLPUsingParameters,
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: Conv(nn.Conv1d(1, 1, 2), _shape(-1, 1, 10), 9),
    "Conv1dBigger": lambda: Conv(nn.Conv1d(64, 16, 2), _repeat(64), 144),
    "Conv1dGroups": lambda: Conv(nn.Conv1d(8, 8, 3, groups=2), _repeat(8), 64),
    "Conv2d": lambda: Conv(nn.Conv2d(5, 10, 3), _shape(-1, 5, 3, 3), 10),
    "Conv2d1x1": lambda: Conv(nn.Conv2d(1, 10, 1), _shape(-1, 1, 3, 3), 90),
    "Conv2d2": lambda: Conv(nn.Conv2d(8, 32, 3), _shape(-1, 8, 3, 3), 32, before=(10, 40)),
    "Conv2dGroups": lambda: Conv(nn.Conv2d(16, 16, 3, groups=8), _shape(2, 16, 3, 3), 16, before=(90, 288)),
    "Conv2dGroups2": lambda: Conv(nn.Conv2d(16, 32, 3, padding=1, groups=2), _fixed_image, 12800),
    "Conv3d": lambda: Conv(nn.Conv3d(5, 10, 3), _volume, 10),
    "MHA": MHA,
}


def toy_input(toy: str) -> torch.Tensor:
    """peft's input, 9 rows of 10: token ids for the embedding model, numbers in [0, 1) otherwise."""
    x = torch.arange(90).view(9, 10)
    return x % 100 if toy == "EmbConv1D" else x.float() / 90


# (peft's case name, toy model, peft config class, config kwargs)
CASES = [
    ('Vanilla MLP 1 LoRA', 'MLP', 'LoraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'lora_alpha': 4, 'lora_dropout': 0.1}),
    ('Vanilla MLP 7 LoRA with DoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'use_dora': True}),
    ('Vanilla MLP 8 LoRA with DoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0', 'lin1'], 'use_dora': True}),
    ('Vanilla MLP 1 LoRA with MiCA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'init_lora_weights': 'mica', 'r': 4}),
    ('Vanilla MLP 9 LoRA with DoRA', 'MLP', 'LoraConfig', {'target_modules': 'lin1', 'use_dora': True, 'lora_alpha': 32}),
    ('Embedding + transformers Conv1D 1 LoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['conv1d']}),
    ('Embedding + transformers Conv1D 2 LoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['emb']}),
    ('Embedding + transformers Conv1D 3 LoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['emb', 'conv1d']}),
    ('Embedding + transformers Conv1D 1 DoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['conv1d'], 'use_dora': True}),
    ('Embedding + transformers Conv1D 2 DoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['emb'], 'use_dora': True}),
    ('Embedding + transformers Conv1D 3 DoRA', 'EmbConv1D', 'LoraConfig', {'target_modules': ['emb', 'conv1d'], 'use_dora': True}),
    ('Embedding + transformers Conv1D 1 LoRA trainable_tokens', 'EmbConv1D', 'LoraConfig', {'target_modules': ['conv1d'], 'trainable_token_indices': {'emb': [0, 10]}}),
    ('Conv1d LoRA', 'Conv1d', 'LoraConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LoRA with DoRA', 'Conv1d', 'LoraConfig', {'target_modules': ['conv1d'], 'use_dora': True}),
    ('Conv2d 1 LoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 2 LoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d', 'lin0']}),
    ('Conv2d 1 LoRA with DoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d'], 'use_dora': True}),
    ('Conv2d 2 LoRA with DoRA', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d', 'lin0'], 'use_dora': True}),
    ('Conv2d Groups LoRA', 'Conv2dGroups', 'LoraConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups2 LoRA', 'Conv2dGroups2', 'LoraConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups LoRA with DoRA', 'Conv2dGroups', 'LoraConfig', {'target_modules': ['conv2d'], 'use_dora': True}),
    ('Conv2d Groups2 LoRA with DoRA', 'Conv2dGroups2', 'LoraConfig', {'target_modules': ['conv2d'], 'use_dora': True}),
    ('Conv3d 1 LoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d']}),
    ('Conv3d 2 LoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d', 'lin0']}),
    ('Conv3d 1 LoRA with DoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d'], 'use_dora': True}),
    ('Conv3d 2 LoRA with DoRA', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d', 'lin0'], 'use_dora': True}),
    ('Vanilla MLP 1 LoRA with lora_b bias', 'MLP', 'LoraConfig', {'target_modules': ['lin0', 'lin1'], 'lora_bias': True, 'lora_alpha': 32}),
    ('Conv2d 1 LoRA with lora_b bias', 'Conv2d', 'LoraConfig', {'target_modules': ['conv2d'], 'lora_bias': True, 'lora_alpha': 32}),
    ('Conv3d 1 LoRA with lora_b bias', 'Conv3d', 'LoraConfig', {'target_modules': ['conv3d'], 'lora_bias': True, 'lora_alpha': 32}),
    ('MHA 1 LoRA', 'MHA', 'LoraConfig', {'target_modules': ['mha']}),
    ('MHA 2 LoRA', 'MHA', 'LoraConfig', {'target_modules': ['mha', 'lin0']}),
    ('MLP 1 using nn.Parameter LoRA', 'MLPUsingParameters', 'LoraConfig', {'target_parameters': ['lin0.weight']}),
    ('MLP 2 using nn.Parameter LoRA', 'MLP', 'LoraConfig', {'target_modules': ['lin0'], 'target_parameters': ['lin1.weight']}),
    ('Vanilla MLP 1 IA3', 'MLP', 'IA3Config', {'target_modules': 'lin0', 'feedforward_modules': []}),
    ('Vanilla MLP 2 IA3', 'MLP', 'IA3Config', {'target_modules': 'lin0', 'feedforward_modules': 'lin0'}),
    ('Vanilla MLP 3 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0'], 'feedforward_modules': []}),
    ('Vanilla MLP 4 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0'], 'feedforward_modules': ['lin0']}),
    ('Vanilla MLP 5 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin1'], 'feedforward_modules': []}),
    ('Vanilla MLP 6 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin1'], 'feedforward_modules': ['lin1']}),
    ('Vanilla MLP 7 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0', 'lin1'], 'feedforward_modules': []}),
    ('Vanilla MLP 8 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0', 'lin1'], 'feedforward_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 9 IA3', 'MLP', 'IA3Config', {'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'feedforward_modules': ['lin0']}),
    ('transformers Conv1D 1 IA3', 'EmbConv1D', 'IA3Config', {'target_modules': ['conv1d'], 'feedforward_modules': ['conv1d']}),
    ('transformers Conv1D 2 IA3', 'EmbConv1D', 'IA3Config', {'target_modules': ['conv1d', 'lin0'], 'feedforward_modules': ['conv1d', 'lin0']}),
    ('transformers Conv1D 1 IA3', 'EmbConv1D', 'IA3Config', {'target_modules': ['conv1d'], 'feedforward_modules': ['conv1d'], 'modules_to_save': ['lin0']}),
    ('Conv2d 1 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d'], 'feedforward_modules': []}),
    ('Conv2d 2 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d'], 'feedforward_modules': ['conv2d']}),
    ('Conv2d 3 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d', 'lin0'], 'feedforward_modules': []}),
    ('Conv2d 4 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d', 'lin0'], 'feedforward_modules': ['conv2d']}),
    ('Conv2d 5 IA3', 'Conv2d', 'IA3Config', {'target_modules': ['conv2d', 'lin0'], 'feedforward_modules': ['conv2d', 'lin0']}),
    ('Conv3d 1 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d'], 'feedforward_modules': []}),
    ('Conv3d 2 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d'], 'feedforward_modules': ['conv3d']}),
    ('Conv3d 3 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d', 'lin0'], 'feedforward_modules': []}),
    ('Conv3d 4 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d', 'lin0'], 'feedforward_modules': ['conv3d']}),
    ('Conv3d 5 IA3', 'Conv3d', 'IA3Config', {'target_modules': ['conv3d', 'lin0'], 'feedforward_modules': ['conv3d', 'lin0']}),
    ('Vanilla MLP 1 LOHA', 'MLP', 'LoHaConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 LOHA', 'MLP', 'LoHaConfig', {'target_modules': ['lin0'], 'alpha': 4, 'module_dropout': 0.1}),
    ('Vanilla MLP 7 LOHA', 'MLP', 'LoHaConfig', {'target_modules': 'lin0', 'rank_dropout': 0.5}),
    ('Conv2d 1 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 2 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d', 'lin0']}),
    ('Conv2d 3 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d'], 'use_effective_conv2d': True}),
    ('Conv2d 4 LOHA', 'Conv2d', 'LoHaConfig', {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True}),
    ('Conv1d LOHA', 'Conv1d', 'LoHaConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LOHA 1', 'Conv1d', 'LoHaConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LOHA 2', 'Conv1d', 'LoHaConfig', {'target_modules': ['conv1d'], 'r': 2}),
    ('Conv1d Groups LOHA', 'Conv1dGroups', 'LoHaConfig', {'target_modules': ['conv1d'], 'r': 4}),
    ('Conv1d LOHA 3', 'Conv1dBigger', 'LoHaConfig', {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': True}),
    ('Conv1d LOHA 4', 'Conv1dBigger', 'LoHaConfig', {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': False}),
    ('Conv2d 1x1 LOHA', 'Conv2d1x1', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups LOHA', 'Conv2dGroups', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups2 LOHA', 'Conv2dGroups2', 'LoHaConfig', {'target_modules': ['conv2d']}),
    ('Vanilla MLP 1 LOKR', 'MLP', 'LoKrConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Vanilla MLP 6 LOKR', 'MLP', 'LoKrConfig', {'target_modules': ['lin0'], 'alpha': 4, 'module_dropout': 0.1}),
    ('Vanilla MLP 7 LOKR', 'MLP', 'LoKrConfig', {'target_modules': 'lin0', 'rank_dropout': 0.5}),
    ('Vanilla MLP 8 LOKR', 'MLP', 'LoKrConfig', {'target_modules': 'lin0', 'decompose_both': True, 'r': 1, 'alpha': 1}),
    ('Conv1d LOKR 1', 'Conv1d', 'LoKrConfig', {'target_modules': ['conv1d']}),
    ('Conv1d LOKR 2', 'Conv1d', 'LoKrConfig', {'target_modules': ['conv1d'], 'r': 2}),
    ('Conv1d Groups LOKR', 'Conv1dGroups', 'LoKrConfig', {'target_modules': ['conv1d'], 'r': 4}),
    ('Conv1d LOKR 3', 'Conv1dBigger', 'LoKrConfig', {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': True}),
    ('Conv1d LOKR 4', 'Conv1dBigger', 'LoKrConfig', {'target_modules': ['conv1d'], 'r': 2, 'use_effective_conv2d': False}),
    ('Conv2d 1 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 2 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d', 'lin0']}),
    ('Conv2d 3 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d'], 'use_effective_conv2d': True}),
    ('Conv2d 4 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True}),
    ('Conv2d 1x1 LOKR', 'Conv2d1x1', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Conv2d 5 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True, 'decompose_both': True}),
    ('Conv2d 6 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True, 'decompose_factor': 4}),
    ('Conv2d 7 LOKR', 'Conv2d', 'LoKrConfig', {'target_modules': ['conv2d', 'lin0'], 'use_effective_conv2d': True, 'decompose_both': True, 'decompose_factor': 4}),
    ('Conv2d Groups LOKR', 'Conv2dGroups', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Conv2d Groups2 LOKR', 'Conv2dGroups2', 'LoKrConfig', {'target_modules': ['conv2d']}),
    ('Vanilla MLP 1 OFT', 'MLP', 'OFTConfig', {'r': 2, 'oft_block_size': 0, 'target_modules': 'lin0', 'use_cayley_neumann': False}),
    ('Vanilla MLP 2 OFT', 'MLP', 'OFTConfig', {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'use_cayley_neumann': False}),
    ('Vanilla MLP 5 OFT', 'MLP', 'OFTConfig', {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'modules_to_save': ['lin1'], 'use_cayley_neumann': False}),
    ('Vanilla MLP 6 OFT', 'MLP', 'OFTConfig', {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'module_dropout': 0.1, 'use_cayley_neumann': False}),
    ('Vanilla MLP 7 OFT', 'MLP', 'OFTConfig', {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01}),
    ('Vanilla MLP 8 OFT', 'MLP', 'OFTConfig', {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'block_share': True, 'use_cayley_neumann': False}),
    ('Vanilla MLP 9 OFT', 'MLP', 'OFTConfig', {'r': 2, 'oft_block_size': 0, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01, 'block_share': True}),
    ('Vanilla MLP 10 OFT', 'MLP', 'OFTConfig', {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'use_cayley_neumann': True}),
    ('Vanilla MLP 11 OFT', 'MLP', 'OFTConfig', {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'use_cayley_neumann': False}),
    ('Vanilla MLP 12 OFT', 'MLP', 'OFTConfig', {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01, 'block_share': True, 'use_cayley_neumann': True}),
    ('Vanilla MLP 13 OFT', 'MLP', 'OFTConfig', {'r': 0, 'oft_block_size': 2, 'target_modules': ['lin0'], 'coft': True, 'eps': 0.01, 'block_share': True, 'use_cayley_neumann': False}),
    ('Embedding + transformers Conv1D 1 OFT', 'EmbConv1D', 'OFTConfig', {'r': 1, 'oft_block_size': 0, 'target_modules': ['emb']}),
    ('Embedding + transformers Conv1D 2 OFT', 'EmbConv1D', 'OFTConfig', {'r': 1, 'oft_block_size': 0, 'target_modules': ['emb'], 'block_share': True}),
    ('Conv2d 1 OFT', 'Conv2d', 'OFTConfig', {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d']}),
    ('Conv2d 3 OFT', 'Conv2d', 'OFTConfig', {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d'], 'coft': True}),
    ('Conv2d 4 OFT', 'Conv2d', 'OFTConfig', {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d'], 'block_share': True}),
    ('Conv2d 5 OFT', 'Conv2d', 'OFTConfig', {'r': 5, 'oft_block_size': 0, 'target_modules': ['conv2d'], 'coft': True, 'block_share': True}),
    ('Vanilla MLP 1 BOFT', 'MLP', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 2}),
    ('Vanilla MLP 2 BOFT', 'MLP', 'BOFTConfig', {'target_modules': ['lin1'], 'modules_to_save': ['lin0'], 'boft_block_size': 2}),
    ('Vanilla MLP 3 BOFT', 'MLP', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 2, 'boft_dropout': 0.1}),
    ('Vanilla MLP 4 BOFT', 'MLP', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 1}),
    ('Vanilla MLP 5 BOFT', 'MLP', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 0, 'boft_block_num': 2, 'boft_n_butterfly_factor': 1}),
    ('Vanilla MLP 6 BOFT', 'MLP', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 10, 'boft_block_num': 0, 'boft_n_butterfly_factor': 2}),
    ('Conv2d 1 BOFT', 'Conv2d', 'BOFTConfig', {'target_modules': ['conv2d'], 'boft_block_size': 45, 'boft_block_num': 0, 'boft_n_butterfly_factor': 1}),
    ('Conv2d 2 BOFT', 'Conv2d', 'BOFTConfig', {'target_modules': ['conv2d'], 'boft_block_size': 0, 'boft_block_num': 1, 'boft_n_butterfly_factor': 1}),
    ('MLP2 1 BOFT', 'MLP2', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 3}),
    ('MLP2 2 BOFT', 'MLP2', 'BOFTConfig', {'target_modules': ['lin1'], 'boft_block_size': 0, 'boft_block_num': 8, 'boft_n_butterfly_factor': 3}),
    ('Conv2d2 1 BOFT', 'Conv2d2', 'BOFTConfig', {'target_modules': ['conv2d'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 2}),
    ('Conv2d2 1 BOFT', 'Conv2d2', 'BOFTConfig', {'target_modules': ['conv2d'], 'boft_block_size': 2, 'boft_block_num': 0, 'boft_n_butterfly_factor': 3}),
    ('Vanilla MLP 1 VeRA', 'MLP', 'VeraConfig', {'target_modules': 'lin0'}),
    ('Vanilla MLP 2 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin0']}),
    ('Vanilla MLP 3 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin1']}),
    ('Vanilla MLP 4 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin0', 'lin1']}),
    ('Vanilla MLP 5 VeRA', 'MLP', 'VeraConfig', {'target_modules': ['lin0'], 'modules_to_save': ['lin1']}),
    ('Embedding + transformers Conv1D 1 VeRA', 'EmbConv1D', 'VeraConfig', {'target_modules': ['conv1d']}),
    ('Vanilla MLP 1 AdaLoRA', 'MLP', 'AdaLoraConfig', {'target_modules': ['lin0'], 'init_lora_weights': False, 'total_step': 1, 'orth_reg_weight': 0}),
    ('Vanilla MLP 2 AdaLoRA', 'MLP', 'AdaLoraConfig', {'target_modules': ['lin0', 'lin1'], 'init_lora_weights': False, 'total_step': 1}),
    ('Conv2d 1 AdaLoRA', 'Conv2d', 'AdaLoraConfig', {'target_modules': ['conv2d'], 'init_lora_weights': False, 'total_step': 1}),
    ('Conv2d 2 AdaLoRA', 'Conv2d', 'AdaLoraConfig', {'target_modules': ['conv2d', 'lin0'], 'init_lora_weights': False, 'total_step': 1}),
]
