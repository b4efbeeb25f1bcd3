"""Exceptions peftlab raises for its own checks.

Every message says three things: what was wrong, what was expected, and what to try.
They all derive from :class:`PeftlabError`, so a notebook or a widget can catch one type and show
the message instead of a traceback. Each also derives from the built-in type a Python user would
expect (``ValueError``, ``FileNotFoundError``, ...), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftlabError(Exception):
    """Base class of every error peftlab raises for its own checks."""


class ConfigError(PeftlabError, ValueError):
    """A method's hyperparameters or targets are invalid."""


class UnknownNameError(PeftlabError, KeyError):
    """A bundled model, dataset or method name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OfflineError(PeftlabError, OSError):
    """Something that needs the network was asked for while offline."""


class DataError(PeftlabError, ValueError):
    """A dataset is empty, has the wrong columns, or holds invalid labels."""


class AdapterFileError(PeftlabError, OSError):
    """An adapter on disk is missing, corrupt, or does not fit the base model."""


class TrainingError(PeftlabError, RuntimeError):
    """Training could not go on (non-finite loss, a failing callback, ...)."""


class PeftlabWarning(UserWarning):
    """Something works, but probably not as the user meant (a rank no layer can use, ...).

    The message says what was odd, what it costs and what to try, like the errors above.
    """


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
