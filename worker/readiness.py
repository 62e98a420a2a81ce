"""Readiness of the services an API process depends on besides its store: the broker and Redis.

A process that answers ``/readyz`` ready must be able to do its work: a trigger
publishes to the broker, so a broker it cannot reach makes it not ready, and so
does the Redis its live streams are woken through. Each check is one short
connection attempt, never a retry loop.
"""

from __future__ import annotations

import redis
from kombu import Connection

from worker import broker as _broker  # noqa: F401 - registers the embedded transport
from worker.scrub import describe
from worker.settings import Settings

#: Seconds one readiness check may wait for a connection.
CHECK_TIMEOUT_SECONDS = 2.0


def broker_problem(settings: Settings) -> str | None:
    """Why the broker cannot be reached (one scrubbed line), or None when it can."""
    try:
        with Connection(
            settings.celery_broker_url, connect_timeout=int(CHECK_TIMEOUT_SECONDS)
        ) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=int(CHECK_TIMEOUT_SECONDS)
            )
    except Exception as exc:
        return f"broker unreachable: {describe(exc)}"
    return None


def redis_problem(settings: Settings) -> str | None:
    """Why the stream wake-ups' Redis cannot be reached, or None (also when none is set)."""
    if not settings.notify_url:
        return None
    client = redis.Redis.from_url(
        settings.notify_url,
        socket_timeout=CHECK_TIMEOUT_SECONDS,
        socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"redis unreachable: {describe(exc)}"
    finally:
        client.close()
    return None
