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


def read_pages(
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
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    done = threading.Event()

    def pump() -> None:
        try:
            for page in pages:
                while not done.is_set():
                    try:
                        handoff.put((_PAGE, page), timeout=STEP_SECONDS)
                        break
                    except queue.Full:
                        continue
                if done.is_set():
                    return
            _put(handoff, done, (_END, None))
        except BaseException as exc:  # the runner re-raises it in its own thread
            _put(handoff, done, (_ERROR, exc))
        finally:
            close = getattr(pages, "close", None)
            if close is not None:
                close()  # the generator's own cleanup, in the thread that ran it

    reader = threading.Thread(target=pump, name="quarry-reader", daemon=True)
    reader.start()
    try:
        while True:
            deadline = time.monotonic() + page_timeout
            while True:
                check()
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = (
                        f"{what}: the source produced no page for "
                        f"{format_duration(page_timeout)} (page_timeout); the read is abandoned"
                    )
                    raise StallTimeout(msg)
                try:
                    kind, item = handoff.get(timeout=min(STEP_SECONDS, left))
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
        done.set()


def _put(
    handoff: queue.Queue[tuple[str, Any]], done: threading.Event, item: tuple[str, Any]
) -> None:
    while not done.is_set():
        try:
            handoff.put(item, timeout=STEP_SECONDS)
            return
        except queue.Full:
            continue
