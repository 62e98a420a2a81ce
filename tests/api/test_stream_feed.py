"""Stream feeds in process: the wire bytes of each event, many clients, late clients, the end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sse_starlette.event import ServerSentEvent

from worker import jsonfmt
from worker.api import stream
from worker.models import Event, Level, NewEntry
from worker.store import Store


def _entries(run_id: str, count: int, start: int = 0) -> list[NewEntry]:
    return [
        NewEntry(
            run_id,
            Level.INFO,
            "slice_completed",
            f"m{i}\r\ndata: forged\n\nevent: x \u2028 ü",
            datetime.now(UTC),
            {"i": i, "text": "a\nb"},
            "w",
            1,
        )
        for i in range(start, start + count)
    ]


def test_frames_are_what_sse_starlette_wrote(store: Store) -> None:
    """frame() gives the bytes ServerSentEvent(id, data=jsonfmt JSON).encode() gave."""
    run = store.create_run("demo")
    store.append_entries(_entries(run.id, 5))
    for entry, as_dict in zip(store.entries(run.id), store.entry_dicts(run.id), strict=True):
        old = ServerSentEvent(id=str(entry.id), data=jsonfmt.dumps(entry.as_dict()), sep="\r\n")
        assert stream.frame(as_dict) == old.encode()


async def _listen(feeds: stream.Feeds, run_id: str, after_id: int = 0) -> bytes:
    chunks = [
        chunk
        async for chunk in stream.entry_events(
            feeds,
            run_id,
            after_id=after_id,
            secret="s",
            still_authorised=lambda: True,
        )
    ]
    return b"".join(chunks)


@pytest.mark.parametrize("tail", [5000, 7])
def test_every_client_gets_every_frame_once_then_the_end(
    store: Store, tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thirty clients (some late, behind a short tail) get the same bytes: every entry, the end."""
    monkeypatch.setattr(stream, "TAIL", tail)
    monkeypatch.setattr(stream, "POLL_SECONDS", 0.02)
    run = store.create_run("demo")
    store.append_entries(_entries(run.id, 20))

    async def main() -> list[bytes]:
        feeds = stream.Feeds(store, None)
        early = [asyncio.create_task(_listen(feeds, run.id)) for _ in range(20)]
        await asyncio.sleep(0.1)
        for n in range(3):
            await asyncio.to_thread(store.append_entries, _entries(run.id, 9, 20 + 9 * n))
            await asyncio.sleep(0.03)
        late = [asyncio.create_task(_listen(feeds, run.id)) for _ in range(10)]
        end = NewEntry(run.id, Level.INFO, Event.RUN_COMPLETED.value, "done", datetime.now(UTC))
        after = NewEntry(run.id, Level.INFO, "after_the_end", "never sent", datetime.now(UTC))
        await asyncio.to_thread(store.append_entries, [end, after])
        return await asyncio.wait_for(asyncio.gather(*early, *late), timeout=30)

    got = asyncio.run(main())
    dicts = store.entry_dicts(run.id)
    assert dicts[-1]["event"] == "after_the_end"
    wanted = b"".join(stream.frame(e) for e in dicts[:-1])
    assert len(dicts) == 49
    assert all(stream_bytes == wanted for stream_bytes in got)
    assert stream.CLIENTS.value == 0


def test_a_resumed_client_starts_after_its_cursor(store: Store) -> None:
    """Last-Event-ID: only the entries after it, then the end."""
    run = store.create_run("demo")
    store.append_entries(_entries(run.id, 6))
    end = NewEntry(run.id, Level.INFO, Event.RUN_FAILED.value, "failed", datetime.now(UTC))
    store.append_entries([end])
    dicts = store.entry_dicts(run.id)
    got = asyncio.run(_listen(stream.Feeds(store, None), run.id, after_id=dicts[3]["id"]))
    assert got == b"".join(stream.frame(e) for e in dicts[4:])
