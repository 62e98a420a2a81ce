"""SIGTERM, and nothing else.

In a pool child the handler sets a flag that the runner checks at safe points:
raising from a signal handler could land in the middle of a COMMIT, so it never
raises; the run stops between pages instead. In the worker's main process,
Celery's warm shutdown is extended to forward SIGTERM to the pool children and
to escalate to a cold shutdown if they have not finished by a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from worker.models import StopReason


class StopFlag:
    """Set once a stop is requested; read by the runner between pages."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: StopReason | None = None

    def set(self, reason: StopReason) -> None:
        """Request a stop (the first reason given is kept)."""
        if self.signal_name is None:
            self.signal_name = reason
        self._event.set()

    def clear(self) -> None:
        """Forget a stop request (a fresh task in a reused process)."""
        self.signal_name = None
        self._event.clear()

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on a stop request."""
        return self._event.wait(timeout)


#: The process-wide stop flag.
stop_flag = StopFlag()


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    stop_flag.set(StopReason(signal.Signals(signum).name))


def install(signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
    """Make the given signals set the stop flag in this process."""
    for sig in signals:
        signal.signal(sig, _on_sigterm)


def child_pids(pid: int | None = None) -> list[int]:
    """The direct children of ``pid`` (this process by default), from /proc."""
    pid = pid or os.getpid()
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        return []
    return sorted(set(found))


def forward_to_children(sig: signal.Signals = signal.SIGTERM) -> list[int]:
    """Send ``sig`` to every child of this process (the pool); returns their pids.

    Celery's warm shutdown only stops the main process from taking new work and
    waits for running tasks; a run would go on to the end of a 45-minute slice.
    Forwarding SIGTERM makes each child's run stop at its next page instead.
    """
    sent = []
    for pid in child_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            sent.append(pid)
    return sent


def arm_deadline(grace: float, soft: float) -> threading.Timer:
    """After ``grace`` seconds, SIGKILL the children still running; ``soft`` later, SIGQUIT self.

    The escalation for a run stuck inside one page (a hung socket): its child
    is killed, its lease expires and the watchdog resumes the run elsewhere.
    A forwarded SIGTERM cannot do this (it only sets the flag), and billiard's
    own terminate sends SIGTERM too. SIGQUIT then makes Celery's cold shutdown
    finish whatever else is left, well inside the orchestrator's kill deadline.
    """
    pid = os.getpid()

    def escalate() -> None:
        stuck = child_pids(pid)
        if stuck:
            sys.stderr.write(
                f"quarry: runs did not reach a safe point within {grace:.0f}s; killing pool "
                f"children {stuck} (their leases expire and the watchdog resumes them)\n"
            )
        for child in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        last = threading.Timer(soft, lambda: os.kill(pid, signal.SIGQUIT))
        last.daemon = True
        last.start()

    timer = threading.Timer(grace, escalate)
    timer.daemon = True
    timer.start()
    return timer
