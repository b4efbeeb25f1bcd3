"""``peftlab bench deploy``: its options, its variants (a merged LoRA is the same model as the
unmerged one, on plain modules) and a smoke run on the tiny model that writes its JSON with provenance.
Timings are never asserted: only that every variant ran and what the rows say about themselves."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import peftlab
from peftlab import bench_deploy
from peftlab.errors import ConfigError
from peftlab.inject import AdaptedLayer


def test_options_are_checked_and_the_base_is_always_timed():
    config = bench_deploy.parse_options(["--only", "lora,ia3", "--repeats", "2"])
    assert config.only == ("base", "lora", "ia3") and config.repeats == 2
    with pytest.raises(ConfigError, match="Did you mean 'prefix_tuning'"):
        bench_deploy.parse_options(["--only", "prefix-tuning"])
    with pytest.raises(ConfigError, match="--new-tokens must be at least 1"):
        bench_deploy.parse_options(["--new-tokens", "0"])
    assert bench_deploy.parse_options([]).only == bench_deploy.VARIANTS


def test_a_merged_lora_is_the_unmerged_one_on_plain_modules():
    base, _ = peftlab.load_model("tiny-llama")
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    unmerged = bench_deploy.build_variant("lora", base, seed=3)
    merged = bench_deploy.build_variant("lora-merged", base, seed=3)
    assert any(isinstance(m, AdaptedLayer) for m in unmerged.modules())
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    with torch.no_grad():
        out, plain, reference = (m(input_ids=ids).logits for m in (merged, base, unmerged))
    assert torch.allclose(out, reference, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-4), "the adapter's weights are not zero"


def test_a_smoke_run_times_every_variant_and_writes_its_provenance(tmp_path, capsys):
    out = tmp_path / "deploy.json"
    status = bench_deploy.main(argparse.Namespace(what="deploy", options=[
        "--model", "tiny-llama", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--out", str(out)]))
    assert status == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in bench_deploy.VARIANTS for m in bench_deploy.MODES}
    assert all(r["status"] == "ok" and len(r["times"]) == 1 and r["median_s"] > 0 for r in rows), rows
    assert all(r["vs_base"] == 1.0 for r in rows if r["variant"] == "base")
    assert data["command"].startswith("peftlab bench deploy --model tiny-llama")
    assert bench_deploy.parse_options(data["command"].split()[3:]) == bench_deploy.DeployConfig(
        **{**data["config"], "only": tuple(data["config"]["only"]), "out": "bench_deploy.json"})
    assert {"cpu", "date", "torch"} <= set(data["provenance"])
    printed = capsys.readouterr().out
    assert "prefix_tuning" in printed and "x base" in printed
