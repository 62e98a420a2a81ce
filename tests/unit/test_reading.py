"""Pages read in a thread: a stalled page times out, a stop is honoured mid-page, a source's
error and its cleanup reach the runner."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from worker.errors import SourceError, StallTimeout, StopRequested
from worker.models import StopReason
from worker.reading import read_pages
from worker.sources.base import Page


def pages(n: int, *, block: threading.Event | None = None, closed: list[str]) -> Iterator[Page]:
    try:
        for i in range(n):
            yield [{"i": i}]
        if block is not None:
            block.wait()  # a read that never returns (until the test lets it)
            yield [{"i": "late"}]
    finally:
        closed.append("closed")


def never() -> None:
    return None


def test_pages_arrive_in_order_and_the_source_is_closed() -> None:
    closed: list[str] = []
    got = list(read_pages(pages(5, closed=closed), page_timeout=5, check=never, what="r"))
    assert [p[0]["i"] for p in got] == [0, 1, 2, 3, 4]
    assert closed == ["closed"]


def test_a_stalled_page_fails_with_an_error_naming_the_timeout() -> None:
    closed: list[str] = []
    release = threading.Event()
    got: list[Page] = []
    with pytest.raises(StallTimeout, match=r"events slice 3/9: the source produced no page"):
        for page in read_pages(
            pages(2, block=release, closed=closed),
            page_timeout=0.5,
            check=never,
            what="events slice 3/9",
        ):
            got.append(page)
    assert len(got) == 2
    assert StallTimeout("x").retryable
    release.set()  # the abandoned reader ends and closes its generator
    for _ in range(100):
        if closed:
            break
        threading.Event().wait(0.05)
    assert closed == ["closed"]


def test_a_stop_is_honoured_while_a_page_is_being_read() -> None:
    closed: list[str] = []
    release = threading.Event()
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise StopRequested(StopReason.CANCELLED)

    reader = read_pages(
        pages(1, block=release, closed=closed), page_timeout=60, check=check, what="r"
    )
    assert next(reader)[0]["i"] == 0
    stop.set()
    with pytest.raises(StopRequested):
        next(reader)  # returns within a step, although the page never comes
    release.set()


def test_a_source_error_reaches_the_runner() -> None:
    def failing() -> Iterator[Page]:
        yield [{"i": 0}]
        raise SourceError("HTTP 401", retryable=False)

    reader = read_pages(failing(), page_timeout=5, check=never, what="r")
    assert next(reader) == [{"i": 0}]
    with pytest.raises(SourceError, match="HTTP 401"):
        next(reader)


def test_leaving_early_closes_the_source_in_its_own_thread() -> None:
    closed: list[str] = []
    reader = read_pages(pages(100, closed=closed), page_timeout=5, check=never, what="r")
    next(reader)
    reader.close()  # the runner stopped (a destination error, a SIGTERM)
    for _ in range(100):
        if closed:
            break
        threading.Event().wait(0.05)
    assert closed == ["closed"]
