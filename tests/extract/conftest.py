"""Fixtures for the sources and destinations: a recording logger and a source database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from tests.crm_api import CrmServer
from worker.destinations import build_destination
from worker.destinations.postgres import PostgresDestination


class RecordingLog:
    """Stands in for the run's logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def _keep(self, level: str, event: str, **fields: Any) -> None:
        self.records.append((level, str(event), fields))

    def info(self, event: str, **fields: Any) -> None:
        """Record an info entry."""
        self._keep("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Record a warning entry."""
        self._keep("warning", event, **fields)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The fields of every entry named ``name``."""
        return [fields for _, event, fields in self.records if event == name]


@pytest.fixture
def log() -> RecordingLog:
    """A fresh recording logger."""
    return RecordingLog()


@pytest.fixture
def crm() -> Iterator[CrmServer]:
    """The fake CRM API on a free port."""
    server = CrmServer(total=600).start()
    yield server
    server.stop()


ORDERS_DDL = {
    "postgresql": (
        "CREATE TABLE src_orders (id integer PRIMARY KEY, created_at timestamptz NOT NULL,"
        " customer text, amount numeric(10,2), paid boolean, note text)"
    ),
    "mysql": (
        "CREATE TABLE src_orders (id integer PRIMARY KEY, created_at datetime(6) NOT NULL,"
        " customer varchar(50), amount decimal(10,2), paid boolean, note text)"
    ),
    "sqlite": (
        "CREATE TABLE src_orders (id integer PRIMARY KEY, created_at timestamp NOT NULL,"
        " customer text, amount numeric, paid boolean, note text)"
    ),
}


def load_orders(url: str, count: int) -> None:
    """(Re)create ``src_orders`` with ``count`` rows, one a minute from 2026-01-01."""
    engine = create_engine(url)
    dialect = engine.dialect.name
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS src_orders"))
        conn.execute(text(ORDERS_DDL[dialect]))
        rows = [
            {
                "id": i,
                "created_at": f"2026-01-01 {(i // 60) % 24:02d}:{i % 60:02d}:00",
                "customer": f"c{i % 17}",
                "amount": f"{i * 1.25:.2f}",
                "paid": i % 3 == 0,
                "note": None if i % 5 else f"note {i}",
            }
            for i in range(count)
        ]
        conn.execute(
            text(
                "INSERT INTO src_orders (id, created_at, customer, amount, paid, note)"
                " VALUES (:id, :created_at, :customer, :amount, :paid, :note)"
            ),
            rows,
        )
    engine.dispose()


@pytest.fixture
def target(pg_url: str) -> Iterator[tuple[PostgresDestination, psycopg.Connection[Any]]]:
    """A sql destination writing ``raw_<resource>`` to a fresh schema, and a connection to
    look with; the schema is dropped after."""
    schema = f"dest_{uuid.uuid4().hex[:8]}"
    d = build_destination("sql", {"url": pg_url, "schema": schema, "table": "raw_{resource}"}, None)  # type: ignore[arg-type]
    assert isinstance(d, PostgresDestination)
    look = psycopg.connect(
        pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )
    yield d, look
    d.close()
    look.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    look.close()
