"""The embedded broker: kombu's SQLAlchemy transport, with a polling interval that works.

kombu's SQLAlchemy channel hands every transport option it does not know to
``create_engine``, so the virtual transport's own ``polling_interval`` option
breaks it. This subclass keeps that option away from the engine and gives
SQLite a busy timeout, since workers and the CLI share the broker file. Its
queue creation guards against threads of one process only: two workers
starting at once both insert the queue's row, and the loser's worker died on
the unique constraint. Here the loser reads the winner's row instead.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as _Channel
from kombu.transport.sqlalchemy import Transport as _Transport
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError

#: URL scheme prefix of the embedded broker: ``quarry-sqla+sqlite:///path``.
SCHEME = "quarry-sqla"

#: kombu options that are not engine arguments.
_NOT_ENGINE_OPTIONS = (
    "queue_tablename",
    "message_tablename",
    "callback",
    "errback",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "retry_errors",
    "polling_interval",
)


class Channel(_Channel):
    """kombu's SQLAlchemy channel with engine options filtered."""

    def _engine_from_config(self) -> Any:
        conninfo: Any = self.connection.client
        options = {
            k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS
        }
        if conninfo.hostname.startswith("sqlite"):
            options.setdefault("connect_args", {"timeout": 30})
        return create_engine(conninfo.hostname, **options)

    def _get_or_create(self, queue: str) -> Any:
        try:
            return super()._get_or_create(queue)  # type: ignore[misc]  # untyped in the stubs
        except IntegrityError:  # another process created it between our read and our insert
            self.session.rollback()
            return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).one()


class Transport(_Transport):
    """kombu's SQLAlchemy transport using :class:`Channel`."""

    Channel = Channel


TRANSPORT_ALIASES[SCHEME] = "worker.broker:Transport"
