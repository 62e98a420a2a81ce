"""Secret canaries planted in settings, a DSN, headers and an exception never leave the process."""

from __future__ import annotations

import json
import sys
import threading
import urllib.parse
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.acceptance.harness import Cluster, serve_api, wait_for
from tests.acceptance.test_webhooks import Receiver
from worker.models import Status

pytestmark = pytest.mark.acceptance

QUARRY = Path(sys.executable).parent / "quarry"
DB_PASSWORD = "dbpw-canary-7Q2"  # PostgreSQL here trusts local connections: any password works
WEBHOOK_SECRET = "whsec-canary-9Z4"


def test_canaries_are_found_nowhere(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    """A run fails with every canary in its error; store, stdout, API, stream, webhook stay clean."""
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    dsn = make_url(pg_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    c = Cluster(
        tmp_path,
        database_url=dsn,
        broker_url=redis_url,
        webhook_urls=f"http://127.0.0.1:{receiver.server_address[1]}/hook",
        webhook_secret=WEBHOOK_SECRET,
    )
    token, secret = c.store.create_token("operator")
    quoted = urllib.parse.quote(WEBHOOK_SECRET + "/+", safe="")
    message = (
        f"connect {dsn} failed; Authorization: Bearer {secret}; "
        f'header={{"X-Key": "{WEBHOOK_SECRET}"}}; url=https://api.example.com/?k={quoted}; '
        f"aws AKIAIOSFODNN7EXAMPLE; password={DB_PASSWORD}"
    )
    with c.pipelines_file.open("a") as fh:
        fh.write(
            "\n[pipelines.leaky]\n"
            f'source = {{ type = "demo", profiles = 50, page_size = 10, fail_at = "profiles:0:3", fail_message = {json.dumps(message)} }}\n'
            'resources = [{ name = "profiles" }]\n'
        )
    api, base = serve_api(c.env, tmp_path / "api.log")
    try:
        c.worker("a")
        c.beat()
        run_id = c.trigger("leaky")
        run = c.wait_status(run_id, Status.FAILED, Status.SUCCEEDED)
        assert run.status is Status.FAILED
        wait_for(lambda: receiver.requests, "the webhook", 60)
        headers = {"Authorization": f"Bearer {secret}"}
        seen = [
            httpx.get(f"{base}/api/v1/action-runs/{run_id}", headers=headers).text,
            httpx.get(f"{base}/api/v1/action-runs/{run_id}/logs", headers=headers).text,
            httpx.get(f"{base}/api/v1/logs", headers=headers).text,
            httpx.get(
                f"{base}/api/v1/action-runs/{run_id}/logs/stream", headers=headers, timeout=30
            ).text,
            httpx.get(f"{base}/api/v1/action-runs/run_x?{DB_PASSWORD}=1", headers=headers).text,
        ]
        stored = [e.message + json.dumps(e.data) for e in c.entries(run_id)] + [
            run.error_summary or ""
        ]
        stdout = [p.read_text(errors="replace") for p in tmp_path.glob("*.log")]
        hooks = [body.decode() for _, body, _ in receiver.requests]
        everything = "\n".join(seen + stored + stdout + hooks)
        assert "connect postgresql+psycopg://postgres:" in "\n".join(
            stored
        )  # the message is there...
        for canary in (DB_PASSWORD, secret, WEBHOOK_SECRET, quoted, "AKIAIOSFODNN7EXAMPLE"):
            assert canary not in everything, canary  # ...its secrets are not
        assert hooks, "the webhook was sent"
        assert token.scope == "operator"
    finally:
        api.terminate()
        api.wait(timeout=10)
        receiver.shutdown()
        c.close()
