"""A source's pages, read in a thread of their own so that a hung read cannot hang its run.

The runner checks for SIGTERM, cancellation, a lost lease and its time limit
between pages. A source blocked inside one page (a socket that never answers,
a query that never returns its first row) would keep it from checking at all,
while the heartbeat thread kept the lease alive: the run would hang forever,
and with ``max_active_runs = 1`` every later run of its pipeline behind it.

So the source's generator runs in a reader thread, one page ahead of the
runner, and the runner waits for each page in short steps, checking between
them. A page that takes longer than the pipeline's ``page_timeout`` fails the
slice with :class:`~worker.errors.StallTimeout` (retryable); a stop or a
cancel is honoured within a step, even mid-page. A reader left blocked is a
daemon thread: it cannot write anything (only the runner writes), and the
lease fence refuses whatever its run would still commit.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from worker.errors import StallTimeout
from worker.sources.base import Page
from worker.wording import format_duration

#: How often the waiting runner checks for a stop while a page is being read.
STEP_SECONDS = 0.25

_PAGE, _END, _ERROR = "page", "end", "error"


class PageReader:
    """A reader thread, reused slice after slice of one attempt; replaced when abandoned.

    Starting a thread per slice cost more than the rest of a slice's overhead; one
    thread takes each slice's generator in turn. A thread left blocked in a stalled
    page is abandoned (it owns nothing the runner needs) and the next slice gets a
    new one.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[_Job | None] | None = None

    def read(
        self,
        pages: Iterator[Page],
        *,
        page_timeout: float,
        check: Callable[[], None],
        what: str,
    ) -> Iterator[Page]:
        """Yield ``pages`` as the reader thread produces them, checking every step.

        ``check`` raises to stop (it is the runner's safe point). A page not produced
        within ``page_timeout`` seconds raises :class:`StallTimeout` naming ``what``.
        """
        if self._jobs is None:
            self._jobs = queue.Queue()
            threading.Thread(
                target=_serve, args=(self._jobs,), name="quarry-reader", daemon=True
            ).start()
        job = _Job(pages, queue.Queue(maxsize=1), threading.Event())
        self._jobs.put(job)
        try:
            while True:
                deadline = time.monotonic() + page_timeout
                while True:
                    check()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._jobs = None  # the thread is stuck in this page: abandon it
                        msg = (
                            f"{what}: the source produced no page for "
                            f"{format_duration(page_timeout)} (page_timeout); "
                            "the read is abandoned"
                        )
                        raise StallTimeout(msg)
                    try:
                        kind, item = job.handoff.get(timeout=min(STEP_SECONDS, left))
                        break
                    except queue.Empty:
                        continue
                if kind == _PAGE:
                    yield item
                elif kind == _END:
                    return
                else:
                    raise item
        finally:
            job.done.set()

    def close(self) -> None:
        """Let the reader thread end once it is idle."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None


def read_pages(
    pages: Iterator[Page],
    *,
    page_timeout: float,
    check: Callable[[], None],
    what: str,
) -> Iterator[Page]:
    """:meth:`PageReader.read` on a reader of its own (one slice)."""
    reader = PageReader()
    try:
        yield from reader.read(pages, page_timeout=page_timeout, check=check, what=what)
    finally:
        reader.close()


class _Job:
    """One slice's pages, the hand-off to the runner, and the runner's "no more" flag."""

    __slots__ = ("done", "handoff", "pages")

    def __init__(
        self,
        pages: Iterator[Page],
        handoff: queue.Queue[tuple[str, Any]],
        done: threading.Event,
    ) -> None:
        self.pages = pages
        self.handoff = handoff
        self.done = done


def _serve(jobs: queue.Queue[_Job | None]) -> None:
    """The reader thread: each slice's generator in turn, until told to end."""
    while (job := jobs.get()) is not None:
        _pump(job)


def _pump(job: _Job) -> None:
    try:
        for page in job.pages:
            if not _put(job, (_PAGE, page)):
                return
        _put(job, (_END, None))
    except BaseException as exc:  # the runner re-raises it in its own thread
        _put(job, (_ERROR, exc))
    finally:
        close = getattr(job.pages, "close", None)
        if close is not None:
            # The generator's own cleanup, in the thread that ran it; a failing cleanup
            # must not end the thread the next slices are read by.
            with contextlib.suppress(Exception):
                close()


def _put(job: _Job, item: tuple[str, Any]) -> bool:
    """Hand ``item`` to the runner; False when the runner no longer wants pages."""
    while not job.done.is_set():
        try:
            job.handoff.put(item, timeout=STEP_SECONDS)
            return True
        except queue.Full:
            continue
    return False
