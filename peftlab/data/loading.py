"""Loading a dataset by name: a bundled corpus, a user's file, or a hub dataset when online."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.data.bundled import BUNDLED, BUNDLED_DATASETS, DatasetInfo
from peftlab.data.files import EXPECTED_COLUMNS, READERS, read_file
from peftlab.data.splits import split_dataset, to_dataset
from peftlab.errors import DataError, OfflineError, UnknownNameError, closest

if TYPE_CHECKING:  # type hints only; `datasets` loads when first used
    from datasets import DatasetDict

MEMO: dict[tuple, Any] = {}  # (name, test_size, seed) -> DatasetDict; Arrow data is immutable


def list_datasets() -> list[DatasetInfo]:
    """Describe each bundled dataset: rows, task, columns, label names, source, licence."""
    infos = []
    for name, entry in BUNDLED.items():
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
    if name in BUNDLED:
        key = (name, test_size, seed)
        if key not in MEMO:
            rows, label_names = BUNDLED[name].read()
            group = "question" if name == "chatterbot-qa" else None
            MEMO[key] = split_dataset(to_dataset(rows, label_names), test_size, seed, group)
        # a new dict each time, so `data["train"] = data["train"].select(...)` in one notebook
        # cell never shrinks the next caller's copy (the Arrow tables are shared and read-only)
        return type(MEMO[key])(MEMO[key])
    path = Path(name).expanduser()
    if path.suffix.lower() in READERS or path.is_file():
        return split_dataset(read_file(path, columns), test_size, seed)
    if "/" not in name and closest(name, BUNDLED_DATASETS):
        raise UnknownNameError(
            f"No bundled dataset is called {name!r}.{closest(name, BUNDLED_DATASETS)} "
            f"Bundled datasets: {', '.join(BUNDLED_DATASETS)}; otherwise pass a .csv/.jsonl path "
            "or a hub dataset id."
        )
    return _load_hub(name, test_size, seed, columns, hub_kwargs)


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
        raise DataError(f"{name} has columns {sorted(found)}; expected {EXPECTED_COLUMNS}. "
                        "Pass columns={'their_name': 'text', ...}.")
    if "test" in loaded:
        return DatasetDict(train=loaded["train"], test=loaded["test"])
    return split_dataset(loaded["train"], test_size, seed)
