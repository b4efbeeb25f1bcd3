"""The Lab and the small widgets, driven without a kernel: set values, call click handlers.

One Lab on tiny-llama is shared by the module (building the model/dataset catalogue is the slow
part); each test puts back what it changes.
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def lab():
    from peftlab.widgets import Lab

    return Lab(task=None, model="tiny-llama", steps=3, batch_size=2, max_length=64, spectrum_every=1,
               redraw_every_s=0.0)


def _trainable(lab) -> int:
    assert lab.estimate is not None, lab.preview.value
    return lab.estimate.count.trainable


def test_preview_counts_follow_the_rank_and_targets(lab):
    # tiny-llama: hidden 64, 2 layers, k/v project to 32 (grouped-query attention)
    lab.targets_w.value = "method default"  # LoRA's default for Llama: q_proj, v_proj
    assert _trainable(lab) == 2 * 8 * ((64 + 64) + (64 + 32))
    lab.r_w.value = 16
    assert _trainable(lab) == 2 * 16 * ((64 + 64) + (64 + 32))
    assert "7,168" in lab.preview.value and "LoRA" in lab.preview.value
    lab.targets_w.value = "attention"  # q, k, v, o
    assert _trainable(lab) == 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))
    lab.targets_w.value = "all-linear"  # + gate, up, down
    assert _trainable(lab) == 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    lab.r_w.value = 8
    lab.targets_w.value = "method default"
    assert "Estimated memory" in lab.preview.value


def test_backend_and_dropout_change_the_memory_preview(lab):
    """The preview's activations follow the backend (the fused path keeps no logits) and the
    adapter dropout (each layer then keeps its own dropout(x))."""
    reference = lab.estimate.memory["activations"]
    lab.dropout_w.value = 0.0
    assert lab.estimate.memory["activations"] < reference
    lab.dropout_w.value = 0.05
    lab.backend_w.value = "fused"
    assert lab.estimate.memory["activations"] < reference / 4  # tiny-llama: logits dominate
    lab.method_w.value = "ia3"  # no fused kernel: estimated for the reference path, and said so
    assert any("no kernels for ia3" in note for note in lab.estimate.notes)
    lab.method_w.value = "lora"
    lab.backend_w.value = "reference"
    assert lab.estimate.memory["activations"] == reference


def test_module_picker_lists_shapes_and_switches_to_custom(lab):
    labels = dict((value, label) for label, value in lab.modules_w.options)
    assert "64→32" in labels["k_proj"] and "+768 each" in labels["k_proj"]  # 8 * (64 + 32)
    lab.modules_w.value = ("k_proj",)
    assert lab.targets_w.value.startswith("custom")
    assert _trainable(lab) == 2 * 8 * (64 + 32)
    lab.modules_w.value = ()
    lab.targets_w.value = "method default"


def test_per_layer_counts_of_bottleneck_adapters():
    from peftlab.widgets import plan

    houlsby = plan.Choice(model="tiny-llama", method="bottleneck", r=8)
    # down (8 x 64) + 8 + up (64 x 8) + 64, whatever the layer's input width
    assert plan.per_layer_params("bottleneck", 128, 64, houlsby) == 8 * 64 + 8 + 64 * 8 + 64
    assert plan.per_layer_params("prompt_tuning", 64, 64, plan.Choice(method="prompt_tuning")) is None


def test_other_methods_and_nf4_preview(lab):
    lab.method_w.value = "dora"  # built from weight values: counted with its closed form on meta
    assert _trainable(lab) == 2 * (8 * (64 + 64) + 64 + 8 * (64 + 32) + 32)
    lab.method_w.value = "ia3"
    assert _trainable(lab) > 0 and "ia3" in lab.preview.value
    lab.method_w.value = "lora"
    full = sum(lab.estimate.memory.values())
    lab.quant_w.value = "nf4"
    assert sum(lab.estimate.memory.values()) < full  # 4-bit linear weights
    lab.quant_w.value = "none"


@pytest.mark.parametrize("change, words", [
    ({"r_w": 0}, "r=0 is invalid"),
    ({"hub_w": "someone/not-a-bundled-model"}, "network"),
])
def test_bad_choices_show_a_message_not_a_traceback(lab, change, words):
    (name, value), = change.items()
    old = getattr(lab, name).value
    getattr(lab, name).value = value
    try:
        assert lab.estimate is None
        assert "peftlab-error" in lab.preview.value and words in lab.preview.value
        assert "Traceback" not in lab.preview.value
        assert lab.on_train() is False  # a bad choice never starts a run
        assert not lab.training
        assert "peftlab-error" in lab.message.value
    finally:
        getattr(lab, name).value = old
    assert lab.estimate is not None


def test_a_rank_above_a_layers_size_is_a_note_not_an_error(lab):
    lab.r_w.value = 100  # tiny-llama's k_proj is 32 x 64: rank 100 is redundant there, not invalid
    try:
        assert lab.estimate is not None and "peftlab-error" not in lab.preview.value
        assert "above min(d_out, d_in) = 32" in lab.preview.value
        assert "without adding expressiveness" in lab.preview.value
    finally:
        lab.r_w.value = 8
    assert "min(d_out, d_in)" not in lab.preview.value


def test_no_target_matched_is_a_message(lab):
    lab.targets_w.value = "custom (pick below)"  # nothing picked
    try:
        assert lab.estimate is None and "peftlab-error" in lab.preview.value
    finally:
        lab.targets_w.value = "method default"


def test_train_live_figures_runs_table_generate_and_save(lab, tmp_path):
    assert lab.loss_fig.trace_lengths()[0] == 0
    assert lab.on_train() is True
    assert lab.on_train() is False  # a second click never starts a second run
    assert "already" in lab.message.value
    assert lab.wait(120), "training did not finish"
    assert "peftlab-ok" in lab.message.value, lab.message.value
    assert lab.loss_fig.trace_lengths()[:2] == [3, 3]  # raw + EMA, one point per step
    assert not lab.loss_fig.static and type(lab.loss_fig.figure).__name__ == "FigureWidget"
    assert lab.memory_fig.trace_lengths() == [3] and lab.speed_fig.trace_lengths() == [3]
    heat = lab.spectra_fig.figure.data[0]
    assert len(heat.y) == 4  # q_proj and v_proj of 2 layers
    assert len(lab.runs) == 1 and lab.runs[0]["trainable"] == 3584 and lab.runs[0]["steps"] == 3
    assert "lora" in lab.runs_table.value
    assert list(lab.runs_fig.figure.data[0].x) == [lab.runs[0]["run"]]

    lab.prompt_w.value = "Hello"
    lab.on_generate()
    assert "base model" in lab.base_out.value and "adapted" in lab.adapted_out.value

    lab.save_path_w.value = str(tmp_path / "adapter")
    lab.on_save()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file(), lab.message.value
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_stop_ends_after_the_current_step_and_keeps_the_adapter(lab):
    lab.steps_w.value = 200
    try:
        assert lab.on_train()
        deadline = time.monotonic() + 60
        while len(lab.history) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        lab.on_stop()
        assert lab.wait(60)
    finally:
        lab.steps_w.value = 3
    assert lab.result.stop_reason == "stopped"
    assert 2 <= len(lab.result.history) < 200
    assert lab.runs[-1]["stop_reason"] == "stopped"
    assert not lab.save_button.disabled  # the adapter trained so far can be saved


def test_training_errors_are_messages(lab):
    lab.hub_w.value = str(os.path.dirname(__file__))  # a folder, but not a model folder
    try:
        lab.on_train()
        lab.wait(60)
        assert "peftlab-error" in lab.message.value or "peftlab-error" in lab.preview.value
        assert "Traceback" not in lab.message.value
        assert not lab.training and not lab.train_button.disabled
    finally:
        lab.hub_w.value = ""


def test_the_default_lab_opens_on_the_task_that_learns():
    """Lab() picks the sentiment task and fills every choice with its measured defaults."""
    from peftlab.tasks import load_task
    from peftlab.widgets import Lab

    d = load_task("sentiment").defaults
    choice = Lab().choice()
    assert (choice.task, choice.model, choice.method) == ("sentiment/generate", "smollm2-135m", d.method)
    assert (choice.r, choice.lr, choice.steps, choice.batch_size, choice.max_length) == (
        d.r, d.lr, d.steps, d.batch_size, d.max_length)


def test_a_task_run_measures_the_base_then_the_metric_live_then_both_answers():
    from peftlab.widgets import Lab

    lab = Lab(model="tiny-llama", steps=4, batch_size=2, max_length=64, redraw_every_s=0.0)
    assert lab.task.name == "sentiment" and lab.dataset_w.disabled
    import dataclasses

    small = dataclasses.replace(lab.task, live_eval_limit=6,
                                defaults=dataclasses.replace(lab.task.defaults, eval_every=2))
    lab._tasks[lab.task_w.value] = small  # a 6-row slice measured every 2 steps: seconds
    assert lab.on_train() and lab.wait(300), "training did not finish"
    assert "peftlab-ok" in lab.message.value, lab.message.value
    assert lab.base_eval == {"accuracy": lab.base_eval["accuracy"], "n": 6}
    assert [r.get("task_accuracy") is not None for r in lab.history] == [False, True, False, True]
    assert lab.metric_fig.trace_lengths() == [3]  # the base level (step 0), steps 2 and 4
    assert len(lab.base_answers) == len(lab.adapted_answers) == lab.answers_shown
    assert [a.question for a in lab.base_answers] == [a.question for a in lab.adapted_answers]
    table = lab.task_out.value
    assert "base model" in table and "adapted" in table and "peftlab-after" in table
    assert "Held-out accuracy:" in lab.message.value  # before -> after
    # picking another task fills its defaults; "none" goes back to a dataset
    lab.task_w.value = "sentiment/classify"
    assert lab.choice().model == "minilm-l6" and lab.choice().lr == lab.task.defaults.lr
    assert lab.estimate is not None and lab.estimate.count.trainable > 0, lab.preview.value
    lab.task_w.value = "none"
    assert lab.choice().task is None and not lab.dataset_w.disabled


def test_static_live_figure_for_colab():
    from peftlab import plots
    from peftlab.widgets import LiveFigure

    live = LiveFigure(plots.loss_curve([]), static=True)
    live.update(plots.loss_curve([3.0, 2.0, 1.5]))
    assert live.trace_lengths()[:2] == [3, 3]
    assert len(live.widget.outputs) == 1  # replaced, not appended
    assert "application/vnd.plotly.v1+json" in live.widget.outputs[0]["data"]


def test_rank_explorer():
    from peftlab.widgets import RankExplorer

    rx = RankExplorer(d_in=576, d_out=192, r=4)
    assert rx.parameters() == 4 * (576 + 192)
    rx.r_w.value = 32
    assert "B (192 x 32) · A (32 x 576)" in rx.shapes.value and f"{32 * 768:,}" in rx.shapes.value
    assert list(rx.fig.figure.data[0].y) == [576 * 192, 32 * 768]
    assert rx.r_w.max == 192  # a rank above min(d_in, d_out) buys nothing


def test_spectrum_viewer_and_quant_explorer(tiny_llama):
    import peftlab
    from peftlab.widgets import QuantErrorExplorer, SpectrumViewer

    model, _ = tiny_llama
    peftlab.adapt(model, "lora", r=4, init="gaussian")
    viewer = SpectrumViewer(model)
    assert len(viewer.heatmap.figure.data[0].y) == 4
    viewer.top_w.value = 2
    assert viewer.heatmap.figure.data[0].z.shape[1] == 2 if hasattr(viewer.heatmap.figure.data[0].z, "shape") \
        else len(viewer.heatmap.figure.data[0].z[0]) == 2

    q = QuantErrorExplorer()
    assert set(q.errors) == {"NF4", "FP4", "INT4"}
    nf4_64 = q.errors["NF4"].rmse
    q.block_w.value = 256  # larger blocks: one absmax for more values, larger errors
    assert q.errors["NF4"].rmse > nf4_64
    assert "RMSE" in q.table.value and len(q.fig.figure.data) == 3


def test_redraws_are_throttled_by_the_clock_and_the_time_budget(lab):
    """The dashboard's cost is bounded: the number of redraws does not grow with the steps."""
    lab.steps_w.value = 4
    saved = lab.redraw_every_s, lab.draw_budget
    try:
        for redraw_every_s, budget, redraws in [
            (3600.0, 1.0, 2),  # clock: the first step, then the run's end
            (0.0, 0.0, 2),  # budget 0: after the first redraw, none until the end
            (0.0, float("inf"), 5),  # no throttle: every step, then the end
        ]:
            lab.redraw_every_s, lab.draw_budget = redraw_every_s, budget
            before = lab.loss_fig.updates
            assert lab.on_train() and lab.wait(120), "training did not finish"
            assert lab.loss_fig.updates - before == redraws, (redraw_every_s, budget)
            assert lab.loss_fig.trace_lengths()[:2] == [4, 4]  # the end shows every step
            assert lab.progress.value == 4
    finally:
        lab.steps_w.value = 3
        lab.redraw_every_s, lab.draw_budget = saved


def test_voila_and_colab_get_static_figures(monkeypatch):
    from peftlab.widgets import live

    for name in ("VOILA_BASE_URL", "SERVER_SOFTWARE"):
        monkeypatch.delenv(name, raising=False)
    assert not live.voila() and live.prefer_static() is live.colab()
    monkeypatch.setenv("SERVER_SOFTWARE", "voila/0.5.13")  # what Voila puts in its kernels' environment
    assert live.voila() and live.prefer_static()


def test_the_lab_trains_a_data_driven_start_from_its_own_data():
    """EVA learns its start from a few batches: the Lab hands it the first batches of its run."""
    from peftlab.widgets import Lab

    lab = Lab(task=None, model="tiny-llama", steps=2, batch_size=2, max_length=64, redraw_every_s=0.0)
    lora = _trainable(lab)
    for method in ("pissa", "olora", "loftq", "lora_ga", "corda", "eva"):  # LoRA's shapes, previewed on meta
        lab.method_w.value = method
        lab.update_preview()
        assert _trainable(lab) == lora, method
    assert "moves rank between layers" in " ".join(lab.estimate.notes)  # EVA's count is a budget
    assert lab.on_train() and lab.wait(120), "training did not finish"
    assert "peftlab-ok" in lab.message.value, lab.message.value
    assert lab.runs[-1]["method"] == "eva" and lab.runs[-1]["steps"] == 2
