"""Figure builders (peftlab/plots.py): each returns a go.Figure holding the right numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

go = pytest.importorskip("plotly.graph_objects")

from peftlab import plots  # noqa: E402
from peftlab.errors import ConfigError  # noqa: E402


def _titles(fig) -> tuple[str, str, str]:
    return fig.layout.title.text, fig.layout.xaxis.title.text, fig.layout.yaxis.title.text


def test_ema_is_bias_corrected():
    out = plots.ema([2.0, 4.0, 4.0], smoothing=0.5)
    # s1 = 1 -> 1/0.5 = 2;  s2 = 0.5 + 2 = 2.5 -> 2.5/0.75;  s3 = 1.25 + 2 = 3.25 -> 3.25/0.875
    np.testing.assert_allclose(out, [2.0, 2.5 / 0.75, 3.25 / 0.875])
    np.testing.assert_allclose(plots.ema([1.0, 5.0], smoothing=0.0), [1.0, 5.0])
    with pytest.raises(ConfigError, match="smoothing"):
        plots.ema([1.0], smoothing=1.0)


def test_loss_curve_raw_smoothed_and_eval():
    losses = torch.tensor([4.0, 3.0, 3.5, 2.0])
    fig = plots.loss_curve(losses, smoothing=0.6, eval_losses=[3.2, 2.4], eval_steps=[2, 4])
    assert isinstance(fig, go.Figure) and len(fig.data) == 3
    raw, smooth, evals = fig.data
    np.testing.assert_allclose(raw.x, [1, 2, 3, 4])
    np.testing.assert_allclose(raw.y, [4.0, 3.0, 3.5, 2.0])
    np.testing.assert_allclose(smooth.y, plots.ema([4.0, 3.0, 3.5, 2.0], 0.6))
    np.testing.assert_allclose(evals.x, [2, 4])
    np.testing.assert_allclose(evals.y, [3.2, 2.4])
    assert "loss" in raw.hovertemplate
    title, x, y = _titles(fig)
    assert title == "Training loss" and x == "optimizer step" and "nats" in y
    assert fig.layout.colorway == plots.PALETTE


def test_loss_curve_from_training_records():
    records = [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}, {"step": 30, "loss": None}]
    fig = plots.loss_curve(records)
    np.testing.assert_allclose(fig.data[0].x, [10, 20])
    np.testing.assert_allclose(fig.data[0].y, [2.0, 1.0])


def test_memory_ledger_stacks_categories_in_mib():
    estimated = {"weights": 100 * 2**20, "gradients": 50 * 2**20, "optimizer": 25 * 2**20}
    measured = {"weights": 101 * 2**20, "activations": 30 * 2**20}
    fig = plots.memory_ledger(estimated, measured)
    assert fig.layout.barmode == "stack"
    by_name = {t.name: t for t in fig.data}
    assert list(by_name) == ["weights", "gradients", "optimizer", "activations"]
    assert list(by_name["weights"].x) == ["estimated", "measured"]
    np.testing.assert_allclose(by_name["weights"].y, [100, 101])
    np.testing.assert_allclose(by_name["activations"].y, [0, 30])
    np.testing.assert_allclose(by_name["gradients"].customdata, [50 * 2**20, 0])  # bytes on hover
    totals = sorted(a.text for a in fig.layout.annotations)
    assert totals == ["131.0 MiB", "175.0 MiB"]
    assert _titles(fig)[2] == "memory (MiB)"
    only = plots.memory_ledger(estimated)
    assert list(only.data[0].x) == ["estimated"]


def test_parameter_budget_from_count_parameters(tiny_llama_small):
    import peftlab

    model = peftlab.adapt(tiny_llama_small, "lora", r=2, targets=("q_proj",))
    count = peftlab.count_parameters(model)
    fig = plots.parameter_budget(count)  # the ParameterCount itself, or its .by_type
    trainable, frozen = fig.data
    assert trainable.name == "trainable" and frozen.name == "frozen"
    types = list(trainable.x)
    assert types == list(count.by_type)
    lora = types.index("LoRA")
    assert trainable.y[lora] == count.by_type["LoRA"]["trainable"] > 0
    assert frozen.y[lora] == 0
    assert sum(trainable.y) == count.trainable
    assert sum(trainable.y) + sum(frozen.y) == count.total
    assert plots.parameter_budget(count.by_type, log=True).layout.yaxis.type == "log"


def test_parameter_budget_from_rows_by_method_and_layer_type():
    rows = [
        {"method": "lora", "layer_type": "attention", "trainable": 100},
        {"method": "lora", "layer_type": "mlp", "trainable": 300},
        {"method": "ia3", "layer_type": "attention", "trainable": 10},
        {"method": "lora", "layer_type": "attention", "trainable": 5},
    ]
    fig = plots.parameter_budget(rows)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["attention"].x) == ["lora", "ia3"]
    assert list(by_name["attention"].y) == [105, 10]
    assert list(by_name["mlp"].y) == [300, 0]
    assert _titles(fig)[1] == "method"


def test_spectra_heatmap_log_colour_and_raw_hover():
    spectra = {"layer.0": torch.tensor([100.0, 10.0, 1.0]), "layer.1": np.array([10.0, 0.0])}
    fig = plots.spectra_heatmap(spectra)
    (heat,) = fig.data
    assert list(heat.y) == ["layer.0", "layer.1"]
    assert list(heat.x) == [1, 2, 3]
    z = np.asarray(heat.z, dtype=float)
    np.testing.assert_allclose(z[0], [2.0, 1.0, 0.0])
    assert z[1, 0] == pytest.approx(1.0) and np.isnan(z[1, 1]) and np.isnan(z[1, 2])  # 0 and padding
    np.testing.assert_allclose(np.asarray(heat.customdata, dtype=float)[0], [100.0, 10.0, 1.0])
    assert heat.colorscale is not None and "σ" in heat.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"
    linear = plots.spectra_heatmap(spectra, log=False, max_index=2)
    np.testing.assert_allclose(np.asarray(linear.data[0].z, dtype=float)[0], [100.0, 10.0])


def test_spectrum_evolution_from_history_arrays():
    steps = np.array([0, 10, 20])
    values = {"q": np.array([[3.0, 2.0, 1.0], [4.0, 2.5, 1.0], [5.0, 3.0, 1.5]]), "v": np.ones((3, 3))}
    fig = plots.spectrum_evolution(steps, values, top=2)
    assert [t.name for t in fig.data] == ["σ1", "σ2"]
    np.testing.assert_allclose(fig.data[0].x, [0, 10, 20])
    np.testing.assert_allclose(fig.data[0].y, [3.0, 4.0, 5.0])
    np.testing.assert_allclose(fig.data[1].y, [2.0, 2.5, 3.0])
    assert fig.layout.yaxis.type == "log" and fig.layout.title.text.endswith(": q")
    single = plots.spectrum_evolution(steps, values["v"], layer="v", log=False)
    assert len(single.data) == 3 and single.layout.yaxis.type == "linear"


def test_spectrum_evolution_from_a_spectrum_history(tiny_llama_small):
    import peftlab

    model = peftlab.adapt(tiny_llama_small, "lora", r=3, targets=("v_proj",))
    history = peftlab.SpectrumHistory(every=1)
    for step in (1, 2):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.1 * step)
        history({"step": step}, model)
    steps, values = history.as_arrays()
    fig = plots.spectrum_evolution(steps, values)
    assert len(fig.data) == 3
    np.testing.assert_allclose(fig.data[0].y, values[next(iter(values))][:, 0])


def test_subspace_similarity_heatmap():
    grid = torch.tensor([[1.0, 0.5], [0.25, 0.75], [0.1, 0.2]])
    fig = plots.subspace_similarity_heatmap(grid, "r=8", "r=64")
    (heat,) = fig.data
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), grid.numpy())
    assert list(heat.x) == [1, 2] and list(heat.y) == [1, 2, 3]
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert "r=64" in fig.layout.xaxis.title.text and "r=8" in fig.layout.yaxis.title.text


def test_rank_allocation_bars_and_heatmap():
    bars = plots.rank_allocation({"q": 4, "v": 12})
    assert list(bars.data[0].x) == ["q", "v"] and list(bars.data[0].y) == [4, 12]
    over_time = plots.rank_allocation({"q": [8, 6, 4], "v": [8, 10, 12]}, steps=[0, 100, 200])
    (heat,) = over_time.data
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), [[8, 8], [6, 10], [4, 12]])
    assert list(heat.x) == ["q", "v"] and list(heat.y) == [0, 100, 200]
    from_array = plots.rank_allocation(np.array([[8, 8], [4, 12]]), layers=["a", "b"])
    assert list(from_array.data[0].x) == ["a", "b"] and list(from_array.data[0].y) == [0, 1]


def test_dora_changes_scatter_per_layer():
    steps = [100, 200, 300]
    magnitude = np.array([[0.1, 0.2], [0.2, 0.3], [0.3, 0.5]])
    direction = np.array([[1e-3, 2e-3], [2e-3, 3e-3], [4e-3, 5e-3]])
    fig = plots.dora_changes(steps, magnitude, direction, layers=["q", "v"])
    assert [t.name for t in fig.data] == ["q", "v"]
    np.testing.assert_allclose(fig.data[1].x, [2e-3, 3e-3, 5e-3])  # ΔD on x
    np.testing.assert_allclose(fig.data[1].y, [0.2, 0.3, 0.5])  # ΔM on y
    np.testing.assert_allclose(fig.data[0].marker.color, steps)  # colour = step
    assert "ΔD" in fig.layout.xaxis.title.text and "ΔM" in fig.layout.yaxis.title.text
    one = plots.dora_changes(steps, magnitude[:, 0], direction[:, 0])
    assert len(one.data) == 1


def test_quantization_errors_shared_bins_and_rmse():
    rng = np.random.default_rng(0)
    errors = {"NF4": torch.tensor(rng.normal(0, 0.01, 5000)), "int4": rng.normal(0, 0.03, 5000)}
    fig = plots.quantization_errors(errors, bins=40)
    nf4, int4 = fig.data
    rmse = {k: float(np.sqrt(np.mean(np.asarray(v) ** 2))) for k, v in errors.items()}
    assert nf4.name == f"NF4 (RMSE {rmse['NF4']:.3g})" and int4.name == f"int4 (RMSE {rmse['int4']:.3g})"
    assert rmse["NF4"] == pytest.approx(0.01, rel=0.05) and rmse["int4"] == pytest.approx(0.03, rel=0.05)
    np.testing.assert_allclose(nf4.x, int4.x)  # shared bins, comparable
    assert len(nf4.x) == 40
    assert sum(nf4.customdata) == 5000 and sum(int4.customdata) == 5000
    np.testing.assert_allclose(sum(nf4.y), 100.0)  # shares in percent
    assert max(nf4.y) > max(int4.y)  # the tighter error piles up in fewer bins
    assert "%" in fig.layout.yaxis.title.text


def test_benchmark_bars_two_panels():
    rows = [
        {"name": "lora fp32", "step_time_s": 6.3, "peak_mb": 5400},
        {"name": "qlora", "step_time_s": 5.7, "peak_mb": None},
    ]
    fig = plots.benchmark_bars(rows)
    times, peaks = fig.data
    assert list(times.x) == ["lora fp32", "qlora"]
    np.testing.assert_allclose(times.y, [6.3, 5.7])
    assert peaks.y[0] == 5400 and np.isnan(peaks.y[1])
    assert times.xaxis == "x" and peaks.xaxis == "x2"
    assert fig.layout.yaxis.title.text == "seconds per step (s)"
    assert fig.layout.yaxis2.title.text == "peak memory (MB)"
    assert list(peaks.text) == ["5,400 MB", ""]


def test_figures_work_as_figure_widgets():
    # the widgets pour these figures into FigureWidgets and update traces in place
    pytest.importorskip("anywidget")
    widget = go.FigureWidget(plots.loss_curve([3.0, 2.0]))
    with widget.batch_update():
        widget.data[0].y = [3.0, 2.0, 1.0]
    assert list(widget.data[0].y) == [3.0, 2.0, 1.0]


@pytest.fixture
def tiny_llama_small():
    """A very small random Llama built from a config (no tokenizer needed here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config)


def test_curves_and_loss_curves_one_line_per_run():
    fig = plots.loss_curves({"lora": [3.0, 2.0, 1.5], "dora": [3.0, 2.5]})
    assert [t.name for t in fig.data] == ["lora", "dora"]
    np.testing.assert_allclose(fig.data[0].x, [1, 2, 3])
    np.testing.assert_allclose(fig.data[1].y, [3.0, 2.5])
    assert "nats" in _titles(fig)[2]
    log = plots.curves({"r = 8": [1.0, 0.9]}, steps=[1, 2], x_title="iteration", y_title="error", log_y=True)
    assert log.layout.yaxis.type == "log" and _titles(log)[1] == "iteration"


def test_singular_values_drops_zeros_on_the_log_axis():
    fig = plots.singular_values({"lora": torch.tensor([2.0, 1.0, 0.0]), "lokr": [4.0, 3.0, 2.0, 1.0]})
    assert fig.layout.yaxis.type == "log"
    assert np.isnan(fig.data[0].y[2]) and len(fig.data[1].y) == 4
    np.testing.assert_allclose(fig.data[1].x, [1, 2, 3, 4])


def test_bars_one_bar_per_entry_with_its_value():
    fig = plots.bars({"cat": 0.0, "linear": 0.99}, y_title="relative error", fmt="{:.2f}")
    assert list(fig.data[0].x) == ["cat", "linear"]
    np.testing.assert_allclose(fig.data[0].y, [0.0, 0.99])
    assert list(fig.data[0].text) == ["0.00", "0.99"]


def test_magnitude_direction_fits_a_slope_per_method():
    d = np.array([1.0, 2.0, 3.0])
    fig = plots.magnitude_direction({"LoRA": (d, 2 * d + 1), "DoRA": (d, -d)})
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["LoRA: slope +2", "DoRA: slope -1"]
    points = [t for t in fig.data if t.mode == "markers"]
    np.testing.assert_allclose(points[1].y, [-1.0, -2.0, -3.0])
    assert points[0].xaxis == "x" and points[1].xaxis == "x2"


def test_the_renderers_chatter_stays_out_of_the_cell(monkeypatch, capsys):
    import logging
    import sys
    import warnings

    import plotly.graph_objects as go

    from peftlab.plots import notebook

    monkeypatch.setattr(notebook, "_NO_PNG", [])

    def noisy_to_image(self, **kwargs):  # what kaleido and choreographer do on a busy machine
        warnings.warn("Unhandled message type", RuntimeWarning)
        logging.getLogger("choreographer").warning("browser slow to start")
        print("chromium: something", file=sys.stderr)
        return b"\x89PNG"

    monkeypatch.setattr(go.Figure, "to_image", noisy_to_image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escaped would raise here
        assert notebook.static_png(go.Figure()) == "iVBORw=="
    assert capsys.readouterr().err == ""
    assert logging.getLogger("choreographer").level == logging.NOTSET  # given back
