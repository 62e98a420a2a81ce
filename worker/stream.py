"""The live log stream (Server-Sent Events): entries as they land, resumable, closed at the end.

Each entry is one event: ``id:`` is the entry id, ``data:`` the entry as JSON
(``{"event": …, "data": {…}, …}``), so ``Last-Event-ID`` resumes with no gap and
no repeat. JSON encoding escapes CR and LF, so no logged text can end a frame
or forge a field.

All streams of one run in an API process share one *feed*: a single task reads
the run's new entries from the store (woken by Redis pub/sub when configured,
polling otherwise) and keeps a recent tail in memory that every client reads
from its own cursor. Two hundred clients of a run cost one store query per
wake-up, not two hundred. A client that starts (or resumes) behind the tail
catches up from the store first. Tokens are re-checked every second through a
shared cache, so a revoked token ends its streams.
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
#: Entries a feed keeps in memory for its clients.
TAIL = 5000


class _Gauge:
    """Open streams in this process (asyncio: one thread, no lock needed)."""

    value = 0


#: Open streams, for /metrics.
CLIENTS = _Gauge()


def frame(entry: Entry) -> dict[str, str]:
    """One SSE event for an entry."""
    return {"id": str(entry.id), "data": jsonfmt.dumps(entry.as_dict())}


class Feed:
    """One run's new entries, read once from the store and shared by all its streams."""

    def __init__(self, store: Store, run_id: str, wakeups: Wakeups | None) -> None:
        self.store = store
        self.run_id = run_id
        self.tail: list[tuple[Entry, dict[str, str]]] = []  # entries and their encoded frames
        self.cursor = 0  # the newest id the feed has read
        self.floor = 0  # entries after this id are all in the tail
        self.done = False
        self.clients = 0
        self.changed = asyncio.Condition()
        self._wakeups = wakeups
        self._task: asyncio.Task[None] | None = None

    async def start(self, after_id: int) -> None:
        """Begin reading after ``after_id`` (the first client's cursor)."""
        self.cursor = self.floor = after_id
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        wake = self._wakeups.register(self.run_id) if self._wakeups is not None else None
        interval = POLL_WITH_WAKEUPS_SECONDS if wake is not None else POLL_SECONDS
        try:
            while not self.done:
                if wake is not None:
                    wake.clear()
                # Status first: a terminal status's entries are committed with it.
                run = await run_in_threadpool(self.store.get_run, self.run_id)
                batch = await run_in_threadpool(
                    self.store.entries, self.run_id, after_id=self.cursor, limit=BATCH
                )
                if batch:
                    # Encoded once here, not once per client.
                    self.tail.extend((e, frame(e)) for e in batch)
                    self.cursor = batch[-1].id
                    if len(self.tail) > TAIL:
                        dropped = self.tail[: len(self.tail) - TAIL]
                        self.floor = dropped[-1][0].id
                        del self.tail[: len(dropped)]
                if any(e.event in TERMINAL_EVENTS for e in batch) or (
                    run.status.terminal and len(batch) < BATCH and not batch
                ):
                    self.done = True
                async with self.changed:
                    self.changed.notify_all()
                if len(batch) == BATCH or self.done:
                    continue
                await _pause(wake, interval)
        finally:
            if self._wakeups is not None and wake is not None:
                self._wakeups.unregister(self.run_id, wake)

    def after(self, cursor: int) -> list[tuple[Entry, dict[str, str]]]:
        """Tail entries (and frames) after ``cursor`` (caller checked ``cursor >= floor``)."""
        if not self.tail or self.tail[-1][0].id <= cursor:
            return []
        return [item for item in self.tail if item[0].id > cursor]


class Feeds:
    """The feeds of one API process, one per run with open streams."""

    def __init__(self, store: Store, wakeups: Wakeups | None) -> None:
        self.store = store
        self.wakeups = wakeups
        self._feeds: dict[str, Feed] = {}
        self._tokens: dict[str, tuple[bool, float]] = {}

    async def join(self, run_id: str, after_id: int) -> Feed:
        """The run's feed, started at ``after_id`` if it is new."""
        feed = self._feeds.get(run_id)
        if feed is None:
            feed = self._feeds[run_id] = Feed(self.store, run_id, self.wakeups)
            await feed.start(after_id)
        feed.clients += 1
        return feed

    async def leave(self, feed: Feed) -> None:
        """Drop a client; the last one stops the feed."""
        feed.clients -= 1
        if feed.clients <= 0 and self._feeds.get(feed.run_id) is feed:
            del self._feeds[feed.run_id]
            await feed.stop()

    async def token_live(self, secret: str, check: Callable[[], bool]) -> bool:
        """Whether the token is live, checked at most once a second per token."""
        live, at = self._tokens.get(secret, (True, 0.0))
        if time.monotonic() - at >= TOKEN_CHECK_SECONDS:
            live = await run_in_threadpool(check)
            self._tokens[secret] = (live, time.monotonic())
        return live


async def _pause(wake: asyncio.Event | None, interval: float) -> None:
    """Sleep ``interval``, or less when a wake-up for the run arrives."""
    if wake is None:
        await asyncio.sleep(interval)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=interval)


async def entry_events(
    feeds: Feeds,
    run_id: str,
    *,
    after_id: int,
    secret: str,
    still_authorised: Callable[[], bool],
    disconnected: Callable[[], object],
) -> AsyncIterator[dict[str, str]]:
    """Yield SSE events for ``run_id`` after ``after_id`` until its terminal event."""
    CLIENTS.value += 1
    feed = await feeds.join(run_id, after_id)
    cursor = after_id
    try:
        while True:
            if await disconnected():  # type: ignore[misc]
                return
            if not await feeds.token_live(secret, still_authorised):
                return
            if cursor < feed.floor:
                # Behind the shared tail (a late or resuming client): catch up from the store.
                batch = await run_in_threadpool(
                    feeds.store.entries, run_id, after_id=cursor, limit=BATCH
                )
                items = [(e, frame(e)) for e in batch if e.id <= feed.floor]
                if not items:
                    cursor = feed.floor
            else:
                items = feed.after(cursor)
            for entry, encoded in items:
                yield encoded
                cursor = entry.id
                if entry.event in TERMINAL_EVENTS:
                    return
            if items:
                continue
            async with feed.changed:
                # Checked under the condition's lock, so a notify cannot slip in between.
                if feed.done and cursor >= feed.cursor:
                    return
                if cursor >= feed.floor and not feed.after(cursor):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(feed.changed.wait(), timeout=TOKEN_CHECK_SECONDS)
    finally:
        CLIENTS.value -= 1
        await feeds.leave(feed)
