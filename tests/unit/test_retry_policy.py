"""What a retry policy retries: real driver errors from real servers, and the backoff."""

from __future__ import annotations

import threading
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import psycopg
import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import MYSQL_URL, PG_ADMIN_URL, require
from worker.dbfaults import is_transient
from worker.endings import RunEndings
from worker.errors import (
    ConfigError,
    DestinationError,
    SourceError,
    StallTimeout,
    StoreUnavailable,
    is_retryable,
)

PG = make_url(PG_ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def error_of(call: Any) -> BaseException:
    """The exception ``call`` raises."""
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


@pytest.fixture
def pg() -> Any:
    try:
        conn = psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        require("PostgreSQL", exc)
    yield conn
    conn.close()


def test_quarry_errors_say_it_themselves() -> None:
    assert is_retryable(StallTimeout("events: no page for 600s (page_timeout)"))
    assert is_retryable(StoreUnavailable("connection refused"))
    assert is_retryable(SourceError("HTTP 503 after 6 attempts", retryable=True))
    assert is_retryable(ConnectionResetError())
    assert not is_retryable(SourceError("HTTP 401 from GET /v1/contacts"))
    assert not is_retryable(ConfigError("source.url: environment variable X is not set"))
    assert not is_retryable(ValueError("a bug"))


def test_postgres_faults_that_pass_are_retried(pg: Any) -> None:
    """A refused connection, a cancelled statement and a killed session: transient."""
    refused = error_of(lambda: psycopg.connect("postgresql://u@127.0.0.1:1/x", connect_timeout=3))
    assert isinstance(refused, psycopg.OperationalError)
    assert is_transient(refused) and is_retryable(refused)

    pg.execute("SET statement_timeout = 50")
    cancelled = error_of(lambda: pg.execute("SELECT pg_sleep(2)"))
    assert isinstance(cancelled, psycopg.errors.QueryCanceled)
    assert is_retryable(cancelled)

    victim = psycopg.connect(PG, autocommit=True)
    pid = victim.info.backend_pid
    threading.Thread(target=lambda: pg.execute("SELECT pg_terminate_backend(%s)", (pid,))).start()
    killed = error_of(lambda: victim.execute("SELECT pg_sleep(5)"))
    victim.close()
    assert isinstance(killed, psycopg.OperationalError)
    assert is_retryable(killed)

    # SQLAlchemy's wrapper of the same (the SQL source reads through it).
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:1/x")
    wrapped = error_of(engine.connect)
    engine.dispose()
    assert isinstance(wrapped, sa.exc.OperationalError) and is_retryable(wrapped)


def test_postgres_mistakes_are_not_retried(pg: Any) -> None:
    """A missing database, bad SQL, bad data: the pipeline's, never retried."""
    missing = make_url(PG_ADMIN_URL).set(drivername="postgresql", database="quarry_nope_db")
    nodb = error_of(
        lambda: psycopg.connect(missing.render_as_string(hide_password=False), connect_timeout=3)
    )
    assert isinstance(nodb, psycopg.OperationalError)
    assert not is_retryable(nodb)
    assert not is_retryable(error_of(lambda: pg.execute("SELECT no_such_column FROM pg_class")))
    assert not is_retryable(error_of(lambda: pg.execute("SELECT 1 / 0")))
    assert not is_retryable(error_of(lambda: pg.execute("SELECT 'x'::int")))
    assert not is_retryable(DestinationError("orders.amount: value 'x' is not numeric"))


def test_mariadb_refused_login_is_not_retried_and_a_refused_port_is() -> None:
    url = make_url(MYSQL_URL)
    try:
        pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, connect_timeout=3)
    except pymysql.err.OperationalError as exc:
        require("MariaDB", exc)
    login = error_of(
        lambda: pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user="quarry_no_such_user",
            password="wrong",
            connect_timeout=3,
        )
    )
    assert isinstance(login, pymysql.err.OperationalError)
    assert "access denied" in str(login).lower()
    assert not is_retryable(login)
    port = error_of(lambda: pymysql.connect(host="127.0.0.1", port=1, connect_timeout=3))
    assert is_retryable(port)


def attempt(retries_so_far: int, *, allowed: int = 5, cancelled: bool = False) -> Any:
    """The parts of an attempt the retry policy reads."""
    cancel = threading.Event()
    if cancelled:
        cancel.set()
    return SimpleNamespace(
        run=SimpleNamespace(retries=retries_so_far),
        heartbeat=SimpleNamespace(cancel_requested=cancel),
        pipeline=SimpleNamespace(
            retries=allowed,
            retry_delay=timedelta(seconds=10),
            retry_max_delay=timedelta(seconds=60),
        ),
    )


def test_the_delay_doubles_with_jitter_up_to_its_cap() -> None:
    transient = StoreUnavailable("connection refused")
    for n, ceiling in enumerate((10, 20, 40, 60, 60)):
        delays = [RunEndings._retry_delay(None, attempt(n), transient) for _ in range(200)]  # type: ignore[arg-type]
        seconds = [d.total_seconds() for d in delays if d is not None]
        assert len(seconds) == 200
        assert min(seconds) >= ceiling / 2 and max(seconds) <= ceiling
        assert max(seconds) - min(seconds) > ceiling / 10  # spread: runs do not retry together


def test_no_retry_past_the_policy_after_a_cancel_or_for_a_mistake() -> None:
    transient = StoreUnavailable("connection refused")
    assert RunEndings._retry_delay(None, attempt(5, allowed=5), transient) is None  # type: ignore[arg-type]
    assert RunEndings._retry_delay(None, attempt(0, cancelled=True), transient) is None  # type: ignore[arg-type]
    mistake = ConfigError("source.table: no table 'x'")
    assert RunEndings._retry_delay(None, attempt(0), mistake) is None  # type: ignore[arg-type]
    assert RunEndings._retry_delay(None, None, transient) is None  # type: ignore[arg-type]
