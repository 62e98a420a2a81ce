"""Run logging: structlog events become run-log entries through a buffered, batching writer.

Code logs with a bound structlog logger (``run_id``, ``worker_id``, ``attempt``
and the lease ``epoch`` bound once). The processor chain is::

    scrub → add level/time → StoreSink (entry → writer buffer) → render to stdout

The writer flushes in batches from a background thread (at least every
``log_flush_ms``, at once when ``log_batch_size`` entries wait). Entries that
report a state change are not buffered: the runner collects them with
:meth:`StoreSink.hold` and commits them in the same transaction as the change,
together with whatever the buffer holds, so the store never shows them out of
order.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO, TypeAlias, cast

import structlog
from structlog.typing import FilteringBoundLogger

from worker import jsonfmt, workermetrics
from worker.errors import StoreUnavailable
from worker.models import Level, NewEntry
from worker.scrub import describe, scrubber

#: Event-dict keys that are entry fields or context, never part of ``data``.
RESERVED_KEYS = frozenset(
    {"event", "message", "run_id", "worker_id", "attempt", "epoch", "timestamp", "level"}
)

#: Marker appended to a message cut at the size limit.
TRUNCATION_MARKER = "… [truncated]"

_METHOD_LEVEL = {
    "debug": Level.DEBUG,
    "info": Level.INFO,
    "msg": Level.INFO,
    "warning": Level.WARNING,
    "warn": Level.WARNING,
    "error": Level.ERROR,
    "exception": Level.ERROR,
    "critical": Level.ERROR,
    "fatal": Level.ERROR,
}


def truncate(message: str, max_bytes: int) -> str:
    """Cut ``message`` to at most ``max_bytes`` UTF-8 bytes, marking the cut."""
    if len(message) * 4 <= max_bytes:
        return message
    encoded = message.encode("utf-8")
    if len(encoded) <= max_bytes:
        return message
    keep = max_bytes - len(TRUNCATION_MARKER.encode("utf-8"))
    return encoded[:keep].decode("utf-8", errors="ignore") + TRUNCATION_MARKER


class EntryWriter:
    """Buffers entries and stores them in batches from a background thread."""

    def __init__(
        self,
        append: Callable[[Sequence[NewEntry]], set[tuple[str, int]]],
        *,
        flush_ms: int = 200,
        batch_size: int = 2000,
        on_refused: Callable[[set[tuple[str, int]]], None] | None = None,
    ) -> None:
        self._append = append
        self._interval = flush_ms / 1000
        self._batch_size = batch_size
        self._on_refused = on_refused
        self._buffer: list[NewEntry] = []
        self._buffer_lock = threading.Lock()
        # Held for every store write of this process's entries, so batches and
        # state-change transactions commit in the order their entries were made.
        self.io_lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self) -> None:
        """Start the background flusher (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(
                target=self._loop, name="quarry-log-writer", daemon=True
            )
            self._thread.start()

    def put(self, entry: NewEntry) -> None:
        """Buffer one entry (the hot path: a lock and an append).

        A full buffer wakes the flusher once: while a burst outruns the flush, every
        later entry finds it woken already (``Event.set`` takes a lock and notifies).
        """
        with self._buffer_lock:
            self._buffer.append(entry)
            full = len(self._buffer) >= self._batch_size
        if full and not self._wake.is_set():
            self._wake.set()

    def take(self) -> list[NewEntry]:
        """Remove and return everything buffered."""
        with self._buffer_lock:
            taken, self._buffer = self._buffer, []
        return taken

    def pending(self) -> int:
        """How many entries wait in the buffer."""
        with self._buffer_lock:
            return len(self._buffer)

    def flush(self) -> None:
        """Store everything buffered now; on failure the batch goes back to the buffer."""
        with self.io_lock:
            batch = self.take()
            if not batch:
                return
            started = time.monotonic()
            try:
                refused = self._append(batch)
            except Exception:
                self.requeue(batch)
                raise
            finally:
                workermetrics.flushed(started)
        if refused and self._on_refused is not None:
            self._on_refused(refused)

    def requeue(self, batch: list[NewEntry]) -> None:
        """Put entries taken for a write that failed back at the front of the buffer."""
        with self._buffer_lock:
            self._buffer[:0] = batch

    def discard(self, run_id: str) -> None:
        """Drop a run's buffered entries (its lease is lost: it writes nothing more)."""
        with self._buffer_lock:
            self._buffer = [e for e in self._buffer if e.run_id != run_id]

    def close(self) -> None:
        """Flush what is left and stop the background thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval * (1 + min(self.failures, 50)))
            self._wake.clear()
            workermetrics.log_buffer(self.pending())
            try:
                self.flush()
            except StoreUnavailable as exc:
                # A store outage: one line when it starts, the entries kept for the retry.
                if not self.failures:
                    logging.getLogger("quarry.writer").warning(
                        "log flush failed (%s); entries kept, retrying until the store is back",
                        describe(exc),
                    )
                self.failures += 1
                continue
            except Exception:
                self.failures += 1
                logging.getLogger("quarry.writer").warning(
                    "log flush failed (%d in a row); entries kept, will retry",
                    self.failures,
                    exc_info=True,
                )
                continue
            if self.failures:
                logging.getLogger("quarry.writer").warning(
                    "log flush works again after %d failed tries", self.failures
                )
            self.failures = 0


class _Held(threading.local):
    """The entries a thread holds for a state change (:meth:`StoreSink.hold`), or None.

    The class default makes the read on every log call a plain attribute lookup; a
    ``getattr`` with a default on a bare ``threading.local`` raised and caught an
    ``AttributeError`` each time, a seventh of the sink's cost.
    """

    entries: list[NewEntry] | None = None


class StoreSink:
    """structlog processor that turns run events into entries for the writer."""

    def __init__(self, writer: EntryWriter | None, max_message_bytes: int = 64 * 1024) -> None:
        self.writer = writer
        self.max_message_bytes = max_message_bytes
        self._held = _Held()

    @contextlib.contextmanager
    def hold(self) -> Iterator[list[NewEntry]]:
        """Collect the entries logged inside the block instead of buffering them."""
        previous = self._held.entries
        held: list[NewEntry] = []
        self._held.entries = held
        try:
            yield held
        finally:
            self._held.entries = previous

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """Make an entry of an event that carries a ``run_id``; pass the event on."""
        run_id = event_dict.get("run_id")
        if run_id is None:
            return event_dict
        event = event_dict.get("event", "")
        if type(event) is not str:
            event = str(event)
        message = event_dict.get("message")
        text = event if message is None else message if type(message) is str else str(message)
        # Positional: this runs on every log call of a run.
        entry = NewEntry(
            run_id,
            _METHOD_LEVEL.get(method, Level.INFO),
            event,
            truncate(text, self.max_message_bytes),
            datetime.now(UTC),
            {k: v for k, v in event_dict.items() if k not in RESERVED_KEYS},
            event_dict.get("worker_id"),
            event_dict.get("attempt"),
            event_dict.get("epoch"),
        )
        held = self._held.entries
        if held is not None:
            held.append(entry)
        elif self.writer is not None:
            self.writer.put(entry)
        return event_dict


class _EverySecond:
    """A UTC second as ``strftime(fmt)`` text, formatted once a second, not on every log
    call (``strftime`` and ``isoformat`` were a tenth of a call's cost)."""

    __slots__ = ("_fmt", "_last")

    def __init__(self, fmt: str) -> None:
        self._fmt = fmt
        #: The second last formatted and its text (one tuple: threads read it whole).
        self._last: tuple[int, str] = (-1, "")

    def text(self, second: int) -> str:
        """``second`` (seconds since the epoch) as text."""
        last = self._last
        if last[0] != second:
            last = self._last = (second, datetime.fromtimestamp(second, UTC).strftime(self._fmt))
        return last[1]


_ISO_SECOND = _EverySecond("%Y-%m-%dT%H:%M:%S")
_CLOCK = _EverySecond("%H:%M:%S")


class JsonStamp:
    """structlog processor of the JSON format: ``level`` and ``timestamp``, as structlog's
    ``add_log_level`` and ``TimeStamper(fmt="iso", utc=True)`` add them, in one step.

    The time is ISO 8601 UTC with a ``Z`` and always six digits of microseconds.
    """

    __slots__ = ()

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """Add ``level`` and ``timestamp`` to ``event_dict``."""
        event_dict["level"] = _LEVEL_NAMES.get(method, method)
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        event_dict["timestamp"] = f"{_ISO_SECOND.text(second)}.{nanos // 1000:06d}Z"
        return event_dict


#: Method names structlog's ``add_log_level`` renames (the rest are their own level).
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


def render_console(_logger: Any, method: str, event_dict: dict[str, Any]) -> str:
    """Render like the run-log docs: ``10:30:01 [info] resource_started - Extracting …``."""
    level = _METHOD_LEVEL.get(method, Level.INFO).value
    now = _CLOCK.text(time.time_ns() // 1_000_000_000)
    event = event_dict.get("event", "")
    message = event_dict.get("message")
    run = event_dict.get("run_id")
    prefix = f"{now} [{level}] {event}"
    text = f"{prefix} - {message}" if message is not None else prefix
    if run is not None:
        text = f"{text}  ({run})"
    extra = {
        k: v for k, v in event_dict.items() if k not in RESERVED_KEYS and not k.startswith("_")
    }
    if run is None and extra:
        text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
    return escape_controls(text)


def escape_controls(text: str) -> str:
    """Escape control characters so no logged text can forge another line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def configure(
    sink: StoreSink | None,
    *,
    log_format: str = "console",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Install Quarry's structlog pipeline for this process."""
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=jsonfmt.dumps)
        if log_format == "json"
        else render_console
    )
    processors: list[Any] = [scrubber]
    if log_format == "json":
        processors.append(JsonStamp())
    if sink is not None:
        processors.append(sink)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


#: The run logger's type: structlog's filtering bound logger (``configure`` installs it).
Logger: TypeAlias = FilteringBoundLogger


def get_logger(**bound: Any) -> Logger:
    """A structlog logger with ``bound`` context."""
    return cast(Logger, structlog.get_logger("quarry").bind(**bound))
