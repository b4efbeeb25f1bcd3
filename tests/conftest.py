"""Shared pytest fixtures. Engineers ADD fixtures here; never remove others'."""

from __future__ import annotations

import os

import pytest

# Tests never touch the network: a hub id must fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---- models (owner: models.py) ---------------------------------------------------------------
@pytest.fixture
def tiny_llama():
    """(model, tokenizer): a fresh, seeded 2-layer Llama with SmolLM2's tokenizer (~0.2 s).

    Function-scoped, so each test may adapt or train it freely. Two calls give identical weights.
    """
    from peftlab.models import load_model

    return load_model("tiny-llama")


@pytest.fixture
def tiny_bert():
    """(model, tokenizer): a fresh, seeded 2-layer BertForSequenceClassification, 2 labels."""
    from peftlab.models import load_model

    return load_model("tiny-bert")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the real SmolLM2-135M-Instruct in float32, loaded once per session.

    SHARED by every test that asks for it: do not adapt, train or move it in place. Wrap a
    ``copy.deepcopy(model)`` instead (~0.3 s). Mark tests that use it ``@pytest.mark.slow``.
    The first run ever converts the bundled GGUF file into the peftlab cache (~40 s, once).
    """
    from peftlab.models import load_model

    return load_model("smollm2-135m")
