"""Loading a model and its tokenizer: a bundled name, a local folder or a hub id.

:func:`load_model` checks its arguments, then takes one of three routes: a bundled model (from
the conversion cache, NF4 cached too on the CPU), a local Hugging Face folder, or a hub id (the
hub cache first; the network only when it can be reached). Every route ends in
``from_pretrained`` with peftlab's defaults and a tokenizer that has a pad token.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.errors import ConfigError, OfflineError, UnknownNameError, closest
from peftlab.models.cache import (cached_folder, convert_smollm2, minilm_dir, minilm_tokenizer, smollm2_folder_name,
                                  smollm2_tokenizer)
from peftlab.models.catalogue import (BUNDLED, BUNDLED_MODELS, CAUSAL_LM, SEQ2SEQ_LM, SEQUENCE_CLASSIFICATION,
                                      TASKS)
from peftlab.models.hub import is_offline
from peftlab.models.nf4 import disable_cpu_weight_repack, nf4_config
from peftlab.models.quiet import quiet_bitsandbytes, quiet_transformers
from peftlab.models.tiny import tiny_bert, tiny_llama

if TYPE_CHECKING:  # type hints only; transformers loads when first used
    from transformers import PreTrainedTokenizerBase


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

    if name in BUNDLED:
        entry = BUNDLED[name]
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
        folder = cached_folder(smollm2_folder_name(), convert_smollm2)
        if quantization == "nf4" and device.type == "cpu":
            # Quantizing 106M weights to NF4 takes bitsandbytes' CPU code ~20 s; do it once and
            # cache the packed result (one folder per dtype: the codes depend on the input dtype).
            def quantize(out: Path) -> None:
                save_nf4(folder, out, dtype, CAUSAL_LM)

            dtype_name = str(dtype).removeprefix("torch.")
            folder = cached_folder(smollm2_folder_name(f"nf4-{dtype_name}"), quantize)
            quantization = None  # the folder is already quantized (its config says so)
        return _load_folder(folder, quantization, dtype, None, CAUSAL_LM, device, local_only=True)
    if name == "minilm-l6":
        # the classification head is new and random: seed it so two loads are identical
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _load_folder(minilm_dir(), quantization, dtype, num_labels or 2,
                                SEQUENCE_CLASSIFICATION, device, local_only=True)
    if name == "tiny-llama":
        model, tokenizer = tiny_llama(), smollm2_tokenizer()
    else:
        model, tokenizer = tiny_bert(num_labels or 2), minilm_tokenizer()
    if quantization is None:
        return model.to(device=device, dtype=dtype), tokenizer
    # bitsandbytes quantizes while loading weights from disk: round-trip the tiny model through
    # a temporary folder (a few MB, well under a second) so NF4 works on it too.
    with tempfile.TemporaryDirectory(prefix="peftlab-tiny-") as tmp, quiet_transformers():
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
        kwargs["quantization_config"] = nf4_config(dtype)
    if quantization == "nf4" or prequantized:
        quiet_bitsandbytes()
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes as weights reach the device
    with quiet_transformers():
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


def save_nf4(source: Path, out: Path, dtype: torch.dtype, task: str) -> None:
    """Quantize the model in ``source`` to NF4 on the CPU and save it, packed, into ``out``.

    Loading ``out`` later skips the quantization and gives bit-identical 4-bit weights.
    """
    model, tokenizer = _load_folder(source, "nf4", dtype, None, task, torch.device("cpu"),
                                    local_only=True)
    with quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
