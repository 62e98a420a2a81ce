"""Stream wake-ups over Redis pub/sub: writers announce runs with new entries, streams wake.

Optional: with no Redis configured, streams poll the store. A lost wake-up only
costs a poll interval, because the store, not the message, is the truth. While
the subscription is down (Redis restarting), :attr:`Wakeups.subscribed` is clear
and streams poll at the no-Redis rate; when it is back, every stream is woken
once, since anything published meanwhile was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import redis
import redis.asyncio as aioredis

from worker.scrub import describe

#: The pub/sub channel; each message is one run id.
CHANNEL = "quarry:entries"

#: After a failed publish, wake-ups are not published for this long.
PAUSE_SECONDS = 5.0
#: Longest wait between two attempts to subscribe again.
MAX_RETRY_SECONDS = 30.0

log = logging.getLogger("quarry.notify")


class Publisher:
    """Announces, after commit, the runs that got new entries.

    While Redis is away, a commit does not wait on it: after a failed publish the
    next ones are skipped for :data:`PAUSE_SECONDS` (streams poll meanwhile), and
    the outage is one warning, not one per commit.
    """

    def __init__(self, url: str, *, client: redis.Redis | None = None) -> None:
        self._client = client or redis.Redis.from_url(
            url, socket_timeout=1, socket_connect_timeout=1
        )
        self._paused_until = 0.0
        self._failing = False

    def __call__(self, run_ids: Iterable[str]) -> None:
        """Publish each run id once (nothing while paused after a failure)."""
        if time.monotonic() < self._paused_until:
            return
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.publish(CHANNEL, run_id)
                pipe.execute()
        except redis.RedisError as exc:
            self._paused_until = time.monotonic() + PAUSE_SECONDS
            if not self._failing:
                log.warning(
                    "stream wake-ups cannot be published (%s); streams poll until Redis is back",
                    describe(exc),
                )
            self._failing = True
            return
        if self._failing:
            log.warning("stream wake-ups published again")
        self._failing = False

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


class Wakeups:
    """One subscription per API process, fanned out to the streams of each run."""

    def __init__(self, url: str, *, connect: Callable[[], aioredis.Redis] | None = None) -> None:
        self._url = url
        #: Opens the subscription's client (a test passes a fakeredis double).
        self._connect = connect or (lambda: aioredis.Redis.from_url(self._url))
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        #: Set while the subscription is live: a publish from now on wakes its streams.
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe in the background; reconnects after a Redis restart."""
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        """Unsubscribe."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def register(self, run_id: str) -> asyncio.Event:
        """An event set whenever ``run_id`` gets entries."""
        event = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(event)
        return event

    def unregister(self, run_id: str, event: asyncio.Event) -> None:
        """Forget a stream's event."""
        waiters = self._waiters.get(run_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[run_id]

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def _listen(self) -> None:
        lost = False
        delay = 1.0
        while True:
            try:
                client = self._connect()
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.subscribed.set()
                    # Whatever was published before this point was not heard.
                    self._wake_all()
                    if lost:
                        log.warning("wake-up subscription restored")
                        lost, delay = False, 1.0
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        run_id = message["data"].decode()
                        for event in self._waiters.get(run_id, ()):
                            event.set()
            except asyncio.CancelledError:
                self.subscribed.clear()
                raise
            except Exception as exc:
                self.subscribed.clear()
                # Once per outage, one line: streams poll the store meanwhile.
                if not lost:
                    log.warning(
                        "wake-up subscription lost (%s); streams poll until it is back",
                        type(exc).__name__,
                    )
                    lost = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
