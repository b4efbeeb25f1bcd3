"""X-LoRA (peftlab/methods/xlora.py) against peft's XLoraModel with the same experts and router:
same logits and same router gradients (fp32, atol 1e-5) on the tiny Llama, across the options."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab import compose
from peftlab.errors import ConfigError
from peftlab.methods import xlora
from peftlab import xlora_io

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _experts(model, names=("math", "code", "poem"), targets=("q_proj", "v_proj", "up_proj")):
    """Trained-looking LoRA experts: random B (a fresh LoRA's B is 0), different targets per expert."""
    gen = torch.Generator().manual_seed(7)
    for i, name in enumerate(names):
        peftlab.adapt(model, "lora", adapter_name=name, r=2 + i, alpha=4.0, targets=targets[: 2 + (i % 2)])
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".adapters.{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return names


def _pair(tiny_llama, tmp_path, **options):
    """(reference X-LoRA model, peft X-LoRA model) with the same experts and router weights."""
    from peftlab.production.hf_peft import import_peft

    peft = import_peft()
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    names = _experts(model)
    peftlab.adapt(model, "xlora", experts=names, **options)
    torch.manual_seed(0)
    with torch.no_grad():  # a router that prefers different experts for different tokens
        for param in xlora.router_of(model).parameters():
            param.normal_(0, 0.5)
    base.config.use_cache = False  # peft refuses X-LoRA with a cache
    theirs = peft.get_peft_model(base, xlora_io.to_peft_config(model, tmp_path))
    xlora_io.copy_router_to_peft(model, theirs)
    return model, theirs


def _compare(model, theirs, batch=2, seq=7):
    ids = torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    model.train(), theirs.train()
    ours_out = model(input_ids=ids, labels=labels)
    their_out = theirs(input_ids=ids, labels=labels)
    ours_out.loss.backward()
    their_out.loss.backward()
    diff = (ours_out.logits - their_out.logits).abs().max().item()
    torch.testing.assert_close(ours_out.logits, their_out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(xlora.last_scalings(model), theirs.base_model.internal_xlora_scalings,
                               atol=ATOL, rtol=0)
    grads = [(m.grad, t.grad) for m, t in zip(xlora.router_of(model).parameters(),
                                              theirs.base_model.internal_xlora_classifier.parameters())]
    assert all(m is not None and m.abs().sum() > 0 for m, _ in grads)
    for mine, other in grads:
        torch.testing.assert_close(mine, other, atol=ATOL, rtol=0)
    gdiff = max((m - t).abs().max().item() for m, t in grads)
    return diff, gdiff


OPTIONS = [
    {},
    {"layerwise_scalings": True, "top_k_lora": 2, "enable_softmax_topk": True},
    {"xlora_depth": 3, "xlora_size": 16, "xlora_dropout_p": 0.0, "softmax_temperature": 0.5},
    {"enable_softmax": False, "scaling_pass_value": 0.3, "global_scaling_weight": 0.7, "top_k_lora": 1},
]


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "layerwise-topk-softmax", "depth3", "no-softmax-pass"])
def test_matches_peft_outputs_and_router_gradients(tiny_llama, tmp_path, options):
    model, theirs = _pair(tiny_llama, tmp_path, **options)
    diff, gdiff = _compare(model, theirs)
    print(options, "max |logit diff|", diff, "max |router grad diff|", gdiff)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("xlora_router.adapters.default.") for n in trainable)  # experts frozen


def test_default_makes_fresh_trainable_experts(tiny_llama):
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    peftlab.adapt(model, "xlora")
    assert compose.list_adapters(model) == ["default_expert0", "default_expert1", "default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.default_expert1.lora_B" in n for n in trainable)
    assert any(n.startswith("xlora_router.") for n in trainable)
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)  # experts start at 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert xlora.last_scalings(model).shape == (2, 5, 4, 2)  # 2 layers x (q, v), 2 experts
    with compose.disabled(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="cannot be merged"):
        peftlab.merge(model)
    with pytest.raises(ConfigError, match="expert of another adapter"):
        compose.delete_adapter(model, "default_expert0")
    compose.delete_adapter(model, "default")
    assert not hasattr(model.xlora_router.adapters, "default") and "default" not in model.xlora_router.adapters


def test_bad_experts_are_refused(tiny_llama):
    model, _ = tiny_llama
    peftlab.adapt(model, "ia3")
    with pytest.raises(ConfigError, match=r"not LoRA adapters.*default \(ia3\)"):
        peftlab.adapt(model, "xlora", adapter_name="mix", experts=("default", "nope"))


# --------------------------------------------------------------------------------------------
# A whole X-LoRA model on disk, in peft's folder format
# --------------------------------------------------------------------------------------------
def _mixed(tiny_llama, names=("math", "code", "poem"), **options):
    """(reference X-LoRA model over trained-looking experts with a random router, its plain base)."""
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    _experts(model, names)
    peftlab.adapt(model, "xlora", experts=names, **options)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in xlora.router_of(model).parameters():
            param.normal_(0, 0.5)
    return model.eval(), base


def _outputs(model):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("options", OPTIONS[:3], ids=["default", "layerwise-topk-softmax", "depth3"])
def test_save_load_round_trip_and_peft_loads_the_folder(tiny_llama, tmp_path, options):
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    model, base = _mixed(tiny_llama, **options)
    expected = _outputs(model)
    scalings = xlora.last_scalings(model).clone()
    folder = peftlab.save_adapter(model, tmp_path / "mix")
    # peft's layout: the X-LoRA config and router at the top, expert i in subfolder i
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["task_type"] == "CAUSAL_LM" and config["hidden_size"] == 64
    assert config["adapters"] == {str(i): str((tmp_path / "mix" / str(i)).resolve()) for i in range(3)}
    assert all(config[k] == v for k, v in options.items())
    for i, name in enumerate(("math", "code", "poem")):
        expert = json.loads((folder / str(i) / "adapter_config.json").read_text())
        assert expert["peft_type"] == "LORA" and expert["r"] == 2 + i
    assert set(load_file(folder / "adapter_model.safetensors")) == {
        xlora_io.ROUTER_KEY + k for k in xlora.router_of(model).state_dict()}

    loaded = peftlab.load_adapter(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(_outputs(loaded), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(xlora.last_scalings(loaded), scalings, atol=ATOL, rtol=0)
    assert compose.list_adapters(loaded) == ["math", "code", "poem", "default"]
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}  # the router only, as before

    plain = copy.deepcopy(base)
    plain.config.use_cache = False  # peft refuses X-LoRA with a cache
    theirs = PeftModel.from_pretrained(plain, str(folder)).eval()
    torch.testing.assert_close(_outputs(theirs), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs.base_model.internal_xlora_scalings, scalings, atol=ATOL, rtol=0)

    # peft reads the absolute paths in adapter_config.json; moved, the folder loads from its subfolders
    moved = folder.rename(tmp_path / "moved")
    torch.testing.assert_close(_outputs(peftlab.load_adapter(copy.deepcopy(base), moved)), expected, atol=ATOL, rtol=0)
    theirs = peftlab.load_adapter(copy.deepcopy(base), moved, backend="peft").eval()
    torch.testing.assert_close(_outputs(theirs), expected, atol=ATOL, rtol=0)


def test_fresh_trained_experts_round_trip(tiny_llama, tmp_path):
    model, _ = tiny_llama
    base = copy.deepcopy(model)
    peftlab.adapt(model, "xlora", n_experts=2, r=2)
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(), loss.backward(), opt.step()
    model.eval()
    expected = _outputs(model)
    loaded = peftlab.load_adapter(copy.deepcopy(base), peftlab.save_adapter(model, tmp_path / "mix")).eval()
    torch.testing.assert_close(_outputs(loaded), expected, atol=ATOL, rtol=0)
    assert compose.list_adapters(loaded) == ["default_expert0", "default_expert1", "default"]
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}  # experts train on
    assert any(".adapters.default_expert1.lora_B" in n for n in trainable)


def test_bad_folders_are_refused_and_leave_the_model_alone(tiny_llama, tmp_path):
    import json

    from safetensors.torch import save_file

    from peftlab.errors import AdapterFileError

    model, base = _mixed(tiny_llama)
    folder = peftlab.save_adapter(model, tmp_path / "mix")
    fresh = copy.deepcopy(base)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    def untouched():
        assert not compose.list_adapters(fresh) and not peftlab.inject.adapted_layers(fresh)
        router = getattr(fresh, "xlora_router", None)
        assert router is None or not len(router.adapters)
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "xlora_depth": 2, "xlora_size": 8}))
    with pytest.raises(AdapterFileError, match="router .* does not fit adapter_config.json"):
        peftlab.load_adapter(fresh, folder)  # fails after the experts and router were built
    untouched()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({}, folder / "adapter_model.safetensors")  # what peft 0.21's own save_pretrained can leave
    with pytest.raises(AdapterFileError, match="no router tensors"):
        peftlab.load_adapter(fresh, folder)
    untouched()
    folder = peftlab.save_adapter(model, tmp_path / "mix")
    (folder / "1" / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match=r"Expert '1' .* neither in"):
        peftlab.load_adapter(fresh, folder)
    untouched()
    peftlab.adapt(fresh, "lora", adapter_name="code", r=2)
    with pytest.raises(ConfigError, match=r"already has adapters named \['code'\]"):
        peftlab.load_adapter(fresh, peftlab.save_adapter(model, tmp_path / "again"))
    # saving replaces a saved X-LoRA folder, experts included, but nothing else
    (folder / "runs").mkdir()
    (folder / "runs" / "adapter_config.json").write_text("{}")  # looks like an adapter, is no expert
    with pytest.raises(AdapterFileError, match="holds other things than an adapter.*runs"):
        peftlab.save_adapter(model, folder)


def test_saving_is_atomic(tiny_llama, tmp_path, monkeypatch):
    """A save that fails or is killed part-way leaves the previous complete folder, never a mix."""
    import json

    from test_io import _kill_while_writing

    model, base = _mixed(tiny_llama)
    expected = _outputs(model)
    folder = peftlab.save_adapter(model, tmp_path / "mix")
    write, calls = xlora_io.write_reference, []

    def fail_on_second_expert(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return write(*args, **kwargs)

    monkeypatch.setattr(xlora_io, "write_reference", fail_on_second_expert)  # the experts' writer
    with torch.no_grad():
        for param in xlora.router_of(model).parameters():
            param.mul_(-1)  # a different router, which must not reach the disk
    with pytest.raises(OSError, match="disk full"):
        peftlab.save_adapter(model, folder)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]  # no half-written folder left
    torch.testing.assert_close(_outputs(peftlab.load_adapter(copy.deepcopy(base), folder)), expected,
                               atol=ATOL, rtol=0)

    # SIGKILL at random moments while two X-LoRA models (2 and 3 experts) replace each other
    small, _ = _mixed((copy.deepcopy(base), None), names=("a", "b"))
    versions = {2: _outputs(small), 3: _outputs(model)}
    for seed in range(3):
        _kill_while_writing(tmp_path / "dest", lambda dest, v: peftlab.save_adapter(small if v == 1 else model, dest),
                            seed)
        n = len(json.loads((tmp_path / "dest" / "adapter_config.json").read_text())["adapters"])
        loaded = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "dest")
        torch.testing.assert_close(_outputs(loaded), versions[n], atol=ATOL, rtol=0)
