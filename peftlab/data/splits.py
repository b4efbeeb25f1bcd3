"""Rows into a ``datasets.Dataset``, and the deterministic train/test split every loader uses.

The same ``test_size`` and ``seed`` always give the same rows on each side.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from peftlab.errors import DataError


def to_dataset(rows: list[dict], label_names: Sequence[str] | None):
    """A Dataset from rows of one shape; ``label`` becomes a ClassLabel when ``label_names`` are given."""
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


def split_dataset(dataset, test_size: float, seed: int, group: str | None = None):
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
