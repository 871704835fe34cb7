"""One way to turn an exception into a one-line, user-facing reason.

Every user-facing error in cxrgaze is one line naming the file or service and the problem;
library exceptions (torch, pydicom, MLflow, SQLAlchemy) often carry multi-line messages
with tracebacks of their own, so their first line is what a message quotes.
"""

from __future__ import annotations


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
