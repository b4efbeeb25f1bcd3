"""Quiet loading: transformers' and bitsandbytes' notices about what peftlab does on purpose.

A fresh classification head on a pretrained encoder, a dequantized GGUF file, bitsandbytes failing
to fetch optional CPU kernels offline: each is expected, so its warning would only alarm learners.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
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
    # TQDM_DISABLE in a notebook. It runs on the first load only (the ~40 s conversion), where a
    # bar helps: shown unless peftlab.progress says quiet (TQDM_DISABLE, CI).
    from peftlab.progress import progress_disabled

    gguf_bar = getattr(gguf_utils, "tqdm", None)
    if gguf_bar is not None:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=progress_disabled())
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar


def quiet_bitsandbytes() -> None:
    """Silence the bitsandbytes CPU backend's import-time log line (a missing optional kernel)."""
    # On CPU bitsandbytes tries to fetch optional kernels from the hub and logs the failure at
    # import; offline (and without the `kernels` package) that line is noise, so silence it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
