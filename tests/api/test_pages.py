"""Log pages over the real server: the exact bytes of Entry.as_dict, the order of refusals."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures
from worker import jsonfmt
from worker.models import Level, NewEntry


def _fill(api: Api) -> tuple[str, str]:  # noqa: F811
    run = api.store.create_run("alpha")
    other = api.store.create_run("beta", gateway="edge")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    levels = [Level.DEBUG, Level.INFO, Level.WARNING, Level.ERROR]
    api.store.append_entries(
        [
            NewEntry(
                run.id if i % 3 else other.id,
                levels[i % 4],
                f"ev{i % 2}",
                f'm{i} ü \u2028 "q" \\ \n\x1b[0m',
                t0 + timedelta(seconds=i, microseconds=0 if i % 2 else i * 7),
                {"i": i, "f": i / 3, "nested": [None, {"k": "ü"}]} if i % 5 else {},
                f"w{i % 2}" if i % 7 else None,
                i % 3 or None,
            )
            for i in range(60)
        ]
    )
    return run.id, other.id


def test_pages_are_byte_for_byte_as_dict_through_jsonfmt(api: Api) -> None:  # noqa: F811
    """Run pages and the flat view: the body is jsonfmt.dumps of Entry.as_dict(), cursor and all."""
    run_id, other_id = _fill(api)
    read = api.token("read")
    for params in ({}, {"limit": 7}, {"level": "warning"}, {"event": "ev1", "limit": 3}):
        limit = int(params.get("limit", 1000))
        wanted = api.store.entries(
            run_id,
            limit=limit + 1,
            min_level=Level.parse(str(params["level"])) if "level" in params else None,
            event=str(params["event"]) if "event" in params else None,
        )
        page, more = wanted[:limit], len(wanted) > limit
        body = {
            "entries": [e.as_dict() for e in page],
            "cursor": str(page[-1].id) if more else None,
        }
        response = api.client.get(f"/api/v1/action-runs/{run_id}/logs", params=params, headers=read)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.content == jsonfmt.dumps(body).encode()
    flat = api.client.get("/api/v1/logs", params={"count": 5, "pipeline": "beta"}, headers=read)
    wanted = api.store.entries(limit=6, pipeline="beta")
    body = {"entries": [e.as_dict() for e in wanted[:5]], "cursor": str(wanted[4].id)}
    assert flat.content == jsonfmt.dumps(body).encode()
    assert all(e["run_id"] == other_id for e in flat.json()["entries"])


def test_refusals_keep_their_order(api: Api) -> None:  # noqa: F811
    """401 before a bad parameter's 400, which comes before a 404; another gateway's run is a 404."""
    run_id, other_id = _fill(api)
    read, edge = api.token("read"), api.token("gateway:edge")
    bad_token = {"Authorization": "Bearer qry_nope"}

    def status(path: str, headers: dict[str, str], **params: object) -> int:
        return api.client.get(path, params=params, headers=headers).status_code

    logs = f"/api/v1/action-runs/{run_id}/logs"
    assert status(logs, bad_token, limit=0) == 401
    assert status(logs, read, limit=0) == 400
    assert status(logs, read, cursor="abc") == 400
    assert status(logs, read, level="loud") == 400
    assert status(logs, read, **{"from": "yesterday"}) == 400
    # Parameters are checked before the run is looked up: the same 400 whether it exists.
    assert status("/api/v1/action-runs/run_missing/logs", read, cursor="abc") == 400
    assert status("/api/v1/action-runs/run_missing/logs", read) == 404
    assert status(logs, edge) == 404
    assert status(logs, edge, cursor="abc") == 400
    page = api.client.get(f"/api/v1/action-runs/{other_id}/logs", headers=edge).json()
    assert {e["run_id"] for e in page["entries"]} == {other_id}


def test_request_guard_without_http_middleware(api: Api) -> None:  # noqa: F811
    """NUL in a path or query, oversized bodies with or without a length; small chunked bodies pass."""
    read, operator = api.token("read"), api.token("operator")
    for path in ("/api/v1/action-runs/run_%00x", "/api/v1/action-runs?pipeline=a%00b"):
        response = api.client.get(path, headers=read)
        assert response.status_code == 400
        assert "NUL" in response.json()["error"]["message"]

    def chunks(size: int) -> Iterator[bytes]:
        yield b'{"pipeline": "nope", "params": {"x": "'
        for _ in range(size // 65536):
            yield b"a" * 65536
        yield b'"}}'

    headers = {**operator, "Content-Type": "application/json"}
    huge = api.client.post("/api/v1/action-runs", content=chunks(2 * 1024 * 1024), headers=headers)
    assert huge.status_code == 413
    small = api.client.post("/api/v1/action-runs", content=chunks(65536), headers=headers)
    assert small.status_code == 404  # the body reached the route: an unknown pipeline
    assert "unknown pipeline 'nope'" in small.json()["error"]["message"]
