"""`peftlab bench train`: end to end on tiny-llama (one round), options, ratios, the table."""

from __future__ import annotations

import json

import pytest

from peftlab import bench
from peftlab.bench import VARIANTS, BenchConfig, BenchRow, format_table, parse_options, ratios

UNCOMPILED = tuple(v for v in VARIANTS if not v.startswith("compiled"))
from peftlab.cli import main as cli_main
from peftlab.errors import ConfigError


def test_bench_train_end_to_end_on_tiny_llama(tmp_path, capsys):
    out = tmp_path / "charts" / "bench.html"
    status = cli_main(["bench", "train", "--model", "tiny-llama", "--repeats", "1", "--batch", "1",
                       "--seq-len", "16", "--rank", "4", "--dtypes", "fp32", "--out", str(out),
                       "--only", ",".join(UNCOMPILED)])
    assert status == 0
    printed = capsys.readouterr().out
    data = json.loads((out.parent / "bench.json").read_text())
    rows = data["rows"]
    assert [r["variant"] for r in rows] == list(UNCOMPILED)  # every row asked for, in order
    fused_ok = "fused" in __import__("peftlab.api", fromlist=["BACKENDS"]).BACKENDS
    for row in rows:
        if row["variant"].startswith("fused") and not fused_ok:
            assert row["status"].startswith("unavailable")
            continue
        assert row["status"] == "ok", row
        assert row["median_s"] > 0 and len(row["times"]) == 1
        assert row["peak_mb"] >= 0 and row["total_mb"] >= row["resident_mb"] > 0
        assert row["loss"] == pytest.approx(10.8, abs=0.5)  # a random model: ~ln(49152)
        assert row["gflops"] == pytest.approx(row["gflop"] / row["median_s"])
        assert row["peak_fraction"] == pytest.approx(row["gflops"] / row["peak_gflops"]) and row["peak_gflops"] > 0
    by = {r["variant"]: r for r in rows}
    assert by["full"]["trainable"] > 100 * by["ref-lora"]["trainable"] and by["frozen"]["trainable"] == 0
    assert by["ref-lora"]["trainable"] == by["peft-lora"]["trainable"] == by["bnb-qlora"]["trainable"]
    for name in UNCOMPILED:
        assert name in printed
    assert "load average" in printed and "peak MB" in printed and "GFLOP/s" in printed and "of peak" in printed
    assert "PyTorch kernels" in printed and "peak GEMM" in printed and data["machine"] in printed
    if fused_ok:
        assert "fused-lora / peft-lora" in printed and "fused-lora / frozen" in printed and data["ratios"]
    html = out.read_text()
    assert "plotly" in html.lower() and "peak memory" in html and "ref-lora" in html


def test_the_compiled_variant_is_peft_lora_under_torch_compile(monkeypatch):
    """Wiring only (a real compile of even the tiny model takes most of a minute, twice: the
    benchmark's own run compiles it): torch.compile wraps the peft model, the step is peft-lora's."""
    import torch

    from peftlab import bench

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    config = BenchConfig(model="tiny-llama", batch=1, seq_len=16, rank=4)
    step, trainable = bench._build_step("compiled-peft-lora", config, torch.float32)
    plain, plain_trainable = bench._build_step("peft-lora", config, torch.float32)
    assert len(compiled) == 1 and compiled[0] is step.model and type(step.model).__name__ == "PeftModelForCausalLM"
    assert trainable == plain_trainable and step() == pytest.approx(plain())
    monkeypatch.setattr(bench, "_has_cxx", lambda: False)
    assert "C++ compiler" in bench.unavailable_reason("compiled-peft-lora")


def test_options_are_checked_before_anything_loads():
    config = parse_options(["--only", "peft-lora,fused-lora", "--dtypes", "bf16", "--repeats", "2"])
    assert config.only == ("peft-lora", "fused-lora") and config.dtypes == ("bf16",)
    assert parse_options([]) == BenchConfig()  # the documented defaults
    with pytest.raises(ConfigError, match="fused-lora"):
        parse_options(["--only", "fused-lor"])  # a typo gets a suggestion
    with pytest.raises(ConfigError, match="fp32"):
        parse_options(["--dtypes", "fp8"])
    with pytest.raises(ConfigError, match="at least 1"):
        parse_options(["--repeats", "0"])


def test_cli_usage_error_exit_status(capsys):
    assert cli_main(["bench", "train", "--only", "nope"]) == 2
    assert "--only: 'nope' is not known. Expected some of: frozen" in capsys.readouterr().err


def test_unavailable_fused_backend_is_reported(monkeypatch):
    import peftlab.api

    monkeypatch.setattr(peftlab.api, "BACKENDS", ("reference", "peft"))
    assert bench.unavailable_reason("fused-qlora").startswith("peftlab.adapt has no")
    assert bench.unavailable_reason("ref-lora") is None


def test_ratios_and_table_from_rows():
    def row(variant, t, peak, status="ok", times=None):
        return BenchRow("fp32", variant, status, t, t, peak, 1000.0, 1000.0 + peak, 2.0, 10,
                        times or [t])

    rows = [row("peft-lora", 2.0, 400.0, times=[2.0, 4.0, 2.0]),
            row("fused-lora", 1.5, 100.0, times=[1.0, 3.6, 1.5]),
            row("bnb-qlora", 3.0, 300.0), BenchRow("fp32", "fused-qlora", "unavailable: no fused")]
    (r,) = ratios(rows)  # the QLoRA pair has no fused row: no ratio
    assert r["pair"] == "fused-lora / peft-lora"
    assert r["time"] == pytest.approx(0.75) and r["peak"] == pytest.approx(0.25)
    assert r["paired"] == pytest.approx(0.75)  # rounds' own ratios 0.5, 0.9, 0.75
    assert r["total"] == pytest.approx(1100 / 1400)
    text = format_table(rows, BenchConfig(model="tiny-llama"))
    assert "unavailable: no fused" in text and "time 0.75x (paired 0.75x)" in text and "peak 0.25x" in text


def test_step_flops_count_the_shapes():
    """tiny-llama: 2 layers, d = 64, 4 heads x 16, k/v 64 -> 32, MLP 64 -> 128 -> 64, vocab 49152."""
    from peftlab.bench_peak import step_flops
    from peftlab.models import load_model

    model, _ = load_model("tiny-llama")
    c = model.config
    d, f, kv, v = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim, c.vocab_size
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f  # q, k, v, o, gate, up, down
    batch, seq, r = 2, 8, 4
    f_lin = 2 * batch * seq * (c.num_hidden_layers * per_layer + d * v)
    f_att = 4 * batch * seq ** 2 * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    lora_dims = c.num_hidden_layers * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d))
    assert step_flops(model, "frozen", batch, seq, r) == 2 * f_lin + 3 * f_att
    assert step_flops(model, "full", batch, seq, r) == 3 * f_lin + 3 * f_att
    assert step_flops(model, "peft-lora", batch, seq, r) == 2 * f_lin + 3 * f_att + 3 * 2 * batch * seq * r * lora_dims
