"""Spectra of ΔW (peftlab/spectra.py): values equal a full SVD, ranks, subspaces, amplification."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab import spectra
from peftlab.errors import ConfigError
from peftlab.inject import Adapter, AdaptedLayer, adapted_layers, inject


@pytest.fixture(scope="module")
def _llama_once():
    from peftlab.models import load_model

    return load_model("tiny-llama")[0]


@pytest.fixture
def tiny_llama(_llama_once):
    """conftest's tiny_llama, loaded once per module and deep-copied per test (~10 ms instead of
    ~1 s for the tokenizer each time); the tokenizer is not needed here."""
    return copy.deepcopy(_llama_once), None


def _randomise_lora(model: nn.Module, seed: int = 0) -> None:
    """B = 0 at init makes ΔW = 0: give every LoRA B (reference or peft) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def _with_spectrum(s: list[float], d_out: int = 40, d_in: int = 30, seed: int = 0) -> torch.Tensor:
    """A d_out x d_in matrix whose singular values are exactly ``s``."""
    k = len(s)
    return _orthonormal(d_out, k, seed) @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ _orthonormal(
        d_in, k, seed + 1
    ).T


# --------------------------------------------------------------------------------------------
# spectrum(): equal to svdvals of the explicit ΔW, without a full SVD
# --------------------------------------------------------------------------------------------
def test_lora_spectrum_equals_svdvals_without_full_svd(tiny_llama, monkeypatch):
    model, _ = tiny_llama
    model = peftlab.adapt(model, "lora", r=4, alpha=8, targets="all-linear")
    _randomise_lora(model)
    layers = adapted_layers(model)

    sizes = []  # every matrix handed to an SVD routine must be the small r x r core
    real_svdvals, real_svd = torch.linalg.svdvals, torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svdvals", lambda a, **k: sizes.append(a.shape) or real_svdvals(a, **k))
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **k: sizes.append(a.shape) or real_svd(a, **k))
    got = peftlab.spectrum(model)
    monkeypatch.undo()

    assert set(got) == set(layers) and len(got) == 14  # 2 layers x 7 linear modules
    assert max(max(s) for s in sizes) <= 4
    for name, values in got.items():
        full = torch.linalg.svdvals(layers[name].delta_weight().detach())
        assert values.shape == (4,)
        assert torch.all(values[:-1] >= values[1:])  # descending
        torch.testing.assert_close(values, full[:4], rtol=1e-4, atol=1e-6 * float(full[0]))
        assert float(full[4:].max()) <= 1e-5 * float(full[0])  # the rest of ΔW's spectrum is zero


def test_peft_lora_spectrum_equals_svdvals(tiny_llama):
    model, _ = tiny_llama
    model = peftlab.adapt(model, "lora", backend="peft", r=4, alpha=16, targets=("q_proj", "v_proj"))
    _randomise_lora(model, seed=1)
    got = peftlab.spectrum(model)
    expected = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")}
    assert set(got) == set(expected) and len(got) == 4
    for name, values in got.items():
        full = torch.linalg.svdvals(expected[name].get_delta_weight("default").detach())
        torch.testing.assert_close(values, full[:4], rtol=1e-4, atol=1e-6 * float(full[0]))
    assert all(name.startswith("base_model.model.") for name in got)


def test_peft_and_reference_give_the_same_spectra_for_the_same_weights(tiny_llama):
    from peftlab.production.hf_peft import copy_reference_to_peft

    ref, _ = tiny_llama
    other = copy.deepcopy(ref)
    ref = peftlab.adapt(ref, "lora", r=4, targets=("q_proj",))
    _randomise_lora(ref, seed=2)
    theirs = peftlab.adapt(other, "lora", backend="peft", r=4, targets=("q_proj",))
    copy_reference_to_peft(ref, theirs)
    ours, peft_values = peftlab.spectrum(ref), peftlab.spectrum(theirs)
    for name, values in ours.items():
        torch.testing.assert_close(values, peft_values["base_model.model." + name], rtol=1e-5, atol=1e-7)


def test_peft_dora_spectrum_is_that_of_the_merged_change(tiny_llama):
    import peft

    model, _ = tiny_llama
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    _randomise_lora(model, seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.rand(param.shape, generator=torch.Generator().manual_seed(4)))
    got = peftlab.spectrum(model)
    layer_names = list(got)
    bases = {n: model.get_submodule(n).get_base_layer() for n in layer_names}
    before = {n: b.weight.detach().clone() for n, b in bases.items()}
    model.merge_adapter()
    deltas = {n: bases[n].weight.detach() - before[n] for n in layer_names}
    model.unmerge_adapter()
    for name in layer_names:
        full = torch.linalg.svdvals(deltas[name])
        assert got[name].shape == full.shape  # DoRA's change is full rank: the full-SVD route
        torch.testing.assert_close(got[name][:8], full[:8], rtol=1e-3, atol=1e-5 * float(full[0]))


@pytest.mark.parametrize("method", ["loha", "lokr", "vera", "dora", "oft"])
def test_other_methods_spectra_equal_svdvals(tiny_llama, method):
    """Each route (own hook: LoKr; factors: LoHa, VeRA; full SVD: DoRA, OFT) on the real methods."""
    from peftlab.methods import METHODS

    if method not in METHODS:
        pytest.skip(f"{method} is not registered yet")
    model, _ = tiny_llama
    model = peftlab.adapt(model, method, targets=("q_proj",))
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():  # move every adapter parameter off its (often identity) init
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    got = peftlab.spectrum(model)
    for name, layer in adapted_layers(model).items():
        full = torch.linalg.svdvals(layer.delta_weight().detach().float())
        k = min(len(got[name]), 16)
        assert float(full[0]) > 0
        torch.testing.assert_close(got[name][:k], full[:k], rtol=1e-4, atol=1e-5 * float(full[0]))


class _Hooked(Adapter):
    """An adapter whose ΔW = u v^T is known; it offers whichever routes the test asks for."""

    def __init__(self, base: nn.Linear, routes: set[str]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.u = nn.Parameter(torch.randn(base.out_features, 2, generator=gen))
        self.v = nn.Parameter(torch.randn(2, base.in_features, generator=gen))
        self.routes = routes
        self.calls: list[str] = []

    def forward(self, x, base, result):
        return result + x @ (self.u @ self.v).T

    def delta_weight(self, base):
        self.calls.append("delta_weight")
        return self.u @ self.v

    def __getattr__(self, name):
        if name in ("factors", "singular_values") and name in self.__dict__.get("routes", ()):
            def hook(*args):
                self.calls.append(name)
                if name == "factors":
                    return self.u, self.v
                return torch.tensor([3.0, 2.0, 1.0])  # a sentinel: the hook must win
            return hook
        return super().__getattr__(name)


@pytest.mark.parametrize(
    "routes, expected",
    [({"singular_values", "factors"}, "singular_values"), ({"factors"}, "factors"), (set(), "delta_weight")],
)
def test_dispatch_prefers_hook_then_factors_then_full_svd(routes, expected):
    model = nn.Sequential(nn.Linear(12, 10))
    (layer,) = inject(model, ["0"], lambda _n, base: _Hooked(base, routes))
    values = spectra.spectrum(model)["0"]
    adapter = layer.adapters["default"]
    assert adapter.calls == [expected]
    if expected == "singular_values":
        assert values.tolist() == [3.0, 2.0, 1.0]
    else:
        full = torch.linalg.svdvals((adapter.u @ adapter.v).detach())
        torch.testing.assert_close(values[:2], full[:2], rtol=1e-5, atol=1e-6)
        assert values.numel() == (2 if expected == "factors" else 10)


def test_hadamard_and_kronecker_helpers_match_explicit_matrices():
    gen = torch.Generator().manual_seed(6)
    b1, a1 = torch.randn(20, 3, generator=gen), torch.randn(3, 16, generator=gen)
    b2, a2 = torch.randn(20, 2, generator=gen), torch.randn(2, 16, generator=gen)
    left, right = spectra.hadamard_factors(b1, a1, b2, a2)
    assert left.shape == (20, 6) and right.shape == (6, 16)
    torch.testing.assert_close(left @ right, (b1 @ a1) * (b2 @ a2), rtol=1e-5, atol=1e-5)
    a, b = torch.randn(4, 3, generator=gen), torch.randn(5, 6, generator=gen)
    expected = torch.linalg.svdvals(torch.kron(a, b))
    torch.testing.assert_close(spectra.kronecker_singular_values(a, b)[:12], expected[:12], rtol=1e-5, atol=1e-6)


def test_layers_filter_and_helpful_errors(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="peftlab.adapt"):
        peftlab.spectrum(model)
    model = peftlab.adapt(model, "lora", r=2, targets="all-linear")
    only_v = peftlab.spectrum(model, layers=["v_proj"])
    assert sorted(only_v) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert all(float(v.abs().max()) == 0.0 for v in only_v.values())  # B = 0 at init: ΔW = 0
    with pytest.raises(ConfigError, match="no adapted layer"):
        peftlab.spectrum(model, layers=["nope"])


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------
def test_effective_rank_on_known_spectra():
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert peftlab.effective_rank(flat) == pytest.approx(4.0)
    assert peftlab.effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    s = [4.0, 2.0, 1.0, 1.0]
    p = torch.tensor(s, dtype=torch.float64) / sum(s)
    assert peftlab.effective_rank(torch.tensor(s)) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    # the same spectrum inside a matrix, and as factors of that matrix
    m = _with_spectrum(s)
    assert peftlab.effective_rank(m) == pytest.approx(peftlab.effective_rank(torch.tensor(s)), rel=1e-6)
    left, right = m[:, :], torch.eye(30, dtype=torch.float64)
    assert peftlab.effective_rank((left, right)) == pytest.approx(peftlab.effective_rank(torch.tensor(s)))
    # energy: σ² = 16, 4, 1, 1 of 22 -> top-1 72.7%, top-2 95.5%, top-3 100% minus 1/22
    assert peftlab.effective_rank(m, method="energy", threshold=0.7) == 1
    assert peftlab.effective_rank(m, method="energy", threshold=0.9) == 2
    assert peftlab.effective_rank(m, method="energy", threshold=0.99) == 4
    assert peftlab.effective_rank(torch.zeros(3)) == 0.0
    with pytest.raises(ConfigError, match="entropy"):
        peftlab.effective_rank(m, method="bogus")


def test_stable_rank_and_energy_share():
    m = _with_spectrum([2.0, 1.0, 1.0])
    assert peftlab.stable_rank(m) == pytest.approx(1.5)
    assert peftlab.stable_rank(torch.tensor([3.0, 3.0, 3.0])) == pytest.approx(3.0)
    assert peftlab.energy_share(m, 1) == pytest.approx(4 / 6)
    assert peftlab.energy_share(m, 2) == pytest.approx(5 / 6)
    assert peftlab.energy_share(m, 10) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Subspace similarity and amplification (LoRA paper, section 7)
# --------------------------------------------------------------------------------------------
def test_subspace_similarity_of_a_matrix_with_itself_is_one():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(8, 64, generator=gen)  # a LoRA A: (r, d_in)
    grid = peftlab.subspace_similarity(a, a)
    assert grid.shape == (8, 8)
    torch.testing.assert_close(grid, torch.ones(8, 8), rtol=0, atol=1e-5)


def test_subspace_similarity_of_random_subspaces_is_small():
    gen = torch.Generator().manual_seed(8)
    d = 256
    a8, a64 = torch.randn(8, d, generator=gen), torch.randn(64, d, generator=gen)
    grid = peftlab.subspace_similarity(a8, a64)
    assert grid.shape == (8, 64)
    # E φ(i, j) = i j / d / min(i, j) = max(i, j) / d for independent random subspaces
    assert grid[-1, -1] == pytest.approx(64 / d, rel=0.3)
    expected_last_row = torch.arange(9, 65) / d  # i = 8, j = 9..64: φ ≈ j / d
    assert float(((grid[-1, 8:] - expected_last_row).abs() / expected_last_row).mean()) < 0.25
    assert float(grid.max()) < 0.4
    sub = peftlab.subspace_similarity(a8, a64, i=3, j=5)
    torch.testing.assert_close(sub, grid[:3, :5])


def test_subspace_similarity_orthogonal_nested_and_factors():
    eye = torch.eye(16)
    assert float(peftlab.subspace_similarity(eye[:4], eye[4:8]).abs().max()) < 1e-6  # orthogonal
    # factors (left, right) are compared through ΔW = left @ right: same right space as `right`
    gen = torch.Generator().manual_seed(9)
    right = torch.randn(4, 16, generator=gen)
    grid = peftlab.subspace_similarity((torch.randn(10, 4, generator=gen), right), right)
    assert float(grid[-1, -1]) == pytest.approx(1.0, abs=1e-5)  # same 4-d subspace in full
    with pytest.raises(ConfigError, match="different spaces"):
        peftlab.subspace_similarity(eye[:4], torch.eye(8)[:4])


def test_amplification_on_constructed_example():
    s_w = [10.0, 5.0, 2.0, 1.0, 0.5]
    u_w, v_w = _orthonormal(40, 5, 10), _orthonormal(30, 5, 11)
    weight = u_w @ torch.diag(torch.tensor(s_w, dtype=torch.float64)) @ v_w.T
    # ΔW along W's 4th direction (σ = 1) with norm 3: the update amplifies a weak direction 3x
    delta = 3.0 * torch.outer(u_w[:, 3], v_w[:, 3])
    result = peftlab.amplification(delta, weight, trials=4)
    assert result.r == 1
    assert result.delta_norm == pytest.approx(3.0)
    assert result.projected_norm == pytest.approx(1.0)
    assert result.factor == pytest.approx(3.0)
    assert result.top_weight_norm == pytest.approx(10.0)  # W's own top direction
    assert result.weight_norm == pytest.approx(math.sqrt(sum(x * x for x in s_w)))
    assert 0 < result.random_norm < 2.0  # random directions see little of W
    assert set(result.table()) >= {"||W||_F", "||ΔW||_F"}
    # given as factors, the same numbers
    again = peftlab.amplification((3.0 * u_w[:, 3:4], v_w[:, 3:4].T), weight, compare=False)
    assert again.factor == pytest.approx(3.0) and again.random_norm is None


def test_amplification_of_an_adapted_layer_uses_its_base_weight(tiny_llama):
    model, _ = tiny_llama
    model = peftlab.adapt(model, "lora", r=4, targets=("q_proj",))
    with pytest.raises(ConfigError, match="zero"):
        peftlab.amplification(adapted_layers(model)["model.layers.0.self_attn.q_proj"])
    _randomise_lora(model, seed=12)
    layer = adapted_layers(model)["model.layers.0.self_attn.q_proj"]
    got = peftlab.amplification(layer, compare=False)
    explicit = peftlab.amplification(layer.delta_weight().detach(), layer.base_layer.weight, r=4, compare=False)
    assert got.r == 4
    assert got.factor == pytest.approx(explicit.factor, rel=1e-4)
    with pytest.raises(ConfigError, match="weight"):
        peftlab.amplification(layer.delta_weight().detach())


# --------------------------------------------------------------------------------------------
# History over training and the benchmark
# --------------------------------------------------------------------------------------------
def test_spectrum_history_as_a_training_callback(tiny_llama):
    model, _ = tiny_llama
    model = peftlab.adapt(model, "lora", r=4, targets=("q_proj", "v_proj"))
    history = peftlab.SpectrumHistory(every=2, layers=["q_proj"], top=3)
    seen = {}
    for step in range(1, 7):  # what the training loop does after each optimizer step
        _randomise_lora(model, seed=step)
        assert history({"step": step, "loss": 1.0}, model) is None  # never asks to stop
        if step % 2 == 0:
            seen[step] = peftlab.spectrum(model, layers=["q_proj"])
    assert history.steps == [2, 4, 6] and len(history) == 3
    steps, values = history.as_arrays()
    assert steps.tolist() == [2, 4, 6]
    assert sorted(values) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    for name, grid in values.items():
        assert grid.shape == (3, 3)
        for t, step in enumerate([2, 4, 6]):
            assert grid[t].tolist() == pytest.approx(seen[step][name][:3].tolist())
    with pytest.raises(ConfigError, match="every"):
        peftlab.SpectrumHistory(every=0)


def test_bench_spectra_rows_agree():
    rows = spectra.bench_spectra(sizes=(96,), ranks=(4, 8), repeats=2)
    assert [(r["d"], r["r"]) for r in rows] == [(96, 4), (96, 8)]
    for row in rows:
        assert row["factored_s"] > 0 and row["full_s"] > 0
        assert row["speedup"] == pytest.approx(row["full_s"] / row["factored_s"])
        assert row["max_rel_diff"] < 1e-4
        assert row["tail_rel"] < 1e-5
    table = spectra.format_bench_spectra(rows)
    assert len(table.splitlines()) == 3 and "speedup" in table


@pytest.mark.parametrize("backend", ["reference", "peft"])
def test_dora_direction_spectrum_comes_from_the_factors(tiny_llama, backend):
    """part="direction": DoRA's direction update s·B A, r values from the factors, equal to the
    explicit matrix's SVD; part="weight" stays the full-rank W' - W0."""
    import copy

    model, _ = tiny_llama
    ref = peftlab.adapt(copy.deepcopy(model), "dora", r=4, alpha=8, targets=("q_proj", "v_proj"))
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if ".adapters." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    if backend == "peft":
        from peftlab.production.hf_peft import copy_reference_to_peft

        subject = peftlab.adapt(copy.deepcopy(model), "dora", backend="peft", r=4, alpha=8,
                                targets=("q_proj", "v_proj"))
        copy_reference_to_peft(ref, subject)
    else:
        subject = ref
    direction = peftlab.spectrum(subject, part="direction")
    weight = peftlab.spectrum(subject, part="weight")
    assert len(direction) == 4
    for name, layer in adapted_layers(ref).items():
        key = next(k for k in direction if k.endswith(name))
        adapter = layer.adapters["default"]
        explicit = torch.linalg.svdvals((adapter.scaling * adapter.lora_B @ adapter.lora_A).detach())
        assert direction[key].shape == (4,)  # rank r: the factor route, no d_out x d_in SVD
        torch.testing.assert_close(direction[key], explicit[:4], rtol=1e-4, atol=1e-6 * float(explicit[0]))
        assert weight[key].numel() == min(layer.base_layer.weight.shape)  # full-rank change
    with pytest.raises(ConfigError, match="direction"):
        peftlab.spectrum(subject, part="magnitude")
