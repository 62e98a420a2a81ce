"""Webhooks on run end: a real worker, a real local HTTP receiver that fails once, a signature."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.harness import Cluster, wait_for
from worker import webhooks
from worker.models import Status

pytestmark = pytest.mark.acceptance

SECRET = "whsec-canary-5b1e"


class Receiver(http.server.ThreadingHTTPServer):
    """Records every POST; answers 500 to the first, 200 after."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if not self.server.requests else 200
        self.server.requests.append((dict(self.headers), body, status))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        return


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A local endpoint on a free port."""
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_a_finished_run_is_posted_signed_and_retried(tmp_path: Path, receiver: Receiver) -> None:
    """The endpoint fails once; the retry delivers; the body is signed and carries the run."""
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    c = Cluster(tmp_path, webhook_urls=url, webhook_secret=SECRET)
    try:
        c.worker("a")
        run_id = c.trigger("small")
        assert c.wait_status(run_id, Status.SUCCEEDED, Status.FAILED).status is Status.SUCCEEDED
        wait_for(
            lambda: any(status == 200 for *_, status in receiver.requests),
            "a delivered webhook",
            90,
        )
        (delivery,) = c.store.deliveries(run_id)
        assert (delivery.status, delivery.attempts, delivery.last_error) == ("delivered", 2, None)
        headers, body, _ = receiver.requests[-1]
        assert webhooks.verify(SECRET, headers[webhooks.SIGNATURE_HEADER], body)
        assert not webhooks.verify("wrong", headers[webhooks.SIGNATURE_HEADER], body)
        sent = json.loads(body)
        assert sent["type"] == "run.ended"
        assert sent["run"]["id"] == run_id
        assert sent["run"]["status"] == "succeeded"
        assert sent["telemetrySummary"]["progress"] == 100.0
        assert SECRET.encode() not in body
    finally:
        c.close()
