"""The support matrix (tests/support_matrix.py): every method on tiny random models of 16
architectures, each cell a pass or a clear refusal, and the README prints exactly this table."""

from __future__ import annotations

import pytest
import torch

from tests import support_matrix as sm

# refusals of the reference backend itself, each where the method cannot apply or peft cannot do it
REFERENCE_REFUSALS = (
    "has no bias parameters at all",  # BitFit on a model without biases (Llama, Qwen, Gemma, Phi-3)
    "architectures peft's AdaptionPrompt knows",  # LLaMA-Adapter: peft has llama, mistral, gpt2
    "needs a model whose attention reads past keys and values",  # prefix tuning on DistilBERT
    "X-LoRA's router reads the last hidden state",  # X-LoRA on T5 and BART (peft fails there too)
    "init='olora' on transformers' Conv1D",  # OLoRA on GPT-2: peft builds a B of the wrong shape
    "EVA on an encoder-decoder model is not supported",  # T5, BART: peft fails there too
)


@pytest.fixture(scope="module")
def cells():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on the small build machines
    try:
        return sm.matrix()
    finally:
        torch.set_num_threads(threads)


def test_every_cell_passes_or_is_a_clear_refusal(cells):
    failed = {f"{arch}/{method}/{check}": cell.detail for (arch, method), row in cells.items()
              for check, cell in row.items() if cell.status == "FAIL"}
    assert not failed, failed
    unclear = {f"{arch}/{method}/{check}": cell.detail for (arch, method), row in cells.items()
               for check, cell in row.items()
               if cell.status == "refused" and not any(w in cell.detail for w in ("Expected", "try", "Try"))}
    assert not unclear, unclear  # a refusal says what was expected or what to try


def test_the_reference_refuses_only_what_cannot_apply_or_peft_cannot_do(cells):
    for (arch, method), row in cells.items():
        if row["trains"].status != "refused":
            assert row["trains"].status == "ok"
            continue
        assert any(r in row["trains"].detail for r in REFERENCE_REFUSALS), (arch, method, row["trains"].detail)
        assert row["peft"].status in ("refused", "n/a"), (arch, method)  # peft cannot either
        assert row["memory"].status == "refused", (arch, method)  # estimate_memory says the same


def test_peft_interop_everywhere_peft_builds_the_method(cells):
    """LoRA, DoRA, IA3 and VeRA interoperate with peft on every architecture in the matrix."""
    for method in ("lora", "dora", "ia3", "vera", "adalora", "loftq", "prompt_tuning", "p_tuning"):
        bad = {arch: row["peft"] for (arch, m), row in cells.items() if m == method and row["peft"].status != "ok"}
        assert not bad, (method, bad)


def test_fused_is_exact_wherever_it_runs(cells):
    for method in ("lora", "dora"):
        bad = {arch: row["fused"] for (arch, m), row in cells.items() if m == method and row["fused"].status != "ok"}
        assert not bad, (method, bad)


def test_the_readme_prints_the_matrix(cells):
    printed = sm.readme_section(sm.README.read_text())
    assert printed is not None, f"README.md lacks the {sm.BEGIN} ... {sm.END} markers"
    assert printed == sm.render(cells), "the README's support matrix is stale: run `python -m tests.support_matrix --write`"


@pytest.mark.parametrize("source", ["folder", "hub id"])
@pytest.mark.parametrize("method", ["lora", "oft", "prompt_tuning"])
def test_the_labs_preview_works_from_every_architectures_folder(tmp_path, monkeypatch, method, source):
    """The Lab's model box takes a local folder or a hub id: its preview (trainable count and
    memory) comes from the config alone, for every architecture of the matrix, with no fallback.
    A hub id is answered from the hub cache (here a cache folder laid out as huggingface_hub
    lays it out: models--org--name/refs/main and snapshots/<commit>/), with no network."""
    import huggingface_hub.constants

    import peftlab
    from widgets import plan

    commit = "0" * 40
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for arch in sm.ARCHS:
        model = arch.build()
        model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
        name = arch.name.replace(" ", "").replace(".", "-")
        if source == "folder":
            folder = where = tmp_path / name
        else:
            where, repo = f"peftlab-test/{name}", tmp_path / "hub" / f"models--peftlab-test--{name}"
            folder = repo / "snapshots" / commit
            (repo / "refs").mkdir(parents=True)
            (repo / "refs" / "main").write_text(commit)
        model.config.save_pretrained(folder)
        choice = plan.Choice(model=str(where), method=method, batch_size=2, max_length=32)
        est = plan.estimate(choice)
        assert not [n for n in est.notes if "failed" in n], (arch.name, est.notes)
        torch.manual_seed(0)
        real = peftlab.count_parameters(peftlab.adapt(model, method, **choice.hyperparameters()))
        assert est.count.trainable == real.trainable, arch.name
        assert est.memory["activations"] > 0, arch.name
