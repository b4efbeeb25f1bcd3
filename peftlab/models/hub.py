"""Hub ids, offline first: whether the hub can be reached, and a model's config without its weights.

A name that is not bundled and not a local folder is a Hugging Face hub id. What the local hub
cache holds is answered with no network at all; otherwise :func:`is_offline` decides, within a
couple of seconds even on a black-holed network, whether asking the hub is worth trying.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from peftlab.errors import ConfigError, OfflineError
from peftlab.models.cache import COMPLETE, cache_dir, minilm_dir, smollm2_folder_name, smollm2_gguf
from peftlab.models.catalogue import BUNDLED_MODELS
from peftlab.models.tiny import tiny_bert_config, tiny_llama_config

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
        return tiny_llama_config()
    if name == "tiny-bert":
        return tiny_bert_config(num_labels or 2)
    if name == "minilm-l6":
        return AutoConfig.from_pretrained(minilm_dir(), num_labels=num_labels or 2)
    if name == "smollm2-135m":
        folder = cache_dir() / smollm2_folder_name()
        if (folder / COMPLETE).exists():
            return AutoConfig.from_pretrained(folder)
        gguf = smollm2_gguf()  # metadata only: the tensors are not read
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
