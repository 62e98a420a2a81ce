"""The live stream with a standard SSE client (httpx-sse), against a real worker's run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests.acceptance.harness import Cluster, serve_api
from worker import jsonfmt
from worker.models import Level, NewEntry, Status

QUARRY = Path(sys.executable).parent / "quarry"


@pytest.fixture(params=["redis", "polling"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, pg_url: str, redis_url: str
) -> Iterator[tuple[Cluster, str]]:
    """A Redis + PostgreSQL cluster with one worker and ``quarry serve``; wake-ups by Redis or polling."""
    cluster = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    env = dict(cluster.env)
    if request.param == "polling":
        env["QUARRY_BROKER_URL"] = ""  # the API then has no Redis to subscribe to
        env["QUARRY_REDIS_URL"] = ""
    api, base = serve_api(env, tmp_path / "api.log")
    yield cluster, base
    api.terminate()
    api.wait(timeout=10)
    cluster.close()


def read_events(
    client: httpx.Client, url: str, headers: dict[str, str], stop_after: int | None = None
) -> list[tuple[int, dict[str, object]]]:
    """(id, data) of each event until the server closes the stream, or ``stop_after`` events."""
    got: list[tuple[int, dict[str, object]]] = []
    with connect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            got.append((int(sse.id), jsonfmt.loads(sse.data)))
            if stop_after is not None and len(got) >= stop_after:
                break
    return got


def test_stream_resumes_with_last_event_id_without_gap_or_repeat(
    served: tuple[Cluster, str],
) -> None:
    """Half the events, a reconnect with Last-Event-ID, the rest: every entry once, then the stream closes."""
    cluster, base = served
    _, secret = cluster.store.create_token("read")
    headers = {"Authorization": f"Bearer {secret}"}
    cluster.worker("a")
    run_id = cluster.trigger("slow", page_latency_ms=20)
    url = f"{base}/api/v1/action-runs/{run_id}/logs/stream"
    with httpx.Client(timeout=60) as client:
        first = read_events(client, url, headers, stop_after=20)
        last_id = first[-1][0]
        rest = read_events(client, url, {**headers, "Last-Event-ID": str(last_id)})
    events = first + rest
    ids = [i for i, _ in events]
    assert ids == sorted(set(ids))  # increasing: no repeat
    stored = cluster.entries(run_id)
    assert ids == [e.id for e in stored]  # nothing missing
    assert events[-1][1]["event"] == "run_completed"
    assert events[0][1]["event"] == "lease_acquired"
    assert {"event", "data", "message", "level"} <= set(events[0][1])
    assert cluster.store.get_run(run_id).status is Status.SUCCEEDED


def test_clients_that_go_away_end_their_streams(served: tuple[Cluster, str]) -> None:
    """Clients that close their streams mid-run leave no stream behind on the server: the
    stream gauge goes back to the clients still open, and they still get new entries."""
    cluster, base = served
    _, secret = cluster.store.create_token("read")
    headers = {"Authorization": f"Bearer {secret}"}
    run = cluster.store.create_run("demo")
    cluster.store.append_entries([_entry(run.id, "first")])
    url = f"{base}/api/v1/action-runs/{run.id}/logs/stream"

    def streams_open(client: httpx.Client) -> float:
        text = client.get(f"{base}/metrics").text
        (line,) = [x for x in text.splitlines() if x.startswith("quarry_stream_clients ")]
        return float(line.split()[1])

    with httpx.Client(timeout=30) as client:
        leaving = [connect_sse(client, "GET", url, headers=headers) for _ in range(5)]
        reading = [source.__enter__().iter_sse() for source in leaving]  # held: open
        for events in reading:
            assert next(events).id
        with connect_sse(client, "GET", url, headers=headers) as staying:
            events = staying.iter_sse()
            assert next(events).id
            assert streams_open(client) == 6
            for source in leaving:
                source.__exit__(None, None, None)
            deadline = time.monotonic() + 30
            while streams_open(client) != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert streams_open(client) == 1, "closed clients' streams are still open"
            cluster.store.append_entries([_entry(run.id, "second")])
            assert jsonfmt.loads(next(events).data)["event"] == "second"


def _entry(run_id: str, event: str) -> NewEntry:
    return NewEntry(run_id, Level.INFO, event, event, datetime.now(UTC))


def test_stream_refuses_a_revoked_token_and_carries_hostile_text_as_one_event(
    served: tuple[Cluster, str],
) -> None:
    """A revoked token ends the stream; CR/LF and fake SSE fields inside a message stay one event."""
    cluster, base = served
    token, secret = cluster.store.create_token("read")
    headers = {"Authorization": f"Bearer {secret}"}
    run = cluster.store.create_run("slow")
    hostile = "line\r\nid: 999\n\nevent: x\ndata: forged\u2028\x1b[31m"
    cluster.store.append_entries([NewEntry(run.id, Level.INFO, "note", hostile, datetime.now(UTC))])
    url = f"{base}/api/v1/action-runs/{run.id}/logs/stream"
    with httpx.Client(timeout=30) as client:
        (only,) = read_events(client, url, headers, stop_after=1)
        assert only[1]["message"] == hostile
        assert cluster.store.revoke_token(token.id)
        # The run is still queued, so only the revocation can end this stream.
        with connect_sse(client, "GET", url, headers=headers) as source:
            assert source.response.status_code == 401
    with httpx.Client(timeout=30) as client:
        _, fresh = cluster.store.create_token("read")
        fresh_headers = {"Authorization": f"Bearer {fresh}"}
        with connect_sse(client, "GET", url, headers=fresh_headers) as source:
            stream = source.iter_sse()
            assert int(next(stream).id) > 0
            revoked = cluster.store.list_tokens()[0]
            assert cluster.store.revoke_token(revoked.id)
            assert list(stream) == []  # the server ended the stream


def test_cli_follows_through_the_api_with_the_same_output(served: tuple[Cluster, str]) -> None:
    """``quarry logs RUN --follow --api URL`` prints what ``quarry logs RUN`` prints from the store."""
    cluster, base = served
    _, secret = cluster.store.create_token("read")
    cluster.worker("a")
    run_id = cluster.trigger("slow", page_latency_ms=10)
    env = {**cluster.env, "QUARRY_API_TOKEN": secret}
    followed = subprocess.run(
        [str(QUARRY), "logs", run_id, "--follow", "--json", "--api", base],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert followed.returncode == 0, followed.stderr
    direct = subprocess.run(
        [str(QUARRY), "logs", run_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert followed.stdout == direct.stdout
    assert jsonfmt.loads(followed.stdout.splitlines()[-1])["event"] == "run_completed"
    paged = subprocess.run(
        [str(QUARRY), "logs", run_id, "--level", "warning", "--api", base],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert paged.returncode == 0
    assert paged.stdout == ""  # a clean run has no warnings
    missing = subprocess.run(
        [str(QUARRY), "logs", "run_nope", "--api", base],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert "no such run: run_nope" in missing.stderr


def test_streams_over_several_api_processes_deliver_every_entry_once(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    """Two ``quarry serve`` processes over one store and one Redis, during a run: every client
    of each gets every entry once, in order; a client that drops its connection to one
    process resumes on the other by Last-Event-ID; the flat view pages on across them too."""
    cluster = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    apis = [serve_api(dict(cluster.env), tmp_path / f"api-{n}.log") for n in range(2)]
    try:
        _, secret = cluster.store.create_token("read")
        headers = {"Authorization": f"Bearer {secret}"}
        cluster.worker("a")
        run_id = cluster.trigger("slow", page_latency_ms=20)
        path = f"/api/v1/action-runs/{run_id}/logs/stream"
        results: dict[str, list[int]] = {}

        def whole(name: str, base: str) -> None:
            with httpx.Client(timeout=120) as client:
                results[name] = [i for i, _ in read_events(client, base + path, headers)]

        def hopping(name: str) -> None:
            ids: list[int] = []
            with httpx.Client(timeout=120) as client:
                for hop in range(6):  # a few events on one process, then on the other
                    base = apis[hop % 2][1]
                    resume = {"Last-Event-ID": str(ids[-1])} if ids else {}
                    last = hop == 5
                    got = read_events(
                        client, base + path, {**headers, **resume}, None if last else 15
                    )
                    ids += [i for i, _ in got]
            results[name] = ids

        threads = [
            threading.Thread(target=whole, args=(f"{n}-{k}", base))
            for n, (_, base) in enumerate(apis)
            for k in range(3)
        ]
        threads += [threading.Thread(target=hopping, args=(f"hop-{k}",)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        stored = [e.id for e in cluster.entries(run_id)]
        assert cluster.store.get_run(run_id).status is Status.SUCCEEDED
        assert len(results) == len(threads)
        for name, ids in results.items():
            assert ids == stored, name
        flat: list[int] = []
        cursor = ""
        with httpx.Client(timeout=60) as client:
            for hop in range(1000):
                params = {"runId": run_id, "count": "40", **({"cursor": cursor} if cursor else {})}
                page = client.get(f"{apis[hop % 2][1]}/api/v1/logs", params=params, headers=headers)
                body = page.json()
                flat += [e["id"] for e in body["entries"]]
                if not body.get("cursor"):
                    break
                cursor = body["cursor"]
        assert flat == stored
    finally:
        for proc, _ in apis:
            proc.terminate()
            proc.wait(timeout=10)
        cluster.close()
