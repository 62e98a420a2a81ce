"""The baseline of the schedule bench: a bare Celery beat entry triggering a no-op task.

``celery -A bench.noop_app worker|beat`` with ``BENCH_NOOP_BROKER`` and ``BENCH_NOOP_OUT``:
beat sends ``bench.noop`` every ``BENCH_NOOP_EVERY`` seconds with an ``expires`` of
:data:`EXPIRES` seconds, which Celery stamps as an absolute time when it sends; the
task, when a worker starts it, appends ``start - (expires - EXPIRES)`` (send → start,
seconds) to the output file.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

from celery import Celery

#: The expiry each message carries; its absolute value minus this is when beat sent it.
EXPIRES = 600.0

app = Celery("bench-noop", broker=os.environ.get("BENCH_NOOP_BROKER", "memory://"))
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "noop": {
            "task": "bench.noop",
            "schedule": float(os.environ.get("BENCH_NOOP_EVERY", "2")),
            "options": {"expires": EXPIRES},
        }
    },
)


@app.task(name="bench.noop", bind=True)
def noop(self: Any) -> None:
    """Record how long after beat sent it this task started."""
    started = time.time()
    expires = self.request.expires
    if expires is None:
        return
    sent = datetime.fromisoformat(str(expires)).timestamp() - EXPIRES
    with open(os.environ["BENCH_NOOP_OUT"], "a", encoding="utf-8") as out:  # noqa: PTH123
        out.write(f"{started - sent:.6f}\n")
