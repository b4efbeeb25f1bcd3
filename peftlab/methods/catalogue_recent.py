"""The registry's entries for peft's newer families (2024-2026): HRA, HiRA, C3A, RoAd, MiSS,
FourierFT, SHiRA, VBLoRA, LN tuning, trainable tokens and the others added since.

Adding a method is one file in this folder plus one entry here; nothing registers itself on import.
"""

from __future__ import annotations

from peftlab.methods.registry import ATTENTION_QV, Method, layer_method
from peftlab.methods.trainable_tokens import (TrainableTokensConfig, build_trainable_tokens, resolve_trainable_tokens,
                                             trainable_tokens_parameter_count)
from peftlab.methods.fourierft import FourierFTConfig, build_fourierft, fourierft_parameter_count
from peftlab.methods.hra import HRA, HRAConfig, hra_parameter_count
from peftlab.methods.hira import HiRA, HiraConfig, hira_parameter_count
from peftlab.methods.c3a import C3A, C3AConfig, c3a_parameter_count
from peftlab.methods.miss import MiSS, MissConfig, miss_parameter_count
from peftlab.methods.road import RoAd, RoadConfig, road_parameter_count
from peftlab.methods.shira import SHiRA, ShiraConfig, shira_parameter_count
from peftlab.methods.vblora import VBLoRAConfig, build_vblora, vblora_parameter_count
from peftlab.methods.ln_tuning import (LN_TUNING_TARGETS, LNTuningConfig, build_ln_tuning,
                                      ln_tuning_parameter_count, resolve_ln_tuning)


RECENT_METHODS: dict[str, Method] = {
    "hra": Method(
        name="hra",
        config=HRAConfig,
        build=layer_method(HRA),
        family="orthogonal",
        description="Multiply each weight by a chain of r learned Householder reflections: W' = W0 H, H = ∏ (I - 2 u uᵀ), orthogonal and of low-rank change.",
        paper="Yuan et al. 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation, https://arxiv.org/abs/2405.17484",
        formula="r · d_in per adapted layer (r reflection vectors of length d_in)",
        params_per_layer=hra_parameter_count,
        mergeable=True,
        peft_type="HRA",
    ),
    "hira": Method(
        name="hira",
        config=HiraConfig,
        build=layer_method(HiRA),
        family="reparameterisation",
        description="Multiply the frozen weight element-wise by a low-rank product: h = W0 x + (W0 ⊙ B A) x, a high-rank update for LoRA's parameter count.",
        paper="Huang et al. 2025, HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models, https://openreview.net/forum?id=TwJrTz9cRS",
        formula="r · (d_in + d_out) per adapted layer (A: r x d_in, B: d_out x r, as LoRA)",
        params_per_layer=hira_parameter_count,
        mergeable=True,
        peft_type="HIRA",
    ),
    "c3a": Method(
        name="c3a",
        config=C3AConfig,
        build=layer_method(C3A),
        family="reparameterisation",
        description="Add a block-circulant update computed by FFT circular convolutions: Δh_m = Σ_n w_mn ⊛ x_n / d_in, one kernel of b numbers per block pair.",
        paper="Chen et al. 2025, Parameter-Efficient Fine-Tuning via Circular Convolution, https://arxiv.org/abs/2407.19342",
        formula="d_in · d_out / b per adapted layer (one kernel of b numbers per b x b block)",
        params_per_layer=c3a_parameter_count,
        mergeable=True,
        peft_type="C3A",
    ),
    "road": Method(
        name="road",
        config=RoadConfig,
        build=layer_method(RoAd),
        family="rescaling",
        description="Rotate and scale pairs of each layer's output features by learned angles θ and scales α: h = R (W0 x + b).",
        paper="Liao et al. 2024, 3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and Composability, https://arxiv.org/abs/2409.00119",
        formula="d_out per adapted layer for road_1 (θ and α, d_out / 2 each); 2 · d_out for road_2; 4 · d_out for road_4",
        params_per_layer=road_parameter_count,
        mergeable=True,
        peft_type="ROAD",
    ),
    "miss": Method(
        name="miss",
        config=MissConfig,
        build=layer_method(MiSS),
        family="reparameterisation",
        description="One trained shard D (r x d_out) shared by every block of r input columns: h = W0 x + Dᵀ (sum of x's r-chunks).",
        paper="Kang et al. 2024, MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing, https://arxiv.org/abs/2409.15371",
        formula="r · d_out per adapted layer (init_weights='mini': r · mini_r; 'bat': (d_out / r) blocks of r x r)",
        params_per_layer=miss_parameter_count,
        mergeable=True,
        peft_type="MISS",
    ),
    "fourierft": Method(
        name="fourierft",
        config=FourierFTConfig,
        build=build_fourierft,
        family="reparameterisation",
        description="Learn n spectral coefficients at fixed random frequencies; ΔW is their inverse 2D Fourier transform.",
        paper="Gao et al. 2024, Parameter-Efficient Fine-Tuning with Discrete Fourier Transform, https://arxiv.org/abs/2405.03003",
        formula="n_frequency per adapted layer, whatever its shape (n_frequency_pattern's n where it names the layer; the random frequency locations come from a seed)",
        params_per_layer=None,  # n_frequency_pattern sets n by the layer's name
        mergeable=True,
        peft_type="FOURIERFT",
        parameter_count=fourierft_parameter_count,
        default_targets={**ATTENTION_QV, "gpt2": ("mlp.c_proj",)},  # peft's FourierFT default for GPT-2
    ),
    "shira": Method(
        name="shira",
        config=ShiraConfig,
        build=layer_method(SHiRA),
        family="selective",
        description="Train a fixed random sparse subset of each weight's own entries, r · (d_in + d_out) of them: a sparse, high-rank ΔW.",
        paper="Bhardwaj et al. 2024, Sparse High Rank Adapters, https://arxiv.org/abs/2406.13175",
        formula="r · (d_in + d_out) per adapted layer (LoRA's count at rank r, as sparse entries; the mask's indices are saved, not trained)",
        params_per_layer=shira_parameter_count,
        mergeable=True,
        peft_type="SHIRA",
        default_targets={**ATTENTION_QV, "phi": ("q_proj", "v_proj")},  # peft adds phi for SHiRA
    ),
    "vblora": Method(
        name="vblora",
        config=VBLoRAConfig,
        build=build_vblora,
        family="reparameterisation",
        description="LoRA whose factors are cut into sub-vectors, each a top-k softmax mix of vectors from one bank all layers share.",
        paper="Li et al. 2024, VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks, https://arxiv.org/abs/2405.15179",
        formula="num_vectors · vector_length for the shared bank, + num_vectors · r · (d_in + d_out) / vector_length logits per adapted layer",
        params_per_layer=None,  # the bank is shared by all layers
        mergeable=True,
        peft_type="VBLORA",
        parameter_count=vblora_parameter_count,
        # peft's own VB-LoRA defaults: OPT adapts every projection and both feed-forward layers
        default_targets={**ATTENTION_QV, "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")},
    ),
    "ln_tuning": Method(
        name="ln_tuning",
        config=LNTuningConfig,
        build=build_ln_tuning,
        family="selective",
        description="Train only the normalisation layers' gains (and biases): every weight matrix stays frozen.",
        paper="Zhao et al. 2023, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning, https://arxiv.org/abs/2312.11420",
        formula="the targeted norm layers' own tensors: d per RMSNorm, 2 · d per LayerNorm (γ and β)",
        params_per_layer=None,  # a norm layer has no (d_in, d_out)
        mergeable=True,
        peft_type="LN_TUNING",
        default_targets=LN_TUNING_TARGETS,  # elsewhere "all-linear", which resolve reads as every norm layer
        resolve=resolve_ln_tuning,
        parameter_count=ln_tuning_parameter_count,
    ),
    "trainable_tokens": Method(
        name="trainable_tokens",
        config=TrainableTokensConfig,
        build=build_trainable_tokens,
        family="selective",
        description="Train only the embedding rows of a few chosen tokens (new or under-trained ones); a tied output head reads the same rows.",
        paper="peft's TrainableTokens (Hugging Face, 2025), https://huggingface.co/docs/peft/package_reference/trainable_tokens",
        formula="k · d per targeted embedding (k = len(token_indices), d its width; a tied head adds none)",
        params_per_layer=None,  # rows of an embedding, not a (d_in, d_out) layer's count
        mergeable=False,  # kept unmerged: peftlab merges no weight a tied head shares (methods/trainable_tokens.py)
        peft_type="TRAINABLE_TOKENS",
        default_targets={},  # the input embedding (resolve), whatever the architecture
        resolve=resolve_trainable_tokens,
        parameter_count=trainable_tokens_parameter_count,
    ),
}
