"""What real workers print through a rolling deploy and a killed pool process, on Redis +
PostgreSQL: no ERROR and no traceback for either, one ready line each, no password."""

from __future__ import annotations

import os
import re
import secrets
import signal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.acceptance.harness import Cluster, WorkerProcess, wait_for
from worker.models import Status
from worker.scrub import scrub

pytestmark = pytest.mark.acceptance

#: A password the servers accept when they ask for none (PostgreSQL trust, Redis nopass).
PASSWORD = f"pw-{secrets.token_hex(6)}"
#: Anything a log-based alert fires on.
ALARM = re.compile(r"ERROR|CRITICAL|Traceback|\"level\":\s*\"(?:error|critical)\"")
READY = re.compile(r"^\[[^]]*: INFO/MainProcess\] .*\bready\b.*$", re.MULTILINE)


def _db_with_password(url: str) -> str:
    """``url`` with a password in it, if it has none and the server lets one through."""
    if make_url(url).password:
        return url
    candidate = make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
    engine = create_engine(candidate)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        return url
    finally:
        engine.dispose()
    return candidate


def _broker_with_password(url: str) -> str:
    """The Redis ``url`` with a password in it, if it has none and the server takes one."""
    parts = urlsplit(url)
    if parts.password:
        return url
    candidate = urlunsplit(parts._replace(netloc=f"default:{PASSWORD}@{parts.netloc}"))
    client = redis.Redis.from_url(candidate, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        return url
    finally:
        client.close()
    return candidate


def running_child(cluster: Cluster, run_id: str) -> int:
    """The pid of the pool process executing ``run_id`` (asked of the workers themselves)."""

    def find() -> int | None:
        active = cluster.app.control.inspect(timeout=1).active() or {}
        for tasks in active.values():
            for task in tasks:
                if task["args"] == [run_id]:
                    return int(task["worker_pid"])
        return None

    pid: int = wait_for(find, f"a pool process executing {run_id}")
    return pid


def lines(worker: WorkerProcess, pattern: str) -> list[str]:
    return [line for line in worker.log().splitlines() if re.search(pattern, line)]


def test_a_rolling_deploy_and_a_killed_pool_process_log_no_error(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    """a runs a slow run; b starts; SIGTERM to a's whole group: a exits 0, b resumes the
    run. Then b's pool process running it is SIGKILLed: b re-queues the run and it
    completes. Neither worker prints an ERROR, a traceback or a password."""
    database_url, broker_url = _db_with_password(pg_url), _broker_with_password(redis_url)
    passwords = {p for p in (make_url(database_url).password, urlsplit(broker_url).password) if p}
    c = Cluster(tmp_path, database_url=database_url, broker_url=broker_url)
    try:
        c.beat()
        a = c.worker("a", concurrency=2)  # a pool process that never ran a run: billiard's
        # own SIGTERM handler ends it at the deploy. Pages slow enough that b is still on the
        # run when it is asked which process executes it.
        run_id = c.trigger("slow", page_latency_ms=120)
        wait_for(lambda: c.slices_done(run_id) >= 3, "a to commit some slices")
        assert c.store.get_run(run_id).lease_owner == "a"
        b = c.worker("b", concurrency=2)
        wait_for(lambda: READY.search(b.log()), "b to be ready")
        a.signal_group(signal.SIGTERM)
        assert a.proc.wait(timeout=30) == 0

        wait_for(
            lambda: any(
                e.event == "lease_acquired" and e.worker_id == "b" for e in c.entries(run_id)
            ),
            "b to resume the run",
        )
        os.kill(running_child(c, run_id), signal.SIGKILL)
        run = c.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
        assert run.status is Status.SUCCEEDED, run.error_summary
        assert run.attempt == 2  # the kill cost an attempt; the graceful stop did not
        b.proc.send_signal(signal.SIGTERM)  # the main process forwards it to its children
        assert b.proc.wait(timeout=30) == 0
    finally:
        c.close()

    for worker in (a, b):
        out = worker.log()
        assert [line for line in out.splitlines() if ALARM.search(line)] == [], worker.name
        for password in passwords:
            assert password not in out
        (ready,) = READY.findall(out)
        assert f"(worker id {worker.name}) ready: queues " in ready
        assert f"store {scrub(database_url)}; broker {scrub(broker_url)}" in ready
    # The deploy: a's idle pool process stopped at INFO, in one line.
    assert lines(a, r"INFO/MainProcess\] Process .* exited with 'signal 15 \(SIGTERM\)'")
    # The kill: one warning for the process, one for the task naming its run, one for the
    # worker's re-queue of the run.
    assert lines(b, r"WARNING/MainProcess\] Process .* exited with 'signal 9 \(SIGKILL\)'")
    (lost,) = lines(b, rf"WARNING/MainProcess\] Task quarry.execute_run\[.*\] of run {run_id} lost")
    assert "signal 9 (SIGKILL)" in lost
    (requeued,) = lines(b, rf"WARNING/MainProcess\] run {run_id} re-queued at once: ")
    assert requeued.endswith("its pool process died (signal 9 (SIGKILL))")
