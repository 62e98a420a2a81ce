"""Shared fixtures: real PostgreSQL and Redis when present (required when CI is set)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from worker.store import Store
from worker.store.tables import metadata

# No per-example deadline: hypothesis's default (200 ms) is a timed assertion, and it
# failed a pure function on a loaded 2-core machine.
settings.register_profile("quarry", deadline=None)
settings.load_profile("quarry")

#: Set in CI: a missing service is then a failure, not a skip.
CI = bool(os.environ.get("CI"))
REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "QUARRY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("QUARRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("QUARRY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
MYSQL_URL = os.environ.get("QUARRY_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def require(service: str, error: BaseException) -> None:
    """Skip when a service is absent locally; fail in CI, where every service must be up."""
    if CI:
        raise RuntimeError(f"{service} is required in CI: {error}") from error
    pytest.skip(f"{service} not available: {error}")


@contextlib.contextmanager
def empty_pg(prefix: str = "quarry_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped after."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        require("PostgreSQL", exc)
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head, dropped after."""
    with empty_pg() as url:
        store = Store(url)
        store.upgrade()
        store.close()
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server's URL, after a PING."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        require("Redis", exc)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ server's URL, after a connection is made."""
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        require("RabbitMQ", exc)
    return AMQP_URL


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A fresh MariaDB / MySQL database for this test process, dropped after (test
    processes run side by side, and each loads its own ``src_orders``)."""
    engine = create_engine(MYSQL_URL)
    name = f"quarry_test_{secrets.token_hex(4)}"
    try:
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}`"))
    except Exception as exc:
        engine.dispose()
        require("MariaDB", exc)
    yield make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new embedded store file, migrated to head."""
    url = f"sqlite:///{tmp_path / 'quarry.db'}"
    store = Store(url)
    store.upgrade()
    store.close()
    return url


def truncate(url: str) -> None:
    """Empty every Quarry table of a test store (PostgreSQL or SQLite), ids restarted."""
    engine = create_engine(url)
    tables = [t.name for t in metadata.sorted_tables]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in reversed(tables):  # children before their parents
                conn.execute(text(f"DELETE FROM {name}"))
            conn.execute(text("DELETE FROM sqlite_sequence"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The store on each backend: the behaviour suite runs once per database."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_url")
        truncate(url)
    instance = Store(url)
    yield instance
    instance.close()
