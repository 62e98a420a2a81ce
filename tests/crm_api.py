"""A real local HTTP server that behaves like a CRM's API: it paginates, rate-limits and fails.

Three resources over one deterministic dataset of contacts, each with another
pagination style: ``/v1/contacts`` (opaque cursor in ``meta.next_cursor``),
``/v1/events`` (a ``links.next`` URL), ``/v1/lists`` (``?page=N`` with
``total_pages``). ``updated_since`` / ``updated_before`` (ISO 8601) filter by
``updated_at``. Every request needs ``Authorization: Bearer <token>``.

Faults are set on the server object: every ``rate_limit_every``-th request is
a 429 with ``Retry-After``, every ``error_every``-th a 503, every
``hang_every``-th sleeps past the client's timeout; ``always_fail`` answers
500 to everything. ``delay`` slows every page (so a run can be interrupted
mid-way). Run as ``python -m tests.crm_api PORT TOKEN`` for a standalone server.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BASE = datetime(2026, 1, 1, tzinfo=UTC)


def contact(n: int, step_seconds: int = 60) -> dict[str, Any]:
    """Contact ``n`` (1-based): the same record every time."""
    return {
        "id": n,
        "email": f"user{n}@example.com",
        "name": f"User {n}",
        "score": (n * 37) % 101,
        "updated_at": (BASE + timedelta(seconds=n * step_seconds))
        .isoformat()
        .replace("+00:00", "Z"),
    }


class CrmServer(ThreadingHTTPServer):
    """The server; its attributes are the dataset and the faults."""

    daemon_threads = True

    def __init__(
        self,
        port: int = 0,
        token: str = "crm-token",  # noqa: S107 - a test server's token
        total: int = 1000,
    ) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.token = token
        self.total = total
        self.step_seconds = 60
        self.page_size = 50
        self.delay = 0.0
        self.rate_limit_every = 0
        self.retry_after = "1"
        self.error_every = 0
        self.hang_every = 0
        self.hang_seconds = 5.0
        self.always_fail = False
        #: Answer 503 to this many requests first (a flaky API that comes back), only to
        #: requests for ``fail_path`` when it is set.
        self.fail_first = 0
        self.fail_path: str | None = None
        #: When given, every request waits until this event is set (a hung server).
        self.hang_until: threading.Event | None = None
        self.requests = 0
        self.faults = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> CrmServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.shutdown()
        self.server_close()

    def records(self, since: str | None, before: str | None) -> list[dict[str, Any]]:
        """Every contact with ``since <= updated_at < before``."""
        out = []
        lo = _parse(since) if since else None
        hi = _parse(before) if before else None
        for n in range(1, self.total + 1):
            at = BASE + timedelta(seconds=n * self.step_seconds)
            if (lo is None or at >= lo) and (hi is None or at < hi):
                out.append(contact(n, self.step_seconds))
        return out

    def count(self) -> int:
        """This request's number, 1-based."""
        with self._lock:
            self.requests += 1
            return self.requests


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class _Handler(BaseHTTPRequestHandler):
    server: CrmServer

    def log_message(self, *_args: Any) -> None:
        """Quiet."""

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: PLR0912 - one branch per fault, read top to bottom
        """Serve one page, or a fault."""
        srv = self.server
        n = srv.count()
        if self.headers.get("Authorization") != f"Bearer {srv.token}":
            self._send(401, {"error": "unauthorized"})
            return
        if srv.always_fail:
            self._send(500, {"error": "internal error"})
            return
        path = urllib.parse.urlsplit(self.path).path
        if srv.fail_first > 0 and srv.fail_path in {None, path}:
            srv.fail_first -= 1
            srv.faults += 1
            self._send(503, {"error": "unavailable"})
            return
        if srv.hang_until is not None:
            srv.hang_until.wait()
        if srv.rate_limit_every and n % srv.rate_limit_every == 0:
            srv.faults += 1
            self._send(429, {"error": "slow down"}, {"Retry-After": srv.retry_after})
            return
        if srv.error_every and n % srv.error_every == 0:
            srv.faults += 1
            self._send(503, {"error": "unavailable"})
            return
        if srv.hang_every and n % srv.hang_every == 0:
            srv.faults += 1
            time.sleep(srv.hang_seconds)
        if srv.delay:
            time.sleep(srv.delay)
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        rows = srv.records(query.get("updated_since"), query.get("updated_before"))
        size = int(query.get("limit", srv.page_size))
        if parsed.path == "/v1/contacts":
            offset = (
                int(base64.urlsafe_b64decode(query["cursor"]).decode()) if "cursor" in query else 0
            )
            page = rows[offset : offset + size]
            more = offset + size < len(rows)
            cursor = (
                base64.urlsafe_b64encode(str(offset + size).encode()).decode() if more else None
            )
            self._send(200, {"data": page, "meta": {"next_cursor": cursor}})
        elif parsed.path == "/v1/events":
            offset = int(query.get("page_token", 0))
            page = rows[offset : offset + size]
            nxt = None
            if offset + size < len(rows):
                nxt = f"{srv.url}/v1/events?" + urllib.parse.urlencode(
                    {**query, "page_token": offset + size}
                )
            self._send(200, {"data": page, "links": {"next": nxt}})
        elif parsed.path == "/v1/lists":
            page_no = int(query.get("page", 1))
            pages = max(1, -(-len(rows) // size))
            page = rows[(page_no - 1) * size : page_no * size]
            self._send(200, {"results": page, "total_pages": pages})
        else:
            self._send(404, {"error": "not found"})


if __name__ == "__main__":  # pragma: no cover - a standalone server for poking by hand
    server = CrmServer(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "crm-token")
    sys.stdout.write(f"serving on {server.url}\n")
    server.serve_forever()
