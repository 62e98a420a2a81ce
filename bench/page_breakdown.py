"""Where the time of one API log page goes, on SQLite: ``python -m bench.page_breakdown``.

Times (p50 of 40, after 5 warm-ups) each part of a page of 1000 entries from a
1,000,000-entry store, against the raw keyset query: the store's reads (as
dicts, and as the JSON bytes the API sends), the orjson encode of the dicts,
the client's decode (stdlib and orjson), the API request with and without
decoding, and the smallest requests (``/healthz``, a 404 through the token
check) that bound the fixed HTTP cost.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import api, ingest
from tests.acceptance.harness import serve_api
from worker.store import Store
from worker.store.reads import entries_json


def median_ms(fn: Callable[[], Any], n: int = 40) -> float:
    """p50 milliseconds of ``fn`` after five warm-up calls."""
    return statistics.median(api.timed(fn, n))


def main() -> None:
    """Print each part's p50."""
    tmp = Path(tempfile.mkdtemp(prefix="quarry-page-breakdown-"))
    url = ingest.fresh_sqlite(tmp, "pages.db")
    _, env, big, _, secret = api.page_store(url)
    store = Store(url)
    page = store.entry_dicts(big, limit=1001)
    body = entries_json({"entries": page})
    raw = api._raw_query(url, big)
    proc, base = serve_api(env, tmp / "api.log")
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"})
    path = f"/api/v1/action-runs/{big}/logs"
    parts = {
        "raw keyset SQL (the baseline)": lambda: raw(0, None),
        "Store.entry_dicts, in process": lambda: store.entry_dicts(big, limit=1001),
        f"orjson encode of those dicts ({len(body):,} bytes)": lambda: entries_json(
            {"entries": page}
        ),
        "Store.run_entry_page_json (the API's read)": lambda: store.run_entry_page_json(big),
        "client decode, stdlib json": lambda: json.loads(body),
        "client decode, orjson": lambda: orjson.loads(body),
        "GET /healthz (the HTTP round trip)": lambda: client.get("/healthz").content,
        "GET a missing run's logs (token check, 404)": lambda: (
            client.get("/api/v1/action-runs/nope/logs").content
        ),
        "GET the page, body as bytes": lambda: client.get(path).content,
        "GET the page, .json() (what bench/api.py times)": lambda: client.get(path).json(),
    }
    try:
        for name, fn in parts.items():
            print(f"{name:<52} {median_ms(fn):6.2f} ms")
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        store.close()


if __name__ == "__main__":
    main()
