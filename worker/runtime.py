"""What a process needs to execute runs: settings, store, entry writer and log sink.

Built lazily, once per process (a forked pool child builds its own: database
connections must never cross a fork).
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass, field

from worker import runlog
from worker.notify import Publisher
from worker.publish import send_webhook
from worker.runlog import EntryWriter, StoreSink
from worker.scrub import scrubber
from worker.settings import Settings, get_settings
from worker.store import Store
from worker.webhooks import on_run_ended


def open_store(settings: Settings) -> Store:
    """A store with the process hooks attached: stream wake-ups and run-ended webhooks.

    Every process opens its store here, so this is also where the credentials it
    holds are registered with the scrubber.
    """
    scrubber.register(settings.secret_values())
    store = Store(settings.store_url, max_entries_per_run=settings.max_entries_per_run)
    if settings.notify_url:
        store.on_entries = Publisher(settings.notify_url)
    if settings.webhook_endpoints:
        store.on_ended = on_run_ended(store, settings, send_webhook)
    return store


@dataclass
class Runtime:
    """The per-process services a run uses."""

    settings: Settings
    store: Store
    writer: EntryWriter
    sink: StoreSink
    #: Lease epochs the writer found taken over, by run id.
    refused: dict[str, set[int]] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        """Open the store, start the writer and install the logging pipeline."""
        store = open_store(settings)
        refused: dict[str, set[int]] = {}

        def on_refused(pairs: set[tuple[str, int]]) -> None:
            for run_id, epoch in pairs:
                refused.setdefault(run_id, set()).add(epoch)

        writer = EntryWriter(
            store.entry_flusher(),
            flush_ms=settings.log_flush_ms,
            batch_size=settings.log_batch_size,
            on_refused=on_refused,
        )
        sink = StoreSink(writer, settings.max_message_bytes)
        runlog.configure(sink, log_format=settings.log_format, level=settings.log_level)
        writer.start()
        return cls(settings, store, writer, sink, refused)

    def close(self) -> None:
        """Flush entries and close connections."""
        try:
            self.writer.close()
        finally:
            self.store.close()


_lock = threading.Lock()
_runtime: Runtime | None = None
_pid: int | None = None


def get_runtime() -> Runtime:
    """This process's runtime, created on first use (again after a fork)."""
    global _runtime, _pid  # noqa: PLW0603 - one runtime per process is the point
    with _lock:
        if _runtime is None or _pid != os.getpid():
            _runtime = Runtime.create(get_settings())
            _pid = os.getpid()
            atexit.register(_runtime.close)
        return _runtime


def close_runtime() -> None:
    """Flush and close this process's runtime, if it has one."""
    global _runtime  # noqa: PLW0603
    with _lock:
        if _runtime is not None and _pid == os.getpid():
            _runtime.close()
        _runtime = None


def prepare_store() -> None:
    """Bring an empty embedded database up to date; refuse a stale production schema."""
    settings = get_settings()
    store = Store(settings.store_url)
    try:
        if store.schema_is_current():
            return
        if settings.embedded:
            store.upgrade()
            return
        msg = "the store's schema is not current: run `quarry db upgrade` first"
        raise RuntimeError(msg)
    finally:
        store.close()
