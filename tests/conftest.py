"""Shared pytest fixtures. Engineers ADD fixtures here; never remove others'."""

from __future__ import annotations

import os

import pytest

# Tests never touch the network: a hub id must fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Run stores (trackio, the Lab's runs table) go to a fresh temporary folder, never the home
# directory; set before trackio is imported, since it reads its folder once at import.
import tempfile  # noqa: E402

os.environ["TRACKIO_DIR"] = os.environ["PEFTLAB_RUNS_DIR"] = tempfile.mkdtemp(prefix="peftlab-runs-")


def pytest_report_header(config):
    """The machine a result belongs to: CPU, the kernels PyTorch picked, threads, forced ISAs."""
    import torch

    from peftlab.provenance import cpu_name

    cpu = cpu_name()
    forced = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                        "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    return (f"machine: {cpu}; {os.cpu_count()} CPUs; torch {torch.__version__} kernels "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
            + (f"; forced {forced}" if forced else ""))


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: tiny models gain nothing from threads on a
    small, shared machine, and one thread keeps their float rounding the same everywhere.
    A test file opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
