"""Webhook deliveries in the store: one row per (run, endpoint), its attempts and outcome."""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from worker.store.tables import webhook_deliveries


class DeliveryStatus(enum.StrEnum):
    """Where a webhook delivery is: retries remain, it was delivered, or it was given up."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook delivery."""

    id: int
    run_id: str
    url: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None


def _delivery(row: Any) -> Delivery:
    return Delivery(
        row.id, row.run_id, row.url, DeliveryStatus(row.status), row.attempts, row.last_error
    )


class WebhookQueries:
    """The webhook half of the store interface (mixed into ``Store``)."""

    _reader: Engine

    def _transaction(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def create_deliveries(self, run_id: str, urls: list[str]) -> list[int]:
        """One pending delivery per endpoint; returns their ids."""
        now = datetime.now(UTC)
        with self._transaction() as conn:
            return [
                int(
                    conn.execute(
                        insert(webhook_deliveries)
                        .values(
                            run_id=run_id,
                            url=url,
                            status=DeliveryStatus.PENDING.value,
                            created_at=now,
                        )
                        .returning(webhook_deliveries.c.id)
                    ).scalar_one()
                )
                for url in urls
            ]

    def get_delivery(self, delivery_id: int) -> Delivery:
        """A delivery by id; raises KeyError."""
        with self._reader.connect() as conn:
            row = conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
            ).first()
        if row is None:
            raise KeyError(delivery_id)
        return _delivery(row)

    def deliveries(self, run_id: str) -> list[Delivery]:
        """A run's deliveries."""
        with self._reader.connect() as conn:
            rows = conn.execute(
                select(webhook_deliveries)
                .where(webhook_deliveries.c.run_id == run_id)
                .order_by(webhook_deliveries.c.id)
            )
            return [_delivery(row) for row in rows]

    def record_attempt(
        self, delivery_id: int, *, status: DeliveryStatus, error: str | None
    ) -> None:
        """Count an attempt and its outcome (``pending`` while retries remain)."""
        values: dict[str, Any] = {
            "status": status.value,
            "attempts": webhook_deliveries.c.attempts + 1,
            "last_error": error,
        }
        if status is DeliveryStatus.DELIVERED:
            values["delivered_at"] = datetime.now(UTC)
        with self._transaction() as conn:
            conn.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.id == delivery_id)
                .values(**values)
            )
