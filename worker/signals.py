"""SIGTERM, and nothing else: the handler sets a flag that the runner checks at safe points.

Raising from a signal handler could land in the middle of a COMMIT, so the
handler never raises; the runner stops between pages instead.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopFlag:
    """Set once a stop is requested; read by the runner between pages."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def set(self, reason: str) -> None:
        """Request a stop."""
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
    stop_flag.set(signal.Signals(signum).name)


def install(signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
    """Make the given signals set the stop flag in this process."""
    for sig in signals:
        signal.signal(sig, _on_sigterm)
