"""Tasks and their metrics: hand-made cases, evaluate() deterministic and equal across backends,
training with a task records its metric, a user's file becomes a task, and a short run learns."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.cli import main
from peftlab.errors import ConfigError, DataError, UnknownNameError
from peftlab.evaluation import generate_answers, generations
from peftlab.tasks import (exact_match, label_of_generation, normalize_answer, perplexity,
                           token_f1)


# --------------------------------------------------------------------------------------------
# Metrics on hand-made cases
# --------------------------------------------------------------------------------------------
def test_normalisation_and_exact_match_follow_squad():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a pear.") == "apple pear"
    assert exact_match("Positive.", "positive") == 1.0
    assert exact_match("the answer", "Answer") == 1.0
    assert exact_match("positive review", "positive") == 0.0


def test_token_f1_by_hand():
    # prediction "paris is the capital" -> [paris, is, capital]; reference "capital is paris" ->
    # [capital, is, paris]: all 3 shared, precision = recall = 1
    assert token_f1("Paris is the capital", "capital is Paris") == 1.0
    # [a, b, c] vs [a, d]: 1 shared, precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1("x1 y2 z3", "x1 w4") == pytest.approx(0.4)
    assert token_f1("nothing shared", "other words") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "word") == 0.0
    # repeated tokens count as often as both sides have them: [x, x, y] vs [x, y, y] share 2
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_label_of_generation_reads_the_first_word_only():
    labels = ("negative", "positive")
    assert label_of_generation("Positive.", labels) == "positive"
    assert label_of_generation(" negative - the review is harsh", labels) == "negative"
    assert label_of_generation("The sentiment is positive", labels) is None
    assert label_of_generation("", labels) is None


def test_perplexity_is_exp_of_the_mean_nll():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(2 * math.log(5.0), 2) == pytest.approx(5.0)
    with pytest.raises(DataError):
        perplexity(1.0, 0)


# --------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------
def test_every_bundled_task_and_framing():
    tasks = {(t.name, t.framing): t for t in peftlab.list_tasks()}
    assert set(tasks) == {("sentiment", "generate"), ("sentiment", "classify"), ("topic", "generate"),
                          ("topic", "classify"), ("qa", "generate"), ("style", "perplexity"),
                          ("forgetting", "perplexity")}
    assert tasks["qa", "generate"].metrics == ("f1", "exact_match")
    assert tasks["style", "perplexity"].metric == "perplexity" and not tasks["style", "perplexity"].higher_is_better
    assert peftlab.load_task("sentiment").framing == "generate"
    assert peftlab.load_task("topic", "classify").model == "minilm-l6"
    sentiment = peftlab.load_task("sentiment")
    row = sentiment.rows("test", 1)[0]
    assert sentiment.target(row) in ("negative", "positive") and row["text"] in sentiment.question(row)
    framed = sentiment.training_data()
    assert framed.column_names == ["question", "answer"] and set(framed["answer"]) == {"negative", "positive"}
    article = peftlab.load_task("topic").question(peftlab.load_task("topic").rows("test", 1)[0])
    assert len(article) < 700  # the article is cut to 400 characters


def test_unknown_names_get_a_suggestion():
    with pytest.raises(UnknownNameError, match="sentiment"):
        peftlab.load_task("sentimnet")
    with pytest.raises(UnknownNameError, match="generate"):
        peftlab.load_task("qa", "classify")
    with pytest.raises(UnknownNameError, match="classify"):
        peftlab.load_task("sentiment", "clasify")


def test_a_users_file_becomes_a_task(tmp_path, tiny_llama):
    path = tmp_path / "reviews.csv"
    rows = [("great fun", "good"), ("dull and long", "bad")] * 10
    path.write_text("review,verdict\n" + "\n".join(f"{r},{v}" for r, v in rows))
    task = peftlab.load_task(str(path), input="review", label="verdict")
    assert task.framing == "generate" and task.labels == ("bad", "good") and task.metric == "accuracy"
    assert set(task.training_data()["answer"]) == {"bad", "good"}
    classify = peftlab.load_task(str(path), "classify", input="review", label="verdict")
    assert classify.model == "minilm-l6" and classify.training_data().column_names == ["text", "label"]
    model, tokenizer = tiny_llama
    result = peftlab.evaluate(model, task, tokenizer=tokenizer)
    assert set(result) == {"accuracy", "n"} and result["n"] == 2  # 10% of 20 rows held out
    with pytest.raises(DataError, match="input="):
        peftlab.load_task(str(path))
    with pytest.raises(DataError, match="not both"):
        peftlab.load_task(str(path), input="review", label="verdict", target="verdict")


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------
def test_evaluate_is_deterministic_and_equal_across_backends(tiny_llama):
    base, tokenizer = tiny_llama
    torch.manual_seed(0)
    ref = peftlab.adapt(copy.deepcopy(base), "lora", r=4, targets="all-linear")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # an adapter that changes the answers
    from peftlab.production import fused, hf_peft

    peft_model = peftlab.adapt(copy.deepcopy(base), "lora", backend="peft", r=4, targets="all-linear")
    hf_peft.copy_reference_to_peft(ref, peft_model)
    fused_model = fused.fuse(copy.deepcopy(ref))
    for task in ("sentiment", "qa", "style"):
        results = [peftlab.evaluate(m, task, tokenizer=tokenizer, limit=6) for m in (ref, ref, peft_model, fused_model)]
        assert results[0] == results[1], task
        for other in results[2:]:
            assert other.keys() == results[0].keys()
            for key in results[0]:
                assert other[key] == pytest.approx(results[0][key], rel=1e-5), (task, key)
    questions = [peftlab.load_task("qa").question(r) for r in peftlab.load_task("qa").rows("test", 5)]
    answers = [generate_answers(m, tokenizer, questions, 8, batch_size=2) for m in (ref, peft_model, fused_model)]
    assert answers[0] == answers[1] == answers[2]
    assert answers[0] != generate_answers(base, tokenizer, questions, 8, batch_size=2)  # the adapter matters


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama):
    model, tokenizer = tiny_llama
    qa = peftlab.load_task("qa")
    questions = [qa.question(r) for r in qa.rows("test", 4)]
    together = generate_answers(model, tokenizer, questions, 6, batch_size=4)
    alone = [generate_answers(model, tokenizer, [q], 6)[0] for q in questions]
    assert together == alone


def test_perplexity_matches_a_manual_computation(tiny_llama):
    model, tokenizer = tiny_llama
    task = peftlab.load_task("style")
    rows = task.rows("test", 3)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(task.input_text(row), truncation=True, max_length=task.defaults.max_length,
                            return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits
            total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    got = peftlab.evaluate(model, task, tokenizer=tokenizer, limit=3, batch_size=2)["perplexity"]
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)


def test_evaluate_runs_on_a_4bit_base_and_leaves_it_trainable():
    pytest.importorskip("bitsandbytes")
    model, tokenizer = peftlab.load_model("tiny-llama", quantization="nf4", device="cpu")
    model = peftlab.adapt(model, "lora", r=4)
    model.train()
    result = peftlab.evaluate(model, "sentiment", tokenizer=tokenizer, limit=4)
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    assert model.training  # given back in the mode it came in
    assert all(m.support_avx512bf16_for_cpu is False for m in model.modules()
               if type(m).__name__ == "Linear4bit")


def test_evaluate_refuses_the_wrong_kind_of_model(tiny_llama, tiny_bert):
    with pytest.raises(ConfigError, match="tokenizer"):
        peftlab.evaluate(tiny_llama[0], "sentiment")
    with pytest.raises(ConfigError, match="sequence-classification"):
        peftlab.evaluate(tiny_llama[0], peftlab.load_task("sentiment", "classify"), tokenizer=tiny_llama[1])
    with pytest.raises(ConfigError, match="causal language model"):
        peftlab.evaluate(tiny_bert[0], "sentiment", tokenizer=tiny_bert[1])
    with pytest.raises(ConfigError, match="num_labels=5"):
        peftlab.evaluate(tiny_bert[0], peftlab.load_task("topic", "classify"), tokenizer=tiny_bert[1])
    with pytest.raises(ConfigError, match="generate task"):
        generations(tiny_llama[0], "style", tiny_llama[1])


# --------------------------------------------------------------------------------------------
# Training with a task
# --------------------------------------------------------------------------------------------
def test_train_records_the_task_metric_every_k_steps(tiny_llama):
    model, tokenizer = tiny_llama
    model = peftlab.adapt(model, "lora", r=4)
    task = peftlab.load_task("qa")
    result = peftlab.train(model, task=task, tokenizer=tokenizer, steps=4, eval_every=2, batch_size=2,
                           max_length=64, progress=False)
    with_metric = [r["step"] for r in result.history if "task_f1" in r]
    assert with_metric == [2, 4]
    assert all("task_exact_match" in r for r in result.history if "task_f1" in r)
    assert result.task_eval["n"] == task.live_eval_limit
    assert result.settings["task"] == "qa (generate)"
    with pytest.raises(ConfigError, match="no data"):
        peftlab.train(model, tokenizer=tokenizer, steps=1)


def test_cli_task_run_stores_metric_before_and_after(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "qa", "--model", "tiny-llama", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--eval-every", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "f1 before -> after" in printed and "exact_match before -> after" in printed
    run = json.loads((out / "run.json").read_text())
    assert set(run["eval_before"]) == set(run["eval_after"]) == {"f1", "exact_match", "n"}
    assert run["args"]["lr"] == peftlab.load_task("qa").defaults.lr  # the task's default filled in
    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history if "task_f1" in r] == [1, 2]
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Task metric: f1" in report and "Held-out f1" in report
    assert main(["train", "--task", "qa", "--data", "chatterbot-qa", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_a_short_run_on_minilm_raises_accuracy_above_the_untrained_level():
    task = peftlab.load_task("sentiment", "classify")
    model, tokenizer = peftlab.load_model(task.model, num_labels=2)
    torch.manual_seed(0)
    model = peftlab.adapt(model, "lora", **task.defaults.adapt_kwargs())
    before = peftlab.evaluate(model, task, tokenizer=tokenizer, limit=200)["accuracy"]
    peftlab.train(model, task=task, tokenizer=tokenizer, progress=False,
                  **{**task.defaults.train_kwargs(), "eval_every": None})
    after = peftlab.evaluate(model, task, tokenizer=tokenizer, limit=200)["accuracy"]
    # 200 held-out rows: a binomial standard error of at most 3.5 points; ask for 4 of them
    assert after >= before + 0.14 and after >= 0.65, (before, after)
