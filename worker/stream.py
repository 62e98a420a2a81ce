"""The live log stream (Server-Sent Events): entries as they land, resumable, closed at the end.

Each entry is one event: ``id:`` is the entry id, ``data:`` the entry as JSON
(``{"event": …, "data": {…}, …}``), so ``Last-Event-ID`` resumes with no gap and
no repeat. JSON encoding escapes CR and LF, so no logged text can end a frame
or forge a field. The stream wakes on Redis pub/sub when configured and polls
the store otherwise; it re-checks the token as it goes, so a revoked token
ends it, and it closes after the run's terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool

from worker import jsonfmt
from worker.models import TERMINAL_EVENTS, Entry
from worker.notify import Wakeups
from worker.store import Store

#: Poll interval without Redis; with Redis, the safety-net poll.
POLL_SECONDS = 0.25
POLL_WITH_WAKEUPS_SECONDS = 2.0
#: How often a stream re-checks that its token is still live.
TOKEN_CHECK_SECONDS = 1.0
#: Entries read per store query.
BATCH = 500


async def _pause(wake: asyncio.Event | None, interval: float) -> None:
    """Sleep ``interval``, or less when a wake-up for the run arrives."""
    if wake is None:
        await asyncio.sleep(interval)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=interval)


class _Gauge:
    """Open streams in this process (asyncio: one thread, no lock needed)."""

    value = 0


#: Open streams, for /metrics.
CLIENTS = _Gauge()


def frame(entry: Entry) -> dict[str, str]:
    """One SSE event for an entry."""
    return {"id": str(entry.id), "data": jsonfmt.dumps(entry.as_dict())}


async def entry_events(
    store: Store,
    run_id: str,
    *,
    after_id: int,
    wakeups: Wakeups | None,
    still_authorised: Callable[[], bool],
    disconnected: Callable[[], object],
) -> AsyncIterator[dict[str, str]]:
    """Yield SSE events for ``run_id`` after ``after_id`` until its terminal event."""
    wake = wakeups.register(run_id) if wakeups is not None else None
    interval = POLL_WITH_WAKEUPS_SECONDS if wake is not None else POLL_SECONDS
    cursor = after_id
    checked = time.monotonic()
    CLIENTS.value += 1
    try:
        while True:
            if await disconnected():  # type: ignore[misc]
                return
            if time.monotonic() - checked >= TOKEN_CHECK_SECONDS:
                if not await run_in_threadpool(still_authorised):
                    return
                checked = time.monotonic()
            if wake is not None:
                wake.clear()
            # Status first: a terminal status's entries are committed with it.
            run = await run_in_threadpool(store.get_run, run_id)
            batch = await run_in_threadpool(store.entries, run_id, after_id=cursor, limit=BATCH)
            for entry in batch:
                yield frame(entry)
                cursor = entry.id
                if entry.event in TERMINAL_EVENTS:
                    return
            if len(batch) == BATCH:
                continue
            if run.status.terminal and not batch:
                return
            await _pause(wake, interval)
    finally:
        CLIENTS.value -= 1
        if wakeups is not None and wake is not None:
            wakeups.unregister(run_id, wake)
