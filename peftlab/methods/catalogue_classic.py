"""The classic methods' entries of the registry: LoRA and its variants and inits, the
orthogonal and adaptive families, soft prompts, (IA)3, BitFit, adapters and X-LoRA.

Adding a method is one file in this folder plus one entry in a catalogue; nothing registers
itself on import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers
from peftlab.methods.registry import (ATTENTION_QV, DECODER_ARCHITECTURES, FORMULA_ARCHITECTURES, HOOKS, Method,
                                      layer_method)
from peftlab.methods.adalora import AdaLoRAConfig, adalora_parameter_count, build_adalora
from peftlab.methods.bitfit import BitFitConfig, bitfit_parameter_count, build_bitfit
from peftlab.methods.bottleneck import BOTTLENECK_TARGETS, BottleneckConfig, bottleneck_parameter_count, build_bottleneck
from peftlab.methods.boft import BOFT, BOFTConfig, boft_parameter_count
from peftlab.methods.boft import as_saved as boft_as_saved
from peftlab.methods.dora import ConvDoRA, DoRA, DoRAConfig, dora_parameter_count
from peftlab.methods.ia3 import IA3_TARGETS, IA3Config, build_ia3, ia3_parameter_count, resolve_ia3
from peftlab.methods.llama_adapter import (ATTENTION_TARGETS, LlamaAdapterConfig, build_llama_adapter,
                                          llama_adapter_parameter_count, resolve_llama_adapter)
from peftlab.methods.loha import LoHa, LoHaConfig, loha_parameter_count
from peftlab.methods.lokr import LoKr, LoKrConfig, lokr_parameter_count
from peftlab.methods.lora import ConvLoRA, LoftQConfig, LoRA, LoRAConfig, MultiheadAttentionLoRA, lora_parameter_count
from peftlab.methods.lora import OLoRAConfig, PiSSAConfig
from peftlab.methods.lora_data_init import CordaConfig, LoraGAConfig, build_corda, build_lora_ga
from peftlab.methods.lora_eva import EvaConfig, build_eva, eva_parameter_count, prepare_eva
from peftlab.methods.lora_init import DATA_INITS
from peftlab.methods.param_lora import add_parameter_lora
from peftlab.methods.trainable_tokens import add_trainable_tokens
from peftlab.methods.oft import OFT, OFTConfig, oft_embedding_parameter_count, oft_parameter_count
from peftlab.methods.p_tuning import PTuningConfig, build_p_tuning, p_tuning_parameter_count
from peftlab.methods.prefix_tuning import (PrefixTuningConfig, build_prefix_tuning, prefix_tuning_parameter_count,
                                          resolve_prefix_tuning)
from peftlab.methods.prompt_tuning import PromptTuningConfig, build_prompt_tuning, prompt_tuning_parameter_count
from peftlab.methods.vera import VeRAConfig, build_vera
from peftlab.methods.xlora import XLoRAConfig, build_xlora, xlora_parameter_count


_LORA_LAYERS = layer_method(LoRA, conv=ConvLoRA, others=(MultiheadAttentionLoRA,))


def build_lora(model: nn.Module, config: LoRAConfig, adapter_name: str) -> None:
    """LoRA on its target layers, then peft's two extras that ride on a LoRA adapter: LoRA on
    bare parameters (``target_parameters``, MoE experts; ``targets=()`` when only those are
    targeted) and a few trained embedding rows (``trainable_token_indices``)."""
    if config.init in DATA_INITS:  # their data lives on their own methods' configs
        raise ConfigError(
            f"LoRA init={config.init!r} learns its start from data, which method 'lora' has no field for. "
            f"Expected the method of that name; try peftlab.adapt(model, {config.init!r}, data=batches)."
        )
    if config.targets != ():
        _LORA_LAYERS(model, config, adapter_name)
    if config.target_parameters:
        add_parameter_lora(model, config, adapter_name)
    if config.trainable_token_indices:
        adapted = [n for n, layer in adapted_layers(model).items() if adapter_name in layer.adapters]
        add_trainable_tokens(model, config.trainable_token_indices, adapter_name, adapted)


def lora_init_method(name: str, config: type[LoRAConfig], build: Callable, description: str, paper: str,
                     formula_note: str) -> Method:
    """A LoRA whose start is chosen (methods/lora_init.py): LoRA's shapes, counts and peft type."""
    return Method(name=name, config=config, build=build, family="reparameterisation", description=description,
                  paper=paper, formula=f"r · (d_in + d_out) per adapted layer (as LoRA; {formula_note})",
                  params_per_layer=lambda d_in, d_out, c: c.r * (d_in + d_out), mergeable=True,
                  peft_type="LORA",  # peft: LoraConfig(init_lora_weights=<name>); saved as a LoRA on W_res
                  activation_formula=FORMULA_ARCHITECTURES, shapes_like="lora")



CLASSIC_METHODS: dict[str, Method] = {
    "lora": Method(
        name="lora",
        config=LoRAConfig,
        build=build_lora,
        family="reparameterisation",
        description="Learn a low-rank update B A beside each frozen weight: W0 + (alpha/r) B A.",
        paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, https://arxiv.org/abs/2106.09685",
        formula="r · (d_in + d_out) per adapted layer, + d_out with lora_bias (a convolution: r · (C_in · K + C_out / groups), K = kernel size; an nn.MultiheadAttention counts as its in_proj E -> 3E and out_proj E -> E)",
        params_per_layer=lora_parameter_count,
        mergeable=True,
        peft_type="LORA",
        activation_formula=FORMULA_ARCHITECTURES,
    ),
    "oft": Method(
        name="oft",
        config=OFTConfig,
        build=layer_method(OFT),
        family="orthogonal",
        description="Rotate each layer's inputs by a learned block-diagonal orthogonal R: W' = R W0.",
        paper="Qiu et al. 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning, https://arxiv.org/abs/2306.07280",
        formula="(d_in / b) · b(b-1)/2 per adapted layer, b = block size (b(b-1)/2 with block_share; a convolution: d_in = C_in · K, K = kernel size; an embedding: d_in = embedding_dim)",
        params_per_layer=oft_parameter_count,
        params_per_embedding=oft_embedding_parameter_count,
        mergeable=True,
        peft_type="OFT",
    ),
    "boft": Method(
        name="boft",
        config=BOFTConfig,
        build=layer_method(BOFT),
        family="orthogonal",
        description="Orthogonal finetuning with a dense R built from m sparse butterfly factors, plus an output scale.",
        paper="Liu et al. 2023, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization, https://arxiv.org/abs/2311.06243",
        formula="m · d_in · b + d_out per adapted layer (m butterfly factors of d_in / b blocks of b x b, scale s)",
        params_per_layer=boft_parameter_count,
        mergeable=True,
        peft_type="BOFT",
        as_saved=boft_as_saved,
    ),
    "dora": Method(
        name="dora",
        config=DoRAConfig,
        build=layer_method(DoRA, conv=ConvDoRA),
        family="reparameterisation",
        description="Split each weight into magnitude m and direction; train m and a LoRA update of the direction.",
        paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, https://arxiv.org/abs/2402.09353",
        formula="r · (d_in + d_out) + d_out per adapted layer (LoRA's A, B plus one magnitude per output)",
        params_per_layer=dora_parameter_count,
        mergeable=True,
        peft_type="LORA",  # peft: LoraConfig(use_dora=True)
        activation_formula=FORMULA_ARCHITECTURES,
    ),
    "loha": Method(
        name="loha",
        config=LoHaConfig,
        build=layer_method(LoHa),
        family="reparameterisation",
        description="Update each weight by the Hadamard product of two low-rank products: rank up to r².",
        paper="Hyeon-Woo et al. 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning, https://arxiv.org/abs/2108.06098",
        formula="2 · r · (d_in + d_out) per adapted layer (a convolution: d_in = C_in / groups · K, K = kernel size; with use_effective_conv2d and K > 1: 2 · (r² · K + r · (C_in / groups + C_out)))",
        params_per_layer=loha_parameter_count,
        mergeable=True,
        peft_type="LOHA",
        activation_formula=FORMULA_ARCHITECTURES,
    ),
    "lokr": Method(
        name="lokr",
        config=LoKrConfig,
        build=layer_method(LoKr),
        family="reparameterisation",
        description="Update each weight by a Kronecker product W1 ⊗ W2 of a small and a (low-rank) larger matrix.",
        paper="Edalati et al. 2022, KronA: Parameter-Efficient Tuning with Kronecker Adapter, https://arxiv.org/abs/2212.10650",
        formula="a·c + b·d per adapted layer, d_out = a·b, d_in = c·d (a factor is r·(rows + cols) where low-rank; a convolution: d_in = C_in / groups, W2 is b·d·K, K = kernel size, or r²·K + r·(b + d) low-rank with use_effective_conv2d and K > 1)",
        params_per_layer=lokr_parameter_count,
        mergeable=True,
        peft_type="LOKR",
        activation_formula=FORMULA_ARCHITECTURES,
    ),
    "vera": Method(
        name="vera",
        config=VeRAConfig,
        build=build_vera,
        family="reparameterisation",
        description="Share one frozen random pair A, B across layers; train only two scaling vectors per layer.",
        paper="Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation, https://arxiv.org/abs/2310.11454",
        formula="d_out + r per adapted layer (the shared random A, B are frozen)",
        params_per_layer=lambda d_in, d_out, c: d_out + c.r,
        mergeable=True,
        peft_type="VERA",
        activation_formula=FORMULA_ARCHITECTURES,
        default_targets={**ATTENTION_QV, "phi": ("q_proj", "v_proj")},  # peft adds phi for VeRA
    ),
    "adalora": Method(
        name="adalora",
        config=AdaLoRAConfig,
        build=build_adalora,
        family="adaptive",
        description="LoRA in SVD form P Λ Q; prunes the least important singular values so the rank budget moves to the layers that need it.",
        paper="Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, https://arxiv.org/abs/2303.10512",
        formula="init_r · (d_in + d_out + 1) per adapted layer (P, Q and the init_r values Λ; pruning zeroes values, the tensors keep their size)",
        params_per_layer=adalora_parameter_count,
        mergeable=True,
        peft_type="ADALORA",
        activation_formula=FORMULA_ARCHITECTURES,
    ),
    "loftq": Method(
        name="loftq",
        config=LoftQConfig,
        build=layer_method(LoRA),
        family="reparameterisation",
        description="LoRA whose start is chosen with the NF4 base: alternate quantising W - B A and an SVD of W - Q, so Q + B A ≈ W.",
        paper="Li et al. 2023, LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models, https://arxiv.org/abs/2310.08659",
        formula="r · (d_in + d_out) per adapted layer (as LoRA; the base weight becomes its NF4 version)",
        params_per_layer=lambda d_in, d_out, c: c.r * (d_in + d_out),
        mergeable=True,
        peft_type="LORA",  # peft: LoraConfig(init_lora_weights="loftq", loftq_config=...)
        activation_formula=FORMULA_ARCHITECTURES,
        shapes_like="lora",
    ),
    "pissa": lora_init_method(
        "pissa", PiSSAConfig, layer_method(LoRA),
        "LoRA started on W's r principal singular directions (B A = U_r S_r V_rᵀ); the frozen base keeps the rest.",
        "Meng et al. 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models, https://arxiv.org/abs/2404.02948",
        "the base weight becomes the residual W - s B0 A0"),
    "olora": lora_init_method(
        "olora", OLoRAConfig, layer_method(LoRA),
        "LoRA started from W's QR decomposition (B = Q_r orthonormal, A = R_r); the frozen base keeps W - s B A.",
        "Büyükakyüz 2024, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models, https://arxiv.org/abs/2406.01775",
        "the base weight becomes the residual W - s B0 A0"),
    "lora_ga": lora_init_method(
        "lora_ga", LoraGAConfig, build_lora_ga,
        "LoRA started along the SVD of the loss gradient on a few batches (data=...), so its first step follows full fine-tuning's.",
        "Wang et al. 2024, LoRA-GA: Low-Rank Adaptation with Gradient Approximation, https://arxiv.org/abs/2407.05000",
        "the base weight becomes the residual W - s B0 A0"),
    "eva": dataclasses.replace(lora_init_method(
        "eva", EvaConfig, build_eva,
        "LoRA whose A starts on the principal directions of each layer's inputs over a few batches (data=...), the rank budget moved to the layers that explain the most variance.",
        "Paischer et al. 2024, One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation, https://arxiv.org/abs/2410.07170",
        ""), formula="r_l · (d_in + d_out) per adapted layer: EVA redistributes the budget Σ r (r per target), "
                     "r_l <= rho · r, and a layer with r_l = 0 is not adapted",
        params_per_layer=None, parameter_count=eva_parameter_count, hooks={"prepare": prepare_eva}),
    "corda": lora_init_method(
        "corda", CordaConfig, build_corda,
        "LoRA started from the SVD of W times its inputs' covariance on a few rows (data=...): the task's directions (ipm) or W's least used ones (kpm).",
        "Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models, https://arxiv.org/abs/2406.05223",
        "the base weight becomes the residual W - s B0 A0"),
    "prompt_tuning": Method(
        name="prompt_tuning",
        config=PromptTuningConfig,
        build=build_prompt_tuning,
        family="soft prompt",
        description="Learn n virtual-token embeddings read before every input; the model stays frozen.",
        paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, https://arxiv.org/abs/2104.08691",
        formula="n · d_model in all (n virtual tokens)",
        params_per_layer=None,
        mergeable=False,
        peft_type="PROMPT_TUNING",
        activation_formula=FORMULA_ARCHITECTURES,
        default_targets={},
        parameter_count=prompt_tuning_parameter_count,
    ),
    "prefix_tuning": Method(
        name="prefix_tuning",
        config=PrefixTuningConfig,
        build=build_prefix_tuning,
        family="soft prompt",
        description="Learn n key/value vectors put before every attention layer's own (optionally through an MLP).",
        paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, https://arxiv.org/abs/2101.00190",
        formula="n · 2 · layers · d_kv in all (d_kv = kv heads · head dim); with prefix_projection: n·d_kv + (d_kv·k + k) + (k + 1)·2·layers·d_kv",
        params_per_layer=None,
        mergeable=False,
        peft_type="PREFIX_TUNING",
        activation_formula=DECODER_ARCHITECTURES,
        default_targets={},
        resolve=resolve_prefix_tuning,
        parameter_count=prefix_tuning_parameter_count,
    ),
    "p_tuning": Method(
        name="p_tuning",
        config=PTuningConfig,
        build=build_p_tuning,
        family="soft prompt",
        description="Virtual-token embeddings produced by a small trained encoder (MLP or LSTM) from free inputs.",
        paper="Liu et al. 2021, GPT Understands, Too, https://arxiv.org/abs/2103.10385",
        formula="n · d_model + the encoder (MLP: d·k + k + k·k + k + k·d + d, k = encoder_hidden_size)",
        params_per_layer=None,
        mergeable=False,
        peft_type="P_TUNING",
        activation_formula=FORMULA_ARCHITECTURES,
        default_targets={},
        parameter_count=p_tuning_parameter_count,
    ),
    "ia3": Method(
        name="ia3",
        config=IA3Config,
        build=build_ia3,
        family="rescaling",
        description="Learn one vector per layer that rescales keys, values (outputs) and the feed-forward inner activation (input): l ⊙ h.",
        paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning, https://arxiv.org/abs/2205.05638",
        formula="d_out per output-scaled layer (k, v), d_in per feed-forward layer (input-scaled)",
        params_per_layer=None,  # d_in or d_out, depending on whether the layer is feed-forward
        mergeable=True,
        peft_type="IA3",
        activation_formula=FORMULA_ARCHITECTURES,
        default_targets=IA3_TARGETS,
        resolve=resolve_ia3,
        parameter_count=ia3_parameter_count,
    ),
    "bitfit": Method(
        name="bitfit",
        config=BitFitConfig,
        build=build_bitfit,
        family="selective",
        description="Train only the bias terms (optionally the norm weights too); every weight matrix stays frozen.",
        paper="Ben Zaken et al. 2021, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models, https://arxiv.org/abs/2106.10199",
        formula="the sum of the selected biases' sizes (d_out per linear layer, d per LayerNorm; + d per norm weight with include_norms)",
        params_per_layer=None,  # a bias per module, and modules are not only linear layers
        mergeable=True,
        peft_type=None,  # production path: peftlab.production.merged.bitfit (plain requires_grad)
        activation_formula=FORMULA_ARCHITECTURES,
        default_targets={},  # BitFitConfig's own default, targets=".*": every module's bias
        parameter_count=bitfit_parameter_count,
    ),
    "bottleneck": Method(
        name="bottleneck",
        config=BottleneckConfig,
        build=build_bottleneck,
        family="additive",
        description="A small down-f-up MLP on each attention and feed-forward sublayer: after it, on its output (kind='houlsby'), or beside it, from its input (kind='parallel').",
        paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP, https://arxiv.org/abs/1902.00751; He et al. 2021, Towards a Unified View of Parameter-Efficient Transfer Learning, https://arxiv.org/abs/2110.04366",
        formula="2 · r · d_out + r + d_out per layer (houlsby); r · (d_model + d_out) + r + d_out (parallel, d_model: the sublayer input's width); r = d_out // reduction_factor unless given",
        params_per_layer=None,  # parallel: down's width is the sublayer's input, not the layer's
        mergeable=False,
        peft_type=None,  # production path: peftlab.production.merged.fuse_bottleneck
        default_targets=BOTTLENECK_TARGETS,
        parameter_count=bottleneck_parameter_count,
    ),
    "llama_adapter": Method(
        name="llama_adapter",
        config=LlamaAdapterConfig,
        build=build_llama_adapter,
        family="additive",
        description="Learnable prompts that the top layers' attention also attends to, through a gate that starts at zero.",
        paper="Zhang et al. 2023, LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention, https://arxiv.org/abs/2303.16199",
        formula="adapter_layers · (adapter_len · d_model + 1): K prompt vectors and one gate per adapted layer",
        params_per_layer=None,  # per attention module, not per linear layer
        mergeable=False,
        peft_type="ADAPTION_PROMPT",
        default_targets=ATTENTION_TARGETS,
        resolve=resolve_llama_adapter,
        parameter_count=llama_adapter_parameter_count,
    ),
    "xlora": Method(
        name="xlora",
        config=XLoRAConfig,
        build=build_xlora,
        family="mixture",
        description="Mix several LoRA experts per token and per layer with weights a small router predicts from a first pass.",
        paper="Buehler & Buehler 2024, X-LoRA: Mixture of Low-Rank Adapter Experts, https://arxiv.org/abs/2402.07148",
        formula="the router: d_model · n_experts + n_experts (xlora_depth=1; · layers with layerwise_scalings), + the experts' LoRA counts when they train",
        params_per_layer=None,  # the router is per model; the experts are ordinary LoRA adapters
        mergeable=False,
        peft_type="XLORA",
        parameter_count=xlora_parameter_count,
        needs=HOOKS,  # experts from files, peft's folder layout: peftlab/xlora_io.py
        hooks_from="peftlab.xlora_io",
    ),
}
