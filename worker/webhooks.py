"""Webhooks: when a run ends, each configured endpoint gets a signed JSON POST, retried.

Signature: ``X-Quarry-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``
with ``QUARRY_WEBHOOK_SECRET``, so a receiver can check origin and freshness.
Deliveries are rows in the store; a Celery task sends each one and retries with
exponential backoff, recording every attempt and the outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import httpx

from worker import jsonfmt
from worker.scrub import scrubber
from worker.settings import Settings
from worker.store import Store
from worker.store.webhooks import DeliveryStatus

#: Attempts per delivery before it is recorded ``failed``.
MAX_ATTEMPTS = 8
#: Longest wait between attempts, seconds.
MAX_BACKOFF = 300
SIGNATURE_HEADER = "X-Quarry-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is fresh (for receivers and tests)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def payload(store: Store, run_id: str) -> bytes:
    """The POST body: the run (scrubbed) and its telemetry summary."""
    run = store.get_run(run_id)
    body: dict[str, Any] = {
        "type": "run.ended",
        "run": scrubber.data(run.as_dict()),
        "telemetrySummary": scrubber.data(run.telemetry_summary),
    }
    return jsonfmt.safe_bytes(body)


def deliver(store: Store, settings: Settings, delivery_id: int) -> bool:
    """POST one delivery once; True when the endpoint answered 2xx."""
    delivery = store.get_delivery(delivery_id)
    body = payload(store, delivery.run_id)
    headers = {"Content-Type": "application/json"}
    secret = settings.webhook_secret.get_secret_value()
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, int(time.time()), body)
    try:
        response = httpx.post(delivery.url, content=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {scrubber.text(str(exc))}"[:500]
    else:
        if 200 <= response.status_code < 300:
            store.record_attempt(delivery_id, status=DeliveryStatus.DELIVERED, error=None)
            return True
        error = f"HTTP {response.status_code}"
    final = delivery.attempts + 1 >= MAX_ATTEMPTS
    status = DeliveryStatus.FAILED if final else DeliveryStatus.PENDING
    store.record_attempt(delivery_id, status=status, error=error)
    return False


def on_run_ended(
    store: Store, settings: Settings, publish: Callable[[int], None]
) -> Callable[[str], None]:
    """The store hook that queues one delivery per configured endpoint for an ended run."""

    def ended(run_id: str) -> None:
        urls = settings.webhook_endpoints
        if not urls:
            return
        for delivery_id in store.create_deliveries(run_id, urls):
            publish(delivery_id)

    return ended
