"""Which database errors are worth a retry: the database failed us, not the pipeline.

Classified by the DB-API 2.0 classes every driver has (and SQLAlchemy's wrappers of
them), so no driver is imported here: an ``OperationalError`` or ``InterfaceError``
(a connection refused or lost, a server restarting, a statement cancelled, a lock
timeout) is transient; a refused login, a missing database, a syntax, data or
integrity error is the pipeline's mistake and is never retried.
"""

from __future__ import annotations

#: DB-API (and SQLAlchemy) class names of faults that may pass.
_TRANSIENT_CLASSES = frozenset({"OperationalError", "InterfaceError", "TimeoutError"})
#: Operational errors that are a mistake in the pipeline's settings all the same.
_MISTAKES = (
    "authentication failed",
    "access denied",
    "password",
    "permission denied",
    "does not exist",
    "unknown database",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver's error, or SQLAlchemy's wrapper of one) may pass."""
    original = getattr(exc, "orig", None) or exc
    names = {k.__name__ for k in type(original).__mro__} | {k.__name__ for k in type(exc).__mro__}
    if not names & _TRANSIENT_CLASSES:
        return False
    text = str(original).lower()
    return not any(phrase in text for phrase in _MISTAKES)
