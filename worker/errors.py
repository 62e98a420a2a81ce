"""Quarry's exception hierarchy: one base, one class per way a run can go wrong."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker import dbfaults

if TYPE_CHECKING:
    from worker.models import StopReason


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when it has none (not scrubbed)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class QuarryError(Exception):
    """Base of every error Quarry raises on purpose.

    ``retryable`` says whether trying again later may succeed (a connection refused,
    a server that kept failing); a pipeline's retry policy retries only those.
    Configuration, credential and data errors never are.
    """

    retryable: bool = False

    def __init__(self, *args: object, retryable: bool | None = None) -> None:
        super().__init__(*args)
        if retryable is not None:
            self.retryable = retryable


class ConfigError(QuarryError):
    """Settings or a pipelines file are invalid; the message names the file and field."""


class UnknownPipeline(ConfigError):
    """A run names a pipeline the pipelines file does not declare."""


class InvalidInput(QuarryError):
    """A value from a client (API body, CLI option) is out of bounds; the message names it."""


class StoreUnavailable(QuarryError):
    """The run-log store cannot be reached (a restart, a failover, a network fault)."""

    retryable = True


class RunNotFound(QuarryError):
    """No run has the given id."""


class IllegalTransition(QuarryError):
    """The run state machine refuses the requested status change."""


class LeaseLost(QuarryError):
    """A fenced write found a newer lease epoch: the holder must stop and write nothing more."""


class SourceError(QuarryError):
    """A source could not produce the rows of a slice."""


class DestinationError(QuarryError):
    """A destination could not write a slice."""


class StallTimeout(SourceError):
    """A source produced no page within the pipeline's ``page_timeout``."""

    retryable = True


class RunTimeout(QuarryError):
    """An attempt ran longer than the pipeline's ``run_timeout``."""


def is_retryable(exc: BaseException) -> bool:
    """Whether a retry policy may try ``exc``'s run again: a transient fault, not a mistake.

    Quarry's own errors say so themselves; an ``OSError`` that escaped (a connection
    reset, a timeout) is transient by nature, and so is a database's operational error
    (:mod:`worker.dbfaults`), a refused login aside.
    """
    if isinstance(exc, QuarryError):
        return exc.retryable
    return isinstance(exc, OSError) or dbfaults.is_transient(exc)


class StopRequested(QuarryError):
    """The runner reached a safe point after SIGTERM or cancellation."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason.value)
        self.reason = reason
