"""Progress bars for the long things (a study's cells, a benchmark's rounds, the SmolLM2
conversion, an evaluation's generations): tqdm's ``auto`` bar, a widget in a notebook and a text
line in a terminal, and quiet where no one watches.

Quiet when ``TQDM_DISABLE`` is set (to anything but "", "0" or "false", as tqdm reads it) or in
CI (``CI`` or ``GITHUB_ACTIONS`` set, as GitHub Actions, GitLab CI and most runners do), or when
the caller passes ``enabled=False``. https://tqdm.github.io/docs/tqdm/
"""

from __future__ import annotations

import os
from typing import Any

_OFF = ("", "0", "false")


def progress_disabled() -> bool:
    """Whether bars should stay hidden: TQDM_DISABLE, or a CI run."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in _OFF:
        return True
    return any(os.environ.get(k, "").strip().lower() not in _OFF for k in ("CI", "GITHUB_ACTIONS"))


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar of ``total`` steps (hidden per :func:`progress_disabled` or ``enabled``);
    use it as a context manager and call ``update()`` per step."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or progress_disabled(), **kwargs)


__all__ = ["progress_bar", "progress_disabled"]
