"""The LoRA starts chosen from the layer (PiSSA, OLoRA, LoRA-GA, CorDA, EVA) and LoRA+ are peft 0.21.2's.

- same base weights + same init config -> the same A, B and residual base weight as peft's own init
  (PiSSA's exact SVD and OLoRA bit-close at fp32; the randomized SVDs of "pissa_niter_K" and
  LoRA-GA draw from the global RNG, which peft's layer construction consumes differently (its B
  gets a Kaiming init first), so both sides get the same seeded torch.svd_lowrank here);
- the residual is right: W_res + s B A = W, and the output at init is the base model's;
- then the same outputs and gradients, and PEFT-format save/load both ways;
- LoRA-GA refuses to start without data, clearly; its gradient estimate is peft's;
- LoRA+'s parameter groups are peft's create_loraplus_optimizer's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlab
from peftlab.errors import ConfigError
from peftlab.inject import adapted_layers
from peftlab.production.hf_peft import copy_reference_to_peft
from tests.test_contract import batch, fresh_base, randomise

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5
ARCHS = ("llama", "bert")


@pytest.fixture(scope="module")
def bases():
    from peftlab.models import load_model

    return {"llama": load_model("tiny-llama")[0].eval(), "bert": load_model("tiny-bert")[0].eval()}


@pytest.fixture
def seeded_svd(monkeypatch):
    """torch.svd_lowrank with its random start fixed per call, for peft and peftlab alike."""
    original = torch.svd_lowrank

    def svd_lowrank(A, q=6, niter=2, M=None):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return original(A, q=q, niter=niter, M=M)

    import peft.tuners.lora.layer as peft_layer

    monkeypatch.setattr(torch, "svd_lowrank", svd_lowrank)
    monkeypatch.setattr(peft_layer, "svd_lowrank", svd_lowrank)


def data_for(arch: str) -> list[dict]:
    return [batch(arch, seed=0), batch(arch, seed=1)]


def hyperparameters(method: str, arch: str, **extra) -> dict:
    hp = {"r": 4, "alpha": 8.0, **extra}
    if method == "lora_ga":
        hp["data"] = data_for(arch)
    if method == "corda":  # one row per batch, as peft's preprocess_corda reads them
        hp["data"] = [{k: v[i:i + 1] for k, v in b.items()} for b in data_for(arch) for i in range(2)]
    return hp


def pair(bases, arch: str, method: str, **extra) -> tuple[nn.Module, nn.Module]:
    """(reference, peft) models from copies of one base, each initialised by its own code."""
    base = bases[arch]
    hp = hyperparameters(method, arch, **extra)
    torch.manual_seed(0)
    ours = peftlab.adapt(copy.deepcopy(base), method, **hp)
    torch.manual_seed(0)
    theirs = peftlab.adapt(copy.deepcopy(base), method, backend="peft", **hp)
    return ours, theirs


def peft_layer(theirs: nn.Module, name: str) -> nn.Module:
    return theirs.base_model.model.get_submodule(name)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


CASES = [("pissa", {}), ("olora", {}), ("pissa", {"init": "pissa_niter_2"}), ("lora_ga", {}),
         ("lora_ga", {"direction": "ArBr", "scale": "weight_svd"}), ("lora_ga", {"scale": "gd_scale"}),
         ("corda", {}), ("corda", {"corda_method": "kpm"})]


@pytest.mark.usefixtures("seeded_svd")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "extra"), CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_init_equals_peft(bases, arch, method, extra):
    ours, theirs = pair(bases, arch, method, **extra)
    layers = adapted_layers(ours)
    assert layers
    for name, layer in layers.items():
        adapter, peft_lora = layer.adapters["default"], peft_layer(theirs, name)
        close(adapter.lora_A, peft_lora.lora_A["default"].weight)
        close(adapter.lora_B, peft_lora.lora_B["default"].weight)
        close(layer.base_layer.weight, peft_lora.get_base_layer().weight)
        if method != "lora_ga":  # LoRA-GA's s B0 A0 can sit below W's float resolution on a random tiny model
            assert not torch.equal(layer.base_layer.weight, bases[arch].get_submodule(name).weight), "W_res == W"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["pissa", "olora", "lora_ga", "corda"])
def test_residual_plus_update_is_the_base_weight(bases, arch, method):
    base = bases[arch]
    torch.manual_seed(0)
    model = peftlab.adapt(copy.deepcopy(base), method, **hyperparameters(method, arch)).eval()
    for name, layer in adapted_layers(model).items():
        adapter = layer.adapters["default"]
        rebuilt = layer.base_layer.weight + adapter.scaling * adapter.lora_B @ adapter.lora_A
        close(rebuilt, base.get_submodule(name).weight)
        assert adapter.lora_B.abs().sum() > 0 and adapter.lora_A.abs().sum() > 0  # B A ≠ 0 from the start
    inputs = batch(arch)
    with torch.no_grad():
        close(model(**inputs).logits, base(**inputs).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_pissa_takes_the_principal_singular_triplets(bases, arch):
    model = peftlab.adapt(copy.deepcopy(bases[arch]), "lora", init="pissa", r=4, alpha=4.0)  # s = 1
    for name, layer in adapted_layers(model).items():
        adapter = layer.adapters["default"]
        S = torch.linalg.svdvals(bases[arch].get_submodule(name).weight)
        close(torch.linalg.svdvals(adapter.lora_B @ adapter.lora_A)[:4], S[:4], atol=1e-4)
        close(torch.linalg.svdvals(layer.base_layer.weight)[:4], S[4:8], atol=1e-4)  # the residual keeps the rest


@pytest.mark.usefixtures("seeded_svd")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["pissa", "olora", "lora_ga", "corda"])
def test_outputs_and_gradients_equal_peft(bases, arch, method):
    ours, theirs = pair(bases, arch, method)
    randomise(ours)
    copy_reference_to_peft(ours, theirs)
    inputs = batch(arch)
    ours.eval(), theirs.eval()  # BERT's dropout off; gradients still flow
    loss_ours, loss_theirs = ours(**inputs).loss, theirs(**inputs).loss
    close(loss_ours, loss_theirs)
    loss_ours.backward(), loss_theirs.backward()
    for name, layer in adapted_layers(ours).items():
        adapter, peft_lora = layer.adapters["default"], peft_layer(theirs, name)
        close(adapter.lora_A.grad, peft_lora.lora_A["default"].weight.grad)
        close(adapter.lora_B.grad, peft_lora.lora_B["default"].weight.grad)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_saved_adapter_is_a_lora_on_the_residual_both_ways(bases, arch, method, tmp_path):
    """peftlab saves a LoRA (init_lora_weights=true) on W_res, which peft loads; a folder peft saves
    with init_lora_weights="pissa"/"olora" loads in peftlab onto the original W, as in peft."""
    from peft import PeftModel

    ours, theirs = pair(bases, arch, method)
    randomise(ours)
    copy_reference_to_peft(ours, theirs)
    inputs = batch(arch)
    with torch.no_grad():
        expected = ours.eval()(**inputs).logits
    folder = peftlab.save_adapter(ours, tmp_path / "ours")
    saved = peftlab.io.read_adapter_config(folder)
    assert saved["init_lora_weights"] is True
    with torch.no_grad():
        close(PeftModel.from_pretrained(fresh_base(bases[arch], ours), str(folder)).eval()(**inputs).logits, expected)
        close(peftlab.load_adapter(fresh_base(bases[arch], ours), folder).eval()(**inputs).logits, expected)

    theirs.save_pretrained(str(tmp_path / "theirs"))  # peft's own save: its init, the original W needed
    assert peftlab.io.read_adapter_config(tmp_path / "theirs")["init_lora_weights"] == method
    loaded = peftlab.load_adapter(copy.deepcopy(bases[arch]), tmp_path / "theirs").eval()
    with torch.no_grad():
        close(loaded(**inputs).logits, expected)


def test_data_inits_refuse_to_start_without_data(bases):
    from peftlab.methods.lora import LoRAConfig

    model = bases["llama"]
    with pytest.raises(ConfigError, match=r"learns its start from data, and none was given.*data=batches"):
        peftlab.adapt(copy.deepcopy(model), "lora_ga")
    with pytest.raises(ConfigError, match=r"learns its start from data, and none was given.*init='lora_ga'"):
        peftlab.adapt(copy.deepcopy(model), "lora", init="lora_ga")  # the lora_ga method, reached from lora
    with pytest.raises(ConfigError, match=r"method 'lora' has no field for.*'lora_ga', data=batches"):
        peftlab.methods.build_lora(copy.deepcopy(model), LoRAConfig(init="lora_ga"), "default")
    with pytest.raises(ConfigError, match=r"is empty"):
        peftlab.adapt(copy.deepcopy(model), "lora_ga", data=[])
    with pytest.raises(ConfigError, match=r"not a sequence of batches"):
        peftlab.adapt(copy.deepcopy(model), "lora_ga", data=batch("llama"))
    unlabelled = {k: v for k, v in batch("llama").items() if k != "labels"}
    plain = copy.deepcopy(model)
    with pytest.raises(ConfigError, match=r"needs a loss per batch.*labels"):
        peftlab.adapt(plain, "lora_ga", data=[unlabelled])
    assert not adapted_layers(plain) and all(p.grad is None for p in plain.parameters())
    with pytest.raises(ConfigError, match=r"direction='up' is not known"):
        peftlab.adapt(copy.deepcopy(model), "lora_ga", data=[batch("llama")], direction="up")
    with pytest.raises(ConfigError, match=r"CorDA reads one row per batch.*Expected batches of one row"):
        peftlab.adapt(copy.deepcopy(model), "corda", data=[batch("llama")])
    with pytest.raises(ConfigError, match=r"learns its start from data, and none was given"):
        peftlab.adapt(copy.deepcopy(model), "corda")
    with pytest.raises(ConfigError, match=r"init='pissa_niter_0' is not known"):
        peftlab.adapt(copy.deepcopy(model), "lora", init="pissa_niter_0")


def test_lora_ga_gradients_are_peft_estimate(bases):
    from peft import LoraConfig, LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from peftlab.methods.lora_data_init import mean_gradients

    model, batches = copy.deepcopy(bases["llama"]), data_for("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ours = mean_gradients(model, names, batches)
    config = LoraConfig(r=4, target_modules=names, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    preprocess_loraga(model, config, lambda: [model(**b).loss.backward() for b in batches])
    for name in names:
        close(ours[name], model.get_submodule(name)._peft_loraga_grad)
    assert not model.training and all(p.grad is None for p in model.parameters())


def _groups(optimizer, names: dict[int, str]) -> list[tuple[float, float, set[str]]]:
    return [(g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


@pytest.mark.parametrize(("arch", "hp"), [("llama", {}), ("bert", {"lora_bias": True}),
                                           ("llama", {"targets": ("embed_tokens", "q_proj")})])
def test_loraplus_groups_equal_peft(bases, arch, hp):
    from peft.optimizers import create_loraplus_optimizer

    from peftlab.production.hf_peft import reference_to_peft_names
    from peftlab.train.loraplus import loraplus_param_groups

    torch.manual_seed(0)
    ours = peftlab.adapt(copy.deepcopy(bases[arch]), "lora", r=4, **hp)
    theirs = peftlab.adapt(copy.deepcopy(bases[arch]), "lora", r=4, backend="peft", **hp)
    expected = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                         loraplus_weight_decay=0.01)
    theirs_names = {id(p): n for n, p in theirs.named_parameters()}
    got = torch.optim.AdamW(loraplus_param_groups(theirs, 1e-3, 16, 0.01))  # the same rule on peft's model
    assert _groups(got, theirs_names) == _groups(expected, theirs_names)
    rename = reference_to_peft_names(ours)
    ours_names = {id(p): rename.get(n, n) for n, p in ours.named_parameters()}
    mine = _groups(torch.optim.AdamW(loraplus_param_groups(ours, 1e-3, 16, 0.01)), ours_names)
    strip = lambda names: {n.replace(".default", "").replace(".modules_to_save", "") for n in names}  # noqa: E731
    assert [(lr, wd, strip(n)) for lr, wd, n in mine] == [(lr, wd, strip(n)) for lr, wd, n in _groups(expected, theirs_names)]
    assert sum(len(n) for *_, n in mine) == sum(p.requires_grad for p in ours.parameters())


def test_train_uses_loraplus_groups_and_checks_the_ratio(bases):
    """AdamW's first step moves each tensor by about its lr (update ≈ lr · sign(g)); A's gradient is
    0 while B = 0, so the step moves B only: by 8 x as much with loraplus_lr_ratio=8."""
    rows = _dataset([{"input_ids": b["input_ids"][0].tolist()} for b in data_for("llama") for _ in range(2)])
    moved = {}
    for ratio in (None, 8):
        torch.manual_seed(0)
        model = peftlab.adapt(copy.deepcopy(bases["llama"]), "lora", r=4)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = peftlab.train(model, rows, steps=1, batch_size=2, lr=1e-3, loraplus_lr_ratio=ratio,
                               warmup_ratio=0.0, max_grad_norm=None, progress=False)
        assert result.stop_reason == "completed" and result.settings["loraplus_lr_ratio"] == ratio
        step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}
        assert all(v == 0 for n, v in step.items() if n.endswith("lora_A"))
        moved[ratio] = max(v for n, v in step.items() if n.endswith("lora_B"))
    assert moved[8] == pytest.approx(8 * moved[None], rel=1e-3)
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio=0.5 is invalid.*>= 1"):
        peftlab.train(model, rows, steps=1, loraplus_lr_ratio=0.5, progress=False)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lorafa_steps_equal_peft_lorafa_optimizer(bases, weight_decay, monkeypatch):
    """Three steps of our LoRA-FA optimiser on the reference LoRA and of peft's on peft's LoRA,
    from the same weights: the same B after each (peft's bf16 autocast of the projection off)."""
    import peft.optimizers.lorafa as peft_lorafa
    from peft.optimizers import create_lorafa_optimizer

    from peftlab.train.lorafa import lorafa_optimizer

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    ours, theirs = pair(bases, "llama", "lora")
    randomise(ours)  # B != 0, so A's rows matter
    copy_reference_to_peft(ours, theirs)
    optimizers = (lorafa_optimizer(ours, 1e-2, weight_decay),
                  create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=weight_decay))
    a_before = {n: layer.adapters["default"].lora_A.detach().clone() for n, layer in adapted_layers(ours).items()}
    for seed in range(3):
        inputs = batch("llama", seed=seed)
        for model, optimizer in zip((ours, theirs), optimizers):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        for name, layer in adapted_layers(ours).items():
            adapter, theirs_layer = layer.adapters["default"], peft_layer(theirs, name)
            assert not adapter.lora_A.requires_grad and torch.equal(adapter.lora_A, a_before[name])
            close(adapter.lora_B, theirs_layer.lora_B["default"].weight)


def test_train_with_lorafa_freezes_a_learns_b_and_saves_both(bases, tmp_path):
    rows = _dataset([{"input_ids": b["input_ids"][0].tolist()} for b in data_for("llama") for _ in range(2)])
    torch.manual_seed(0)
    model = peftlab.adapt(copy.deepcopy(bases["llama"]), "lora", r=4)
    a_before = {n: layer.adapters["default"].lora_A.detach().clone() for n, layer in adapted_layers(model).items()}
    result = peftlab.train(model, rows, steps=4, batch_size=2, lr=1e-2, lora_fa=True, progress=False)
    assert result.stop_reason == "completed" and result.settings["lora_fa"] is True
    assert result.losses[-1] < result.losses[0]
    for name, layer in adapted_layers(model).items():
        assert torch.equal(layer.adapters["default"].lora_A, a_before[name])
        assert layer.adapters["default"].lora_B.abs().max() > 0
    inputs = batch("llama")
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        folder = peftlab.save_adapter(model, tmp_path / "fa")  # A is frozen, and saved all the same
        close(peftlab.load_adapter(copy.deepcopy(bases["llama"]), folder).eval()(**inputs).logits, expected)
    with pytest.raises(ConfigError, match="lora_fa=True freezes A"):
        peftlab.train(model, rows, steps=1, lora_fa=True, loraplus_lr_ratio=16, progress=False)
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        peftlab.train(peftlab.adapt(copy.deepcopy(bases["llama"]), "ia3"), rows, steps=1, lora_fa=True,
                      progress=False)


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------
# EVA: A from the layers' input PCA, ranks redistributed (peft's algorithm, step by step)
# --------------------------------------------------------------------------------------------
def eva_data(arch: str, n: int = 6) -> list[dict]:
    """Batches of 2 x 12 tokens (BERT's without labels: peft's EVA would mask tokens by them)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(5, 1000, (2, 12), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)} | ({"labels": ids} if arch == "llama" else {}))
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_eva_equals_peft_ranks_alphas_and_components(bases, arch):
    from peftlab.api import records

    hp = {"r": 4, "data": eva_data(arch)}
    torch.manual_seed(0)
    ours = peftlab.adapt(copy.deepcopy(bases[arch]), "eva", **hp)
    torch.manual_seed(0)
    theirs = peftlab.adapt(copy.deepcopy(bases[arch]), "eva", backend="peft", **hp)
    config, peft_config = records(ours)["default"].config, theirs.peft_config["default"]
    assert config.rank_pattern == peft_config.rank_pattern and config.alpha_pattern == peft_config.alpha_pattern
    if arch == "llama":  # these batches move rank between the layers (3, 3, 5, 5 instead of 4 each)
        assert sorted(config.rank_pattern.values()) == [3, 3, 5, 5]
    layers = adapted_layers(ours)
    assert set(layers) == {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    for name, layer in layers.items():
        adapter, peft_lora = layer.adapters["default"], peft_layer(theirs, name)
        assert adapter.r == peft_lora.r["default"] and adapter.scaling == peft_lora.scaling["default"]
        close(adapter.lora_A, peft_lora.lora_A["default"].weight)
        assert not adapter.lora_B.any() and torch.equal(layer.base_layer.weight, bases[arch].get_submodule(name).weight)
    assert peftlab.count_parameters(ours).trainable == peftlab.METHODS["eva"].parameter_count(bases[arch], config) + (
        sum(p.numel() for p in bases[arch].classifier.parameters()) if arch == "bert" else 0)


def test_eva_components_are_the_top_principal_directions(bases):
    """One batch, fed until it converges: A's rows span (nearly) the top principal subspace of the inputs."""
    data = eva_data("llama", n=1)
    model = peftlab.adapt(copy.deepcopy(bases["llama"]), "eva", r=4, rho=1.0, data=data)
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    handle = bases["llama"].get_submodule(name).register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        bases["llama"](**data[0])
    handle.remove()
    X = seen[0].reshape(-1, seen[0].shape[-1])
    V = torch.linalg.svd(X - X.mean(0), full_matrices=False)[2][:4]  # exact top-4 principal directions
    A = adapted_layers(model)[name].adapters["default"].lora_A
    cosines = torch.linalg.svdvals(A @ V.T)  # of the angles between the two 4-dim subspaces
    assert cosines.max() < 1 + 1e-5 and cosines.min() > 0.9, cosines  # a randomized SVD (q = 2k): close, not exact
    assert abs(A[0] @ V[0]) > 0.99  # the first principal direction itself


def test_eva_saves_its_ranks_for_peft_and_loads_back_as_a_lora_with_them(bases, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = peftlab.adapt(copy.deepcopy(bases["llama"]), "eva", r=4, data=eva_data("llama"))
    randomise(model)
    inputs = batch("llama")
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    folder = peftlab.save_adapter(model, tmp_path / "eva")
    saved = peftlab.io.read_adapter_config(folder)
    assert saved["init_lora_weights"] is True and sorted(saved["rank_pattern"].values()) == [3, 3, 5, 5]
    with torch.no_grad():
        close(PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), str(folder)).eval()(**inputs).logits, expected)
    loaded = peftlab.load_adapter(copy.deepcopy(bases["llama"]), folder)  # a LoRA with EVA's ranks
    assert {n: layer.adapters["default"].r for n, layer in adapted_layers(loaded).items()} == {
        n: layer.adapters["default"].r for n, layer in adapted_layers(model).items()}
    with torch.no_grad():
        close(loaded.eval()(**inputs).logits, expected)


def test_eva_refuses_missing_data_and_too_few_tokens(bases):
    with pytest.raises(ConfigError, match=r"learns its start from data, and none was given.*'eva', data=batches"):
        peftlab.adapt(copy.deepcopy(bases["llama"]), "eva")
    with pytest.raises(ConfigError, match=r"learns its start from data, and none was given"):
        peftlab.adapt(copy.deepcopy(bases["llama"]), "lora", init="eva")  # the eva method, reached from lora
    short = [{"input_ids": torch.tensor([[5, 6, 7]])}]  # 3 tokens, 8 components wanted
    plain = copy.deepcopy(bases["llama"])
    with pytest.raises(ConfigError, match=r"enough tokens.*rho · r = 8"):
        peftlab.adapt(plain, "eva", r=4, data=short)
    assert not adapted_layers(plain)
    with pytest.raises(ConfigError, match=r"rank_pattern / alpha_pattern are EVA's output"):
        peftlab.adapt(copy.deepcopy(bases["llama"]), "eva", data=short, rank_pattern={"q_proj": 2})


# ---- LoRA's rank_pattern / alpha_pattern (what a saved EVA adapter says) ----------------------
PATTERNS = {"rank_pattern": {"layers.0.self_attn.q_proj": 2, "v_proj": 6}, "alpha_pattern": {"v_proj": 3.0}}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_equal_peft_outputs_gradients_and_files(bases, use_rslora, tmp_path):
    from peft import PeftModel

    ours, theirs = pair(bases, "llama", "lora", use_rslora=use_rslora, **PATTERNS)
    ranks = {n: layer.adapters["default"].r for n, layer in adapted_layers(ours).items()}
    assert ranks == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 4,
                     "model.layers.0.self_attn.v_proj": 6, "model.layers.1.self_attn.v_proj": 6}
    for name, layer in adapted_layers(ours).items():
        adapter, theirs_layer = layer.adapters["default"], peft_layer(theirs, name)
        assert adapter.scaling == pytest.approx(theirs_layer.scaling["default"])
    randomise(ours)
    copy_reference_to_peft(ours, theirs)
    inputs = batch("llama")
    loss_ours, loss_theirs = ours.eval()(**inputs).loss, theirs.eval()(**inputs).loss
    close(loss_ours, loss_theirs)
    loss_ours.backward(), loss_theirs.backward()
    for name, layer in adapted_layers(ours).items():
        close(layer.adapters["default"].lora_B.grad, peft_layer(theirs, name).lora_B["default"].weight.grad)
    with torch.no_grad():
        expected = ours(**inputs).logits
        folder = peftlab.save_adapter(ours, tmp_path / "ours")
        assert peftlab.io.read_adapter_config(folder)["rank_pattern"] == PATTERNS["rank_pattern"]
        close(PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), str(folder)).eval()(**inputs).logits, expected)
        theirs.save_pretrained(str(tmp_path / "theirs"))
        close(peftlab.load_adapter(copy.deepcopy(bases["llama"]), tmp_path / "theirs").eval()(**inputs).logits,
              expected)


def test_bad_patterns_are_refused_clearly():
    from peftlab.methods.lora import LoRAConfig

    with pytest.raises(ConfigError, match=r"rank_pattern has invalid entries \{'v_proj': 0\}"):
        LoRAConfig(rank_pattern={"v_proj": 0})
    with pytest.raises(ConfigError, match="alpha_pattern=.* Expected a dict"):
        LoRAConfig(alpha_pattern=[("v_proj", 2.0)])
    with pytest.raises(ConfigError, match="target_parameters is not supported"):
        LoRAConfig(rank_pattern={"v_proj": 2}, target_parameters=("mlp.experts.gate_up_proj",))


# ---- the data a data-driven start gets where peftlab trains (Lab, study, command line) ---------
def test_start_data_is_the_first_batches_of_the_training_run(bases):
    from peftlab.models import load_model
    from peftlab.train import frame_data, start_data

    model, tokenizer = load_model("tiny-llama")
    data = peftlab.load_dataset("chatterbot-qa")
    assert start_data(model, "lora", data, tokenizer, max_length=32, batch_size=4) == {}
    start = start_data(model, "eva", data, tokenizer, max_length=32, batch_size=4, seed=3)["data"]
    expected = frame_data(model, data, None, tokenizer, 32, 3).micro_batches(0, 4, 4, torch.device("cpu"))
    assert len(start) == 4 and all(torch.equal(a[k], b[k]) for a, b in zip(start, expected) for k in a)
    rows = start_data(model, "corda", data, tokenizer, max_length=32, batch_size=4, seed=3)["data"]
    assert len(rows) == 16 and {b["input_ids"].shape[0] for b in rows} == {1}  # CorDA reads one row a batch
    assert torch.equal(rows[1]["input_ids"][0, :int(rows[1]["attention_mask"].sum())],
                       start[0]["input_ids"][1][start[0]["attention_mask"][1].bool()])


def test_a_data_driven_start_runs_in_a_study_cell_with_no_special_case(tmp_path):
    from peftlab.study import StudyConfig, run_study

    config = StudyConfig(model="tiny-bert", methods=("eva", "corda"),
                         lrs=(("eva", (1e-2,)), ("corda", (1e-2,))), seeds=(0,), steps=2, batch_size=2,
                         max_length=32, validation_rows=8, test_rows=8, forgetting_rows=2)
    cells = run_study(config, tmp_path, in_child=False, log=None)["cells"]
    assert [(c["method"], c["status"]) for c in cells] == [("eva", "ok"), ("corda", "ok")]


@pytest.mark.parametrize("init", ["lora_ga", "corda"])
def test_lora_with_a_data_init_is_that_method(bases, init):
    hp = hyperparameters(init, "llama")
    torch.manual_seed(0)
    direct = peftlab.adapt(copy.deepcopy(bases["llama"]), init, **hp)
    torch.manual_seed(0)
    via_lora = peftlab.adapt(copy.deepcopy(bases["llama"]), "lora", init=init, **hp)
    assert type(peftlab.api.active_record(via_lora)[1].config).__name__ == type(
        peftlab.api.active_record(direct)[1].config).__name__
    for (name, a), (_, b) in zip(direct.named_parameters(), via_lora.named_parameters()):
        assert torch.equal(a, b), name
