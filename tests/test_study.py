"""peftlab study: the grid, its file, resuming without redoing finished cells, the summary.

Cells run in this process on the random tiny-bert (seconds); the course's study runs each cell
in a child process on MiniLM (see notebooks/study/)."""

from __future__ import annotations

import csv
import io
import json

import pytest

import peftlab.study.running as study_running  # run_study calls run_cell from here
from peftlab.cli import main
from peftlab.errors import ConfigError
from peftlab.study import StudyConfig, load_study, run_study, summarize

CONFIG = StudyConfig(model="tiny-bert", methods=("lora", "full"), lrs=(("lora", (1e-2,)), ("full", (1e-3,))),
                     seeds=(0, 1), steps=3, batch_size=4, max_length=32, validation_rows=16, test_rows=16,
                     forgetting_rows=4)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(CONFIG, out, in_child=False, log=None)


def test_the_study_writes_every_cell_with_its_measurements(finished):
    out, study = finished
    assert [(c["method"], c["seed"]) for c in study["cells"]] == [("lora", 0), ("lora", 1), ("full", 0), ("full", 1)]
    for cell in study["cells"]:
        assert cell["status"] == "ok"
        assert 0.0 <= cell["valid_accuracy"] <= 1.0 and 0.0 <= cell["test_accuracy"] <= 1.0
        assert cell["forgetting"] >= 0.0 and cell["peak_memory_mb"] > 0 and cell["step_time_s"] > 0
        assert len(cell["losses"]) == 3
    lora, full = study["cells"][0], study["cells"][2]
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert full["forgetting"] > lora["forgetting"]  # every weight moved vs. a small update
    stored = json.loads((out / "study.json").read_text())
    assert stored["provenance"]["command"].startswith("peftlab study --task sentiment")
    assert {"cpu", "torch", "date", "kernels"} <= set(stored["provenance"])
    assert stored["base"]["test"]["n"] == 16
    rows = list(csv.DictReader(io.StringIO((out / "study.csv").read_text())))
    assert len(rows) == 4 and rows[0]["method"] == "lora" and "test_accuracy" in rows[0]
    assert "plotly" in (out / "study.html").read_text()[:200_000]


def test_resume_runs_only_the_missing_cells(finished, tmp_path, monkeypatch):
    out, study = finished
    cut = dict(study, cells=study["cells"][:3])  # as if interrupted during the fourth cell
    (tmp_path / "study.json").write_text(json.dumps(cut))
    ran = []
    real = study_running.run_cell
    monkeypatch.setattr(study_running, "run_cell", lambda *a: ran.append(a[1:]) or real(*a))
    resumed = run_study(CONFIG, tmp_path, in_child=False, log=None)
    assert ran == [("full", 1e-3, 1)]
    assert resumed["cells"][:3] == study["cells"][:3] and len(resumed["cells"]) == 4
    # a third seed extends the grid: two new cells, nothing redone
    ran.clear()
    run_study(StudyConfig(**{**CONFIG.__dict__, "seeds": (0, 1, 2)}), tmp_path, in_child=False, log=None)
    assert ran == [("lora", 1e-2, 2), ("full", 1e-3, 2)]
    # another training budget would mix incomparable cells: refused
    with pytest.raises(ConfigError, match="steps"):
        run_study(StudyConfig(**{**CONFIG.__dict__, "steps": 4}), tmp_path, in_child=False, log=None)


def test_a_failing_cell_is_recorded_and_tried_again(tmp_path, monkeypatch):
    config = StudyConfig(**{**CONFIG.__dict__, "methods": ("lora",), "lrs": (("lora", (1e-2,)),), "seeds": (0,)})

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(study_running, "run_cell", broken)
    first = run_study(config, tmp_path, in_child=False, log=None)
    assert first["cells"][0]["status"] == "error: RuntimeError: out of memory"
    monkeypatch.undo()
    again = run_study(config, tmp_path, in_child=False, log=None)
    assert [c["status"] for c in again["cells"]] == ["ok"]


def test_summary_picks_the_learning_rate_on_validation_not_test():
    def cell(lr, seed, valid, test):
        return {"method": "lora", "lr": lr, "seed": seed, "status": "ok", "valid_accuracy": valid,
                "test_accuracy": test, "forgetting": 0.01, "trainable_params": 10, "total_params": 100,
                "peak_memory_mb": 500.0, "step_time_s": 0.1}

    study = {"config": {"task": "sentiment", "framing": "classify", "methods": ["lora"],
                        "lrs": {"lora": [1e-3, 1e-2]}, "seeds": [0, 1]},
             "cells": [cell(1e-3, 0, 0.70, 0.90), cell(1e-3, 1, 0.72, 0.92),  # best on test only
                       cell(1e-2, 0, 0.80, 0.75), cell(1e-2, 1, 0.82, 0.79)]}
    (row,) = summarize(study)
    assert row["lr"] == 1e-2 and row["seeds"] == 2
    assert row["test_accuracy"] == pytest.approx(0.77) and row["test_accuracy_std"] == pytest.approx(0.0282843, rel=1e-5)
    assert (row["test_accuracy_min"], row["test_accuracy_max"]) == (0.75, 0.79)
    assert row["trainable_percent"] == pytest.approx(10.0)


def test_bad_study_options_are_one_clear_line(tmp_path, capsys):
    assert main(["study", "--methods", "lorra", "--out", str(tmp_path)]) == 2
    assert "Did you mean 'lora'" in capsys.readouterr().err
    assert main(["study", "--methods", "lora", "--lr", "ia3=1e-2", "--out", str(tmp_path)]) == 2
    assert "not among the study's methods" in capsys.readouterr().err
    assert main(["study", "--lr", "lora", "--out", str(tmp_path)]) == 2
    assert "METHOD=LR" in capsys.readouterr().err
    with pytest.raises(Exception, match="No study"):
        load_study(tmp_path / "missing.json")


def test_a_method_entry_carries_its_own_settings(tmp_path):
    from peftlab.study.specs import parse_spec

    spec = parse_spec("lora:r=64:rslora:alpha=32:targets=query+value:loraplus=16:batch=8:steps=5")
    assert spec.method == "lora"
    assert spec.adapt == {"r": 64, "use_rslora": True, "alpha": 32.0, "targets": ("query", "value")}
    assert spec.train == {"loraplus_lr_ratio": 16.0, "batch_size": 8, "steps": 5}
    assert parse_spec("lora:targets=all-linear").adapt == {"targets": "all-linear"}
    assert parse_spec("full:batch=2").train == {"batch_size": 2}
    for bad, match in (("lora:alpa=4", "Did you mean 'alpha'"), ("lora:r=0", "must be positive"), ("lora:r=a", "integer"),
                       ("lora:rslora=1", "bare rslora"), ("full:r=4", "full fine-tuning has no adapter"),
                       ("ia3:r=4", "ia3 has no setting 'r'"), ("lorra:r=4", "Did you mean 'lora'")):
        with pytest.raises(ConfigError, match=match):
            parse_spec(bad)

    # two entries of one method are two rows, each trained with its settings; --lr names the entry
    config = StudyConfig(**{**CONFIG.__dict__, "methods": ("lora:r=2", "lora:r=8:rslora:steps=2"),
                            "lrs": (("lora:r=8:rslora:steps=2", (2e-2,)),), "seeds": (0,)})
    assert config.lrs_of("lora:r=2") == config.lrs_of("lora")  # an entry without --lr sweeps its method's rates
    config = StudyConfig(**{**config.__dict__, "lrs": config.lrs + (("lora:r=2", (1e-2,)),)})
    study = run_study(config, tmp_path, in_child=False, log=None)
    small, large = study["cells"]
    assert (small["method"], small["lr"], len(small["losses"])) == ("lora:r=2", 1e-2, 3)
    assert (large["lr"], len(large["losses"])) == (2e-2, 2)
    assert large["trainable_params"] > small["trainable_params"]  # r 8 vs 2 on the same targets (the head alike)
    assert [row["method"] for row in summarize(study)] == ["lora:r=2", "lora:r=8:rslora:steps=2"]
    assert main(["study", "--methods", "lora:r=8", "--lr", "lora:r=8=1e-3", "--seeds", "0", "--steps", "0",
                 "--out", str(tmp_path / "x")]) == 2  # --lr read with the spec's own "=" (steps=0 is refused after)


def test_updates_record_what_training_did_to_the_weights(tmp_path):
    """--updates: each cell's ΔW on the named layers, read the same way for an adapter and for
    full fine-tuning (compared with the weights before training)."""
    config = StudyConfig(**{**CONFIG.__dict__, "methods": ("lora:r=2", "full"), "seeds": (0,),
                            "lrs": (("lora:r=2", (1e-2,)), ("full", (1e-3,))), "updates": ("query", "value"),
                            "reduce_intruders": (0.5, 0.0)})
    study = run_study(config, tmp_path, in_child=False, log=None)
    lora, full = study["cells"]
    assert sorted(lora["updates"]) == sorted(full["updates"]) and len(lora["updates"]) == 4  # 2 layers x q, v
    for name, report in lora["updates"].items():
        assert report["norm"] > 0 and report["effective_rank"] <= 2.0 + 1e-6  # rank 2: at most 2 directions
        assert len(report["singular_values"]) == 2 and 0 <= report["intruders"] <= 10
        assert len(report["similarity"]) == 10 and all(0.0 <= s <= 1.0 + 1e-6 for s in report["similarity"])
        assert report["rank_90"] <= 2
    ranks = [r["effective_rank"] for r in full["updates"].values()]
    assert min(ranks) > 2.0  # full fine-tuning's update spreads over many directions
    assert all(len(r["singular_values"]) > 2 for r in full["updates"].values())
    assert "--updates query,value --reduce-intruders 0.5,0" in study["provenance"]["command"]
    # --reduce-intruders: the LoRA cell measured again after each reduction; full fine-tuning has no adapter
    assert sorted(lora["reduced"]) == ["0", "0.5"] and "reduced" not in full
    for after in lora["reduced"].values():
        assert 0 <= after["intruders"] <= 10 * after["matrices"] and after["matrices"] <= 4
        assert 0.0 <= after["test_accuracy"] <= 1.0 and after["forgetting"] >= 0.0
    with pytest.raises(ConfigError, match="reduce-intruders takes shares"):
        run_study(StudyConfig(**{**config.__dict__, "reduce_intruders": (1.5,)}), tmp_path / "x", in_child=False, log=None)
    # a study recorded without updates cannot be resumed with them (its cells lack them)
    with pytest.raises(ConfigError, match="updates"):
        run_study(StudyConfig(**{**config.__dict__, "updates": ()}), tmp_path, in_child=False, log=None)
