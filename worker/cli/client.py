"""The CLI's view of a run through the HTTP API: pages of entries, or the live stream."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
from httpx_sse import connect_sse

from worker import jsonfmt
from worker.errors import QuarryError, RunNotFound
from worker.models import Entry, Level, Status


class ApiError(QuarryError):
    """The API refused a request; the message is its JSON error."""


def _entry(raw: dict[str, Any]) -> Entry:
    return Entry(
        id=int(raw["id"]),
        run_id=raw["run_id"],
        level=Level(raw["level"]),
        event=raw["event"],
        message=raw["message"],
        data=raw.get("data") or {},
        worker_id=raw.get("worker_id"),
        attempt=raw.get("attempt"),
        occurred_at=datetime.fromisoformat(raw["occurred_at"].replace("Z", "+00:00")),
    )


class ApiClient:
    """A thin client of Quarry's API for the CLI."""

    def __init__(self, base_url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=30)

    def _check(self, response: httpx.Response, run_id: str) -> None:
        if response.status_code == 404:
            raise RunNotFound(run_id)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise ApiError(f"the API answered {response.status_code}: {message}")

    def run_status(self, run_id: str) -> Status:
        """A run's status."""
        response = self.http.get(f"/api/v1/action-runs/{run_id}")
        self._check(response, run_id)
        return Status(response.json()["status"])

    def entries(self, run_id: str, *, level: Level | None, event: str | None) -> Iterator[Entry]:
        """Every stored entry of a run, page by page."""
        cursor: str | None = None
        while True:
            params: dict[str, str] = {}
            if cursor:
                params["cursor"] = cursor
            if level:
                params["level"] = level.value
            if event:
                params["event"] = event
            response = self.http.get(f"/api/v1/action-runs/{run_id}/logs", params=params)
            self._check(response, run_id)
            body = response.json()
            yield from (_entry(raw) for raw in body["entries"])
            cursor = body.get("cursor")
            if not cursor:
                return

    def stream(self, run_id: str) -> Iterator[Entry]:
        """The run's entries as they land, until its terminal event (reconnecting if cut)."""
        last = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = str(last)
            with connect_sse(
                self.http, "GET", f"/api/v1/action-runs/{run_id}/logs/stream", headers=headers,
                timeout=httpx.Timeout(30, read=60),
            ) as source:  # fmt: skip
                self._check(source.response, run_id)
                for sse in source.iter_sse():
                    entry = _entry(jsonfmt.loads(sse.data))
                    last = entry.id
                    yield entry
            # The server closes after the run's end; a cut connection resumes after `last`.
            if self.run_status(run_id).terminal:
                return

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()
