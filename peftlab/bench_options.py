"""The option checks every ``peftlab bench ...`` shares: a comma-separated list of known names, and
counts that must be at least one. Each refuses bad input with the flag, what was wrong and what is
expected (a close name when there is one)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from peftlab.errors import ConfigError, closest


def known_items(text: str, known: Sequence[str], flag: str) -> tuple[str, ...]:
    """The comma-separated names of ``text``, each one of ``known``, at least one of them."""
    items = tuple(v.strip() for v in text.split(",") if v.strip())
    for item in items:
        if item not in known:
            raise ConfigError(f"{flag}: {item!r} is not known.{closest(item, known)} Expected some of: "
                              f"{', '.join(known)}.")
    if not items:
        raise ConfigError(f"{flag} must name at least one of: {', '.join(known)}.")
    return items


def at_least_one(opts: argparse.Namespace, names: Sequence[str]) -> None:
    """Refuse any of the parsed options ``names`` (attribute names; None means unset) below 1."""
    for name in names:
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")


__all__ = ["at_least_one", "known_items"]
