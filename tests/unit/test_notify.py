"""Stream wake-ups over Redis pub/sub, on a fakeredis double: the fast tier.

The same paths on a real Redis server are proven in ``tests/api/test_stream.py``
(the ``redis`` parameter) and the acceptance tier.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from worker.api import stream
from worker.models import Event, Level, NewEntry
from worker.notify import Publisher, Wakeups
from worker.store import Store


@pytest.fixture
def server() -> fakeredis.FakeServer:
    """One in-memory Redis server shared by the publishing and the subscribing clients."""
    return fakeredis.FakeServer()


def _wakeups(server: fakeredis.FakeServer) -> Wakeups:
    return Wakeups("redis://fake", connect=lambda: fakeredis.FakeAsyncRedis(server=server))


def test_a_publish_wakes_exactly_the_runs_it_names(server: fakeredis.FakeServer) -> None:
    """Each published run id sets the events of that run's streams, and no other run's."""
    publish = Publisher("redis://fake", client=fakeredis.FakeRedis(server=server))

    async def main() -> tuple[bool, bool]:
        wakeups = _wakeups(server)
        await wakeups.start()
        # The subscription is made in the background.
        async with asyncio.timeout(10):
            await wakeups.subscribed.wait()
        mine, other = wakeups.register("run_a"), wakeups.register("run_b")
        await asyncio.to_thread(publish, ["run_a"])
        async with asyncio.timeout(10):
            await mine.wait()
        await wakeups.stop()
        return mine.is_set(), other.is_set()

    assert asyncio.run(main()) == (True, False)


def test_a_feed_is_woken_by_the_commit_not_by_its_poll(
    server: fakeredis.FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the safety-net poll an hour away, a stream still gets a committed entry at once."""
    monkeypatch.setattr(stream, "POLL_WITH_WAKEUPS_SECONDS", 3600)
    store = Store(f"sqlite:///{tmp_path / 'q.db'}")
    store.upgrade()
    store.on_entries = Publisher("redis://fake", client=fakeredis.FakeRedis(server=server))
    run = store.create_run("demo")
    read_once = threading.Event()
    read = store.entry_dicts

    def counted(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        result = read(*args, **kwargs)
        read_once.set()
        return result

    monkeypatch.setattr(store, "entry_dicts", counted)

    async def main() -> bytes:
        wakeups = _wakeups(server)
        await wakeups.start()
        feeds = stream.Feeds(store, wakeups)

        async def listen() -> bytes:
            chunks = [
                chunk
                async for chunk in stream.entry_events(
                    feeds,
                    run.id,
                    after_id=0,
                    secret="s",
                    still_authorised=lambda: True,
                )
            ]
            return b"".join(chunks)

        listener = asyncio.create_task(listen())
        # The feed has read once: from now on only a wake-up makes it read again.
        assert await asyncio.to_thread(read_once.wait, 10)
        end = NewEntry(run.id, Level.INFO, Event.RUN_COMPLETED.value, "done", datetime.now(UTC))
        await asyncio.to_thread(store.append_entries, [end])
        try:
            return await asyncio.wait_for(listener, timeout=20)
        finally:
            await wakeups.stop()

    got = asyncio.run(main())
    store.close()
    assert b"run_completed" in got


def test_a_restored_subscription_wakes_every_stream_once(server: fakeredis.FakeServer) -> None:
    """While Redis is unreachable the subscription is down (streams poll); once it is back,
    every registered stream is woken, since what was published meanwhile was not heard."""
    attempts = 0

    def connect() -> fakeredis.FakeAsyncRedis:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("Redis is down")
        return fakeredis.FakeAsyncRedis(server=server)

    async def main() -> tuple[bool, bool, bool]:
        wakeups = Wakeups("redis://fake", connect=connect)
        stream_event = wakeups.register("run_a")
        await wakeups.start()
        await asyncio.sleep(0.1)
        down = not wakeups.subscribed.is_set() and not stream_event.is_set()
        async with asyncio.timeout(10):  # the retry comes after a second
            await wakeups.subscribed.wait()
        woken = stream_event.is_set()
        await wakeups.stop()
        return down, woken, wakeups.subscribed.is_set()

    assert asyncio.run(main()) == (True, True, False)
