"""Intruder dimensions (peftlab/spectra/intruders.py): found from scratch, reduced as peft reduces them."""

from __future__ import annotations

import copy
import io
import re
from functools import partial

import pytest
import torch

import peftlab
from peftlab import compose, spectra
from peftlab.errors import ConfigError
from peftlab.production.hf_peft import copy_reference_to_peft


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def test_a_new_leading_direction_is_an_intruder_and_an_old_one_is_not():
    u, v = _orthonormal(20, 20, 0), _orthonormal(20, 20, 1)
    w = u @ torch.diag(torch.linspace(3.0, 0.5, 20, dtype=torch.float64)) @ v.T  # full rank, as trained weights are
    outsider = u.sum(dim=1, keepdim=True) / 20**0.5  # |cos| = 1/sqrt(20) = 0.22 with each of W's directions
    tuned = w + 50.0 * outsider @ v[:, 5:6].T  # a new direction, stronger than any of W's
    found = spectra.intruder_dimensions(w, tuned, top_k=4)
    assert found.indices == [0] and found.count == 1
    assert found.similarity[0] < 0.3 and torch.all(found.similarity[1:] > 0.5)
    assert found.singular_values[0] > 49.0
    along = w + 5.0 * u[:, 3:4] @ v[:, 3:4].T  # W's own 4th direction made the strongest: not new
    assert spectra.intruder_dimensions(w, along, top_k=4).count == 0
    torch.testing.assert_close(spectra.intruder_dimensions(w, along, top_k=4).similarity,
                               torch.ones(4, dtype=torch.float64))


def test_epsilon_and_top_k_bound_what_counts():
    u, v = _orthonormal(20, 20, 2), _orthonormal(20, 20, 3)
    w = u @ torch.diag(torch.linspace(2.0, 1.0, 20, dtype=torch.float64)) @ v.T
    mixed = (u[:, 0:1] + u[:, 1:2]) / 2**0.5  # |cos| 0.707 with two of W's directions
    tuned = w + 10.0 * mixed @ v[:, 0:1].T
    assert spectra.intruder_dimensions(w, tuned, epsilon=0.5).count == 0
    assert spectra.intruder_dimensions(w, tuned, epsilon=0.8).indices[0] == 0
    assert spectra.intruder_dimensions(w, tuned, top_k=3).similarity.numel() == 3


def _trained_lora(tiny_llama, seed: int = 0, scale: float = 0.5, **hp):
    model = peftlab.adapt(copy.deepcopy(tiny_llama[0]).eval(), "lora", r=4, alpha=8, **hp)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def test_find_intruders_reads_a_lora_model_and_a_fully_tuned_one(tiny_llama):
    model = _trained_lora(tiny_llama)
    found = spectra.find_intruders(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    w = layer.base_layer.weight.detach()
    explicit = spectra.intruder_dimensions(w, w + layer.delta_weight())
    torch.testing.assert_close(found["model.layers.0.self_attn.q_proj"].similarity, explicit.similarity)

    full, _ = tiny_llama
    full = copy.deepcopy(full)
    before = spectra.snapshot(full, ("q_proj", "v_proj"))
    assert sorted(before) == sorted(n for n in found)
    with torch.no_grad():
        full.get_submodule("model.layers.0.self_attn.q_proj").weight.add_(layer.delta_weight())
    tuned = spectra.find_intruders(full, before=before)
    torch.testing.assert_close(tuned["model.layers.0.self_attn.q_proj"].similarity, explicit.similarity)
    assert tuned["model.layers.1.self_attn.q_proj"].count == 0  # an unchanged layer: W's own directions
    changes = {n: d for n, _, d in spectra.weight_changes(full, before)}
    assert float(changes["model.layers.1.self_attn.v_proj"].abs().max()) == 0.0


def _peft_reduced(base, ref, **kwargs):
    """peft's reduce_intruder_dimension on a peft twin of ``ref`` (same base, same A and B)."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    theirs = peftlab.adapt(copy.deepcopy(base), "lora", backend="peft", r=4, alpha=8)
    copy_reference_to_peft(ref, theirs)
    lines = io.StringIO()
    reduce_intruder_dimension(theirs, logging_sink=partial(print, file=lines), **kwargs)
    return theirs, lines.getvalue()


@pytest.mark.parametrize("kwargs", [{}, {"threshold_epsilon": 999, "mitigation_lambda": 0.3},
                                    {"top_k": 3, "mitigation_lambda": 0.0}])
def test_reduce_intruders_equals_peft(tiny_llama, kwargs):
    ref = _trained_lora(tiny_llama, scale=0.6)
    theirs, log = _peft_reduced(tiny_llama[0].eval(), ref, **kwargs)
    ours = {"top_k": kwargs.get("top_k", 10), "epsilon": kwargs.get("threshold_epsilon", 0.5),
            "mitigation": kwargs.get("mitigation_lambda", 0.75)}
    found = spectra.reduce_intruders(ref, **ours)
    peft_counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\S+): Intruders: (\d+)", log)}
    assert {n: c for n, c in found.items() if c} == {n.removeprefix("base_model.model."): c
                                                     for n, c in peft_counts.items()}
    assert sum(found.values()) > 0, "the case must have intruders to reduce"
    assert compose.active_adapter(ref) == "intruder_reduced"
    for name, count in found.items():
        mine = ref.get_submodule(name).delta_weight("intruder_reduced")
        peft_layer = theirs.get_submodule("base_model.model." + name)
        torch.testing.assert_close(mine, peft_layer.get_delta_weight("intruder_reduced"), rtol=1e-4, atol=1e-5)
        if not count:  # no intruders: the adapter is copied as it is
            torch.testing.assert_close(mine, ref.get_submodule(name).delta_weight("default"))
    batch = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(batch).logits, theirs(batch).logits, rtol=1e-4, atol=1e-4)
    compose.set_adapter(ref, "default")  # the old adapter is still there
    torch.testing.assert_close(ref.get_submodule(name).delta_weight(), ref.get_submodule(name).delta_weight("default"))


def test_reduction_lowers_each_intruder_by_lambda(tiny_llama):
    model = _trained_lora(tiny_llama, scale=0.6)
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(name)
    w = layer.base_layer.weight.detach()
    before = spectra.intruder_dimensions(w, w + layer.delta_weight(), epsilon=999)  # all top 10
    spectra.reduce_intruders(model, epsilon=999, mitigation=1.0)  # lambda 1: nothing is taken away
    torch.testing.assert_close(layer.delta_weight("intruder_reduced"), layer.delta_weight("default"),
                               rtol=1e-4, atol=1e-5)
    assert before.count == before.similarity.numel()


def test_bad_input_is_refused(tiny_llama):
    model = _trained_lora(tiny_llama)
    with pytest.raises(ConfigError, match=r"mitigation=1.5 is out of range"):
        spectra.reduce_intruders(model, mitigation=1.5)
    with pytest.raises(ConfigError, match=r"epsilon=0 is out of range"):
        spectra.find_intruders(model, epsilon=0)
    with pytest.raises(ConfigError, match=r"top_k=0"):
        spectra.intruder_dimensions(torch.eye(3), torch.eye(3), top_k=0)
    with pytest.raises(ConfigError, match=r"one shape"):
        spectra.intruder_dimensions(torch.eye(3), torch.eye(4))
    dora = peftlab.adapt(copy.deepcopy(tiny_llama[0]), "dora", r=4)
    with pytest.raises(ConfigError, match=r"works on LoRA adapters; its adapter 'default' is dora"):
        spectra.reduce_intruders(dora)
    with pytest.raises(ConfigError, match=r"no peftlab adapter"):
        spectra.reduce_intruders(copy.deepcopy(tiny_llama[0]))
    with pytest.raises(ConfigError, match=r"No linear layer of this model matches"):
        spectra.snapshot(tiny_llama[0], ("nope",))


def test_layers_limits_the_reduction_and_the_rest_is_copied(tiny_llama):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    ref = _trained_lora(tiny_llama, scale=0.6)  # LoRA on q_proj and v_proj
    twin = peftlab.adapt(copy.deepcopy(tiny_llama[0]).eval(), "lora", backend="peft", r=4, alpha=8, targets=("q_proj",))
    for name, layer in twin.named_modules():  # peft's twin carries only the q_proj adapters
        if name.endswith("q_proj") and hasattr(layer, "lora_A"):
            mine = ref.get_submodule(name.removeprefix("base_model.model.")).adapters["default"]
            layer.lora_A["default"].weight.data.copy_(mine.lora_A)
            layer.lora_B["default"].weight.data.copy_(mine.lora_B)
    reduce_intruder_dimension(twin, logging_sink=None)
    found = spectra.reduce_intruders(ref, layers=("q_proj",))
    assert found and all(n.endswith("q_proj") for n in found) and sum(found.values()) > 0
    for name, layer in ref.named_modules():
        if name.endswith("v_proj"):
            torch.testing.assert_close(layer.delta_weight("intruder_reduced"), layer.delta_weight("default"))
        elif name.endswith("q_proj"):
            theirs = twin.get_submodule("base_model.model." + name).get_delta_weight("intruder_reduced")
            torch.testing.assert_close(layer.delta_weight("intruder_reduced"), theirs, rtol=1e-4, atol=1e-5)
