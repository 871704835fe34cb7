"""One way to turn an exception into a one-line, user-facing reason.

Every user-facing error in cxrgaze is one line naming the file or service and the problem
(:data:`USER_ERRORS` are the exceptions that mean bad input rather than a bug);
library exceptions (torch, pydicom, MLflow, SQLAlchemy) often carry multi-line messages
with tracebacks of their own, so their first line is what a message quotes.
"""

from __future__ import annotations

from cxrgaze.config.core import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError)
"""Exceptions that mean bad input or environment, reported as one line by the CLI and the
stage scripts (set ``CXRGAZE_DEBUG=1`` to see the traceback instead)."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty),
    cut to ``limit`` characters."""
    text = str(exc)
    line = text.splitlines()[0] if text.strip() else type(exc).__name__
    return line if limit is None else line[:limit]


def reason(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (just ``Type`` for an empty message)."""
    text = str(exc)
    if not text.strip():
        return type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}"
