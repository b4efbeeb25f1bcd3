"""peftlab bench learn: its options refuse bad input clearly; its table reads its rows (the timing
itself is a benchmark, not a test)."""

from __future__ import annotations

import pytest

from peftlab.bench_learn import LearnConfig, LearnRow, format_table, parse_options
from peftlab.errors import ConfigError


def test_options_are_checked_before_any_model_loads():
    config = parse_options(["--backends", "fused,peft", "--dtypes", "fp32", "--target", "0.7"])
    assert (config.backends, config.dtypes, config.target) == (("fused", "peft"), ("fp32",), 0.7)
    with pytest.raises(ConfigError, match="Did you mean 'fused'"):
        parse_options(["--backends", "fusd"])
    with pytest.raises(ConfigError, match="at least 1"):
        parse_options(["--eval-every", "0"])
    with pytest.raises(Exception, match="No task"):
        parse_options(["--task", "sentimnet"])


def test_the_table_gives_steps_seconds_and_the_ratio_to_peft():
    rows = [LearnRow("fused", "fp32", steps=20, train_s=60.0, wall_s=70.0, metric=0.81, base=0.06),
            LearnRow("peft", "fp32", steps=20, train_s=80.0, wall_s=92.0, metric=0.81, base=0.06),
            LearnRow("reference", "fp32", status="not reached", steps=40, train_s=150.0, wall_s=170.0, metric=0.7),
            LearnRow("fused", "bf16", status="failed: RuntimeError: no kernel")]
    table = format_table(rows, LearnConfig(target=0.8))
    lines = table.splitlines()
    assert "accuracy >= 0.8" in lines[0]
    fused = next(line for line in lines if line.startswith("fused      fp32"))
    assert "60.0" in fused and "70.0" in fused and "0.75x" in fused
    assert any(line.startswith("reference") and "not reached" in line for line in lines)
    assert any("failed: RuntimeError: no kernel" in line for line in lines)
    assert "base model (untrained adapter): accuracy 0.060" in table and "2.16 min" in table
