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
shared cache, so a revoked token ends its streams. While the store is
unavailable (a restart, a failover) streams stay open and carry on after it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from worker.errors import StoreUnavailable
from worker.models import TERMINAL_EVENTS
from worker.notify import Wakeups
from worker.store import Store
from worker.store.reads import entries_json

#: Poll interval without Redis; with Redis, the safety-net poll.
POLL_SECONDS = 0.25
POLL_WITH_WAKEUPS_SECONDS = 2.0
#: How often a feed tries the store again while it is unavailable.
STORE_RETRY_SECONDS = 1.0
#: How often a stream re-checks that its token is still live.
TOKEN_CHECK_SECONDS = 1.0
#: Entries read per store query.
BATCH = 500
#: Entries a feed keeps in memory for its clients.
TAIL = 5000

_TERMINAL = frozenset(event.value for event in TERMINAL_EVENTS)


class _Gauge:
    """Open streams in this process (asyncio: one thread, no lock needed)."""

    value = 0


#: Open streams, for /metrics.
CLIENTS = _Gauge()


def frame(entry: dict[str, Any]) -> bytes:
    """One SSE event for an entry (a ``Store.entry_dicts`` item), as it goes on the wire.

    What sse-starlette's ``ServerSentEvent(id=…, data=…).encode()`` writes with
    its ``\\r\\n`` separator: the JSON holds no CR or LF (they are escaped), so
    the data is one line. Built here once per entry and shared by every client.
    """
    return b"id: %d\r\ndata: %b\r\n\r\n" % (entry["id"], entries_json(entry))


class Feed:
    """One run's new entries, read once from the store and shared by all its streams."""

    def __init__(self, store: Store, run_id: str, wakeups: Wakeups | None) -> None:
        self.store = store
        self.run_id = run_id
        # The tail: entry ids, whether each is a terminal event, and each encoded frame.
        self.ids: list[int] = []
        self.ends: list[bool] = []
        self.frames: list[bytes] = []
        self.cursor = 0  # the newest id the feed has read
        self.floor = 0  # entries after this id are all in the tail
        self.done = False
        self.clients = 0
        self._changed = asyncio.Event()  # replaced at each change; waiters hold the old one
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

    def changed(self) -> asyncio.Event:
        """An event set at the feed's next change (new entries, or done)."""
        return self._changed

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        wakeups = self._wakeups
        wake = wakeups.register(self.run_id) if wakeups is not None else None
        try:
            while not self.done:
                if wake is not None:
                    wake.clear()
                try:
                    # Status first: a terminal status's entries are committed with it.
                    run = await run_in_threadpool(self.store.get_run, self.run_id)
                    batch = await run_in_threadpool(
                        self.store.entry_dicts, self.run_id, after_id=self.cursor, limit=BATCH
                    )
                except StoreUnavailable:
                    # A restart or a failover: the streams stay open and carry on after it.
                    await asyncio.sleep(STORE_RETRY_SECONDS)
                    continue
                if batch:
                    # Encoded once here, not once per client.
                    self.ids += [e["id"] for e in batch]
                    self.ends += [e["event"] in _TERMINAL for e in batch]
                    self.frames += [frame(e) for e in batch]
                    self.cursor = self.ids[-1]
                    if len(self.ids) > TAIL:
                        cut = len(self.ids) - TAIL
                        self.floor = self.ids[cut - 1]
                        del self.ids[:cut], self.ends[:cut], self.frames[:cut]
                if any(e["event"] in _TERMINAL for e in batch) or (
                    run.status.terminal and not batch
                ):
                    self.done = True
                if batch or self.done:
                    self._notify()
                if len(batch) == BATCH or self.done:
                    continue
                # Without a live subscription (none configured, or Redis down), poll.
                live = wakeups is not None and wakeups.subscribed.is_set()
                await _pause(wake, POLL_WITH_WAKEUPS_SECONDS if live else POLL_SECONDS)
        finally:
            if wakeups is not None and wake is not None:
                wakeups.unregister(self.run_id, wake)

    def after(self, cursor: int) -> tuple[list[int], list[bool], list[bytes]]:
        """Tail ids, terminal flags and frames after ``cursor`` (caller checked ``>= floor``)."""
        start = bisect.bisect_right(self.ids, cursor)
        return self.ids[start:], self.ends[start:], self.frames[start:]


class Feeds:
    """The feeds of one API process, one per run with open streams."""

    def __init__(self, store: Store, wakeups: Wakeups | None) -> None:
        self.store = store
        self.wakeups = wakeups
        self._feeds: dict[str, Feed] = {}
        self._tokens: dict[str, tuple[bool, float]] = {}
        self._checking: dict[str, asyncio.Future[bool]] = {}

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
        """Whether the token is live, checked at most once a second per token.

        One check per token at a time: the streams that find the answer stale
        together (two hundred woken by the same entry) all wait for that one,
        rather than each sending its own query through the thread pool.
        """
        live, at = self._tokens.get(secret, (True, 0.0))
        if time.monotonic() - at < TOKEN_CHECK_SECONDS:
            return live
        pending = self._checking.get(secret)
        if pending is None:
            pending = asyncio.ensure_future(self._check(secret, check))
            self._checking[secret] = pending
        return await asyncio.shield(pending)

    async def _check(self, secret: str, check: Callable[[], bool]) -> bool:
        try:
            live = await run_in_threadpool(check)
        except StoreUnavailable:
            # Nobody can revoke a token while the store is away: keep the last answer.
            live = self._tokens.get(secret, (True, 0.0))[0]
        finally:
            del self._checking[secret]
        self._tokens[secret] = (live, time.monotonic())
        return live


async def _pause(wake: asyncio.Event | None, interval: float) -> None:
    """Sleep ``interval``, or less when a wake-up for the run arrives."""
    if wake is None:
        await asyncio.sleep(interval)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=interval)


def _catch_up(feeds: Feeds, run_id: str, cursor: int, floor: int) -> list[dict[str, Any]]:
    """Entries after ``cursor`` up to the feed's ``floor``, read from the store."""
    batch = feeds.store.entry_dicts(run_id, after_id=cursor, limit=BATCH)
    return [e for e in batch if e["id"] <= floor]


async def entry_events(
    feeds: Feeds,
    run_id: str,
    *,
    after_id: int,
    secret: str,
    still_authorised: Callable[[], bool],
) -> AsyncIterator[bytes]:
    """Yield SSE frames for ``run_id`` after ``after_id`` until its terminal event.

    Every frame ready at a wake-up goes out in one write: a client that is a few
    entries behind costs one send, not one per entry. A client that goes away is
    seen by sse-starlette's own listener, which cancels this generator where it
    waits; polling ``Request.is_disconnected`` at every wake-up as well cost a
    sixth of a busy API process's CPU (an anyio cancel scope each time).
    """
    CLIENTS.value += 1
    feed = await feeds.join(run_id, after_id)
    cursor = after_id
    try:
        while True:
            if not await feeds.token_live(secret, still_authorised):
                return
            changed = feed.changed()  # taken before looking, so no change slips past
            if cursor < feed.floor:
                # Behind the shared tail (a late or resuming client): catch up from the store.
                try:
                    batch = await run_in_threadpool(_catch_up, feeds, run_id, cursor, feed.floor)
                except StoreUnavailable:
                    await asyncio.sleep(STORE_RETRY_SECONDS)
                    continue
                if not batch:
                    cursor = feed.floor
                    continue
                ids = [e["id"] for e in batch]
                ends = [e["event"] in _TERMINAL for e in batch]
                frames = [frame(e) for e in batch]
            else:
                ids, ends, frames = feed.after(cursor)
            if ids:
                if True in ends:  # the run's end: nothing after it
                    last = ends.index(True) + 1
                    yield b"".join(frames[:last])
                    return
                yield b"".join(frames)
                cursor = ids[-1]
                continue
            if feed.done and cursor >= feed.cursor:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TOKEN_CHECK_SECONDS):
                    await changed.wait()
    finally:
        CLIENTS.value -= 1
        await feeds.leave(feed)
