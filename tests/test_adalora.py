"""peftlab's from-scratch AdaLoRA allocates ranks exactly as peft's AdaLoRA does.

Same weights (through the bridge), same batches, same optimiser: after every update_and_allocate
both prune the same singular values and the loss curves (regulariser included) agree in fp32.
Also: the budget schedule, the orthogonality regulariser, ΔW / merge / factors, Conv1D layers,
peftlab.train's hooks on both backends, config errors and the rank-allocation figure.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers
from peftlab.methods import adalora
from peftlab.production.hf_peft import (copy_reference_to_peft, from_peft_config, reference_to_peft_names,
                                        to_peft_config)

ATOL = 1e-5
# budget phase from step 2 to 9 with pruning every 2nd step, then the allocation frozen
HP = dict(total_step=12, init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, alpha=16.0, targets="all-linear")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads; on a busy 2-core machine two threads wait on each
    other (measured 2-3x slower). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_llama() -> nn.Module:
    """A 2-layer Llama with a 128-token vocabulary (14 adaptable linear layers), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _randomise(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random adapter weights: Λ starts at 0, which would make the first steps say little."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _pair(**hp) -> tuple[nn.Module, nn.Module]:
    base = _tiny_llama()
    ref = peftlab.adapt(copy.deepcopy(base), "adalora", **hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peftlab.adapt(copy.deepcopy(base), "adalora", backend="peft", **hp)
    _randomise(ref)
    copy_reference_to_peft(ref, pm)
    return ref, pm


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=gen) for _ in range(n)]


def _peft_regulariser(pm: nn.Module) -> torch.Tensor:
    """peft's regulariser, written out independently: mean Frobenius norm over all A, B."""
    terms = [(p @ p.T if ".lora_A." in n else p.T @ p) for n, p in pm.named_parameters()
             if (".lora_A." in n or ".lora_B." in n) and n.endswith(".default")]
    return sum(torch.linalg.matrix_norm(t - torch.eye(t.shape[0]), "fro") for t in terms) / len(terms)


# --------------------------------------------------------------------------------------------
# parity with peft: the regulariser, the masks after every step, the loss curve
# --------------------------------------------------------------------------------------------
def test_same_rank_allocation_and_loss_curve_as_peft():
    ref, pm = _pair(**HP)
    names = reference_to_peft_names(ref)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == set(names.values())
    ref_params, peft_params = dict(ref.named_parameters()), dict(pm.named_parameters())
    opt_ref = torch.optim.AdamW([ref_params[n] for n in names], lr=2e-2)
    opt_peft = torch.optim.AdamW([peft_params[n] for n in names.values()], lr=2e-2)
    ref.train(), pm.train()

    patterns_seen, losses = 0, []
    for step, ids in enumerate(_batches(HP["total_step"])):
        out_ref, out_peft = ref(input_ids=ids, labels=ids), pm(input_ids=ids, labels=ids)
        if step == 0:  # both add orth_reg_weight · R(P, Q) to the loss when labels are given
            ce = F.cross_entropy(out_ref.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
            reg = adalora.orthogonal_regularizer(ref)
            torch.testing.assert_close(reg, _peft_regulariser(pm), atol=ATOL, rtol=0)
            assert reg.item() > 0.1  # random P, Q are far from orthogonal: the term matters
            torch.testing.assert_close(out_ref.loss, ce + 0.5 * reg, atol=ATOL, rtol=0)
        assert out_ref.loss.item() == pytest.approx(out_peft.loss.item(), abs=ATOL)
        losses.append(out_ref.loss.item())
        out_ref.loss.backward(), out_peft.loss.backward()
        opt_ref.step(), opt_peft.step()
        ranks = adalora.update_and_allocate(ref, step)
        pm.base_model.update_and_allocate(step)
        opt_ref.zero_grad(), opt_peft.zero_grad()

        theirs = pm.peft_config["default"].rank_pattern
        if theirs is not None:  # peft has pruned: the same triplets must be pruned here
            assert adalora.rank_pattern(ref) == theirs, f"step {step}"
            assert ranks == {k.removesuffix(".lora_E.default"): sum(v) for k, v in theirs.items()}
            patterns_seen += 1
        for ours, name in names.items():  # masked Λ included: the weights stay equal
            torch.testing.assert_close(ref_params[ours], peft_params[name], atol=ATOL, rtol=0)

    assert patterns_seen >= 8  # pruning happened from step 4 on (steps 2 and 3: not yet/odd)
    assert losses[-1] < losses[0]
    steps, history = adalora.rank_history(ref)
    totals = [sum(h[i] for h in history.values()) for i in range(len(steps))]
    assert totals[0] == 4 * 14 and totals[-1] == 2 * 14  # init_r, target_r times 14 layers
    assert totals == sorted(totals, reverse=True)  # the budget only falls
    assert len(set(adalora.rank_allocation(ref).values())) > 1  # ranks differ by layer: allocated
    for layer in adapted_layers(ref).values():  # pruned Λ are exactly 0 after the final allocation
        assert layer.adapters["default"].rank() == int((layer.adapters["default"].lora_E != 0).sum())


def test_budget_schedule_matches_peft():
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

    class _Params:  # what peft's allocator reads of a model: lora_A shapes
        def __init__(self, layers: int, r: int) -> None:
            self.params = [(f"l{i}.lora_A.default", torch.zeros(r, 3)) for i in range(layers)]

        def named_parameters(self):
            return self.params

    for hp in (dict(total_step=50, tinit=5, tfinal=10, deltaT=3, init_r=12, target_r=4),
               dict(total_step=20, init_r=8, target_r=8), dict(total_step=7, tinit=1, init_r=6, target_r=1)):
        config = adalora.AdaLoRAConfig(**hp)
        ours = adalora.RankAllocator(config, [f"l{i}" for i in range(5)])
        theirs = PeftRankAllocator(_Params(5, hp["init_r"]), AdaLoraConfig(**hp), "default")
        for step in range(hp["total_step"] + 2):
            assert ours.budget(step) == theirs.budget_schedule(step), (hp, step)


# --------------------------------------------------------------------------------------------
# peftlab.train drives AdaLoRA through its hooks, on both backends
# --------------------------------------------------------------------------------------------
def test_train_hooks_same_allocation_on_both_backends():
    import datasets

    hp = dict(HP, total_step=8, tinit=1, tfinal=2, deltaT=1)
    ref, pm = _pair(**hp)
    gen = torch.Generator().manual_seed(2)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 128, (16, 10), generator=gen).tolist()})
    settings = dict(steps=8, lr=2e-2, batch_size=4, progress=False, seed=0)
    seen = []
    ours = peftlab.train(ref, data, callbacks=lambda rec, m: seen.append(adalora.rank_allocation(m)), **settings)
    theirs = peftlab.train(pm, data, **settings)
    assert ours.losses == pytest.approx(theirs.losses, abs=ATOL)
    assert adalora.rank_pattern(ref) == pm.peft_config["default"].rank_pattern
    assert sum(seen[-1].values()) == 2 * 14 and sum(seen[0].values()) == 4 * 14
    # gradient accumulation: the regulariser counts once per optimizer step, so 2 x 2 == 1 x 4
    accumulated, _ = _pair(**hp)
    split = peftlab.train(accumulated, data, **dict(settings, batch_size=2, grad_accum=2))
    assert split.losses == pytest.approx(ours.losses, abs=ATOL)
    assert adalora.rank_pattern(accumulated) == adalora.rank_pattern(ref)
    # the regulariser reached the gradients: P and Q moved towards orthogonality
    before, _ = _pair(**hp)
    assert adalora.orthogonal_regularizer(ref) < adalora.orthogonal_regularizer(before)


# --------------------------------------------------------------------------------------------
# the adapter itself: ΔW, factors, merge, Conv1D, the bridge's config translation
# --------------------------------------------------------------------------------------------
def test_starts_as_base_and_delta_weight_factors_merge_agree():
    base = _tiny_llama()
    ids = _batches(1)[0]
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = peftlab.adapt(copy.deepcopy(base), "adalora", **HP)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)  # Λ = 0
        _randomise(model)
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, expected, atol=1e-3)
        for layer in adapted_layers(model).values():
            a = layer.adapters["default"]
            left, right = a.factors()
            manual = a.lora_B @ torch.diag(a.lora_E.view(-1)) @ a.lora_A * 16.0 / (4 + 1e-5)
            torch.testing.assert_close(left @ right, manual, atol=1e-6, rtol=0)
            torch.testing.assert_close(a.delta_weight(layer.base_layer), manual, atol=1e-6, rtol=0)
        spectra = peftlab.spectrum(model)  # through factors(): singular values of ΔW, not Λ
        for name, layer in adapted_layers(model).items():
            full = torch.linalg.svdvals(layer.delta_weight())
            torch.testing.assert_close(spectra[name][:4].float(), full[:4], atol=1e-6, rtol=1e-4)
        peftlab.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=ATOL, rtol=0)
        peftlab.unmerge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=ATOL, rtol=0)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method = peftlab.METHODS["adalora"]
    assert count == sum(method.params_per_layer(*layer_dims, records_config(model))
                        for layer_dims in _dims(model))


def records_config(model: nn.Module):
    return peftlab.api.records(model)["default"].config


def _dims(model: nn.Module) -> list[tuple[int, int]]:
    from peftlab.inject import layer_dims

    return [layer_dims(layer.base_layer) for layer in adapted_layers(model).values()]


def test_conv1d_layout_matches_peft():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = GPT2LMHeadModel(config).eval()
    hp = dict(total_step=5, init_r=4, target_r=2, targets=("c_attn", "c_proj"))
    ref = peftlab.adapt(copy.deepcopy(base), "adalora", **hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peftlab.adapt(copy.deepcopy(base), "adalora", backend="peft", **hp)
    _randomise(ref)
    copy_reference_to_peft(ref, pm)
    ids = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)
        peft_layers = dict(pm.named_modules())
        for name, layer in adapted_layers(ref).items():  # ΔW in Conv1D's (d_in, d_out) layout
            theirs = peft_layers[f"base_model.model.{name}"].get_delta_weight("default")
            torch.testing.assert_close(layer.delta_weight(), theirs, atol=1e-6, rtol=0)


def test_peft_config_round_trip():
    spec = peftlab.METHODS["adalora"]
    config = peftlab.api.make_config(spec, None, **dict(HP, targets=("q_proj", "v_proj"), beta1=0.8,
                                                             modules_to_save=()))
    peft_config = to_peft_config(spec, config)
    assert type(peft_config).__name__ == "AdaLoraConfig"
    assert (peft_config.lora_alpha, peft_config.init_r, peft_config.target_r, peft_config.deltaT,
            peft_config.beta1, peft_config.total_step) == (16.0, 4, 2, 2, 0.8, 12)
    assert from_peft_config(peft_config) == ("adalora", config)


# --------------------------------------------------------------------------------------------
# errors and the figure
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, words", [
    ({}, "total_step"),
    ({"total_step": 10, "tinit": 6, "tfinal": 4}, "tinit"),
    ({"total_step": 10, "init_r": 4, "target_r": 8}, "target_r"),
    ({"total_step": 10, "beta1": 1.0}, "beta1"),
])
def test_config_errors_say_what_to_do(bad, words):
    with pytest.raises(ConfigError, match=words):
        peftlab.adapt(_tiny_llama(), "adalora", **bad)


def test_helpers_need_an_adalora_adapter():
    model = peftlab.adapt(_tiny_llama(), "lora", r=2)
    with pytest.raises(ConfigError, match="no AdaLoRA adapter"):
        adalora.update_and_allocate(model, 0)


def test_rank_allocation_figure():
    from peftlab import plots

    model = peftlab.adapt(_tiny_llama(), "adalora", **dict(HP, total_step=6, tinit=0, tfinal=0, deltaT=1))
    _randomise(model)
    for step, ids in enumerate(_batches(6)):
        model(input_ids=ids, labels=ids).loss.backward()
        adalora.update_and_allocate(model, step)
        model.zero_grad()
    steps, history = adalora.rank_history(model)
    heatmap = plots.rank_allocation(history, steps)
    assert heatmap.data[0].z.shape == (6, 14)
    bars = plots.rank_allocation(adalora.rank_allocation(model))
    assert list(bars.data[0].y) == list(adalora.rank_allocation(model).values())
