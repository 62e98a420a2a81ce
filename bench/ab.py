"""Two revisions side by side, alternating: ``python -m bench.ab REV_A REV_B slices|pages|log|ingest``.

A change's effect on this machine is often smaller than the drift between two
runs minutes apart, so both revisions are measured in turns within one run:

- ``slices``: per-empty-slice overhead of a real run (``bench.slices``, null
  destination) on SQLite and PostgreSQL, one fresh process per sample;
- ``pages``: a first page of 1000 entries from a 1,000,000-entry SQLite store
  through each revision's API server, against the raw keyset query;
- ``log``: one log call on the worker's hot path (``bench.ingest.log_call_cost``,
  JSON stdout), one fresh process per sample;
- ``ingest``: log ingestion into a fresh SQLite store, entries/s of 4 concurrent
  processes logging 50,000 entries each through structlog and the writer
  (``bench.ingest.ingest_through_quarry``), one fresh store per sample.

Each revision is checked out in a temporary git worktree and imported from
there; the harness is this checkout's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import api, ingest
from bench.__main__ import fresh_pg
from tests.acceptance.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BENCH_AB_ROUNDS", "4"))

_SLICE = """
import sys, tempfile
from pathlib import Path
import worker
assert worker.__file__.startswith({src!r}), worker.__file__
sys.path.append({root!r})
from bench import slices
print(slices.runner_per_slice_ms({url!r}, Path(tempfile.mkdtemp()), "null"))
"""
_LOG = """
import sys
import worker
assert worker.__file__.startswith({src!r}), worker.__file__
sys.path.append({root!r})
from bench import ingest
costs = ingest.log_call_cost(100_000)
print(next(v for k, v in costs.items() if "json stdout" in k))
"""
_INGEST = """
import sys, tempfile
from pathlib import Path
import worker
assert worker.__file__.startswith({src!r}), worker.__file__
sys.path.append({root!r})
from bench import ingest
url = ingest.fresh_sqlite(Path(tempfile.mkdtemp()), "ingest.db")
print(ingest.ingest_through_quarry(url, 4, 50_000))
"""
_SERVE = """
import uvicorn, worker
assert worker.__file__.startswith({src!r}), worker.__file__
from worker.api import create_app
uvicorn.run(create_app(), host="127.0.0.1", port={port}, log_level="warning", access_log=False)
"""


def _checkout(rev: str, into: Path) -> str:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(into), rev], check=True
    )
    return str(into)


def _sample(src: str, code: str) -> float:
    """The number the last line of ``code`` prints, run on ``src``'s code in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": src},
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[-1])


def slices_ab(srcs: dict[str, str]) -> None:
    """Per-slice milliseconds of each revision, alternating, on both databases."""
    urls = {"SQLite": ingest.fresh_sqlite(Path(tempfile.mkdtemp()), "slices.db")}
    pg = fresh_pg("quarry_bench_ab")
    if pg:
        urls["PostgreSQL"] = pg
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS):
        for rev, src in srcs.items():
            for label, url in urls.items():
                code = _SLICE.format(src=src, root=str(ROOT), url=url)
                times.setdefault((label, rev), []).append(_sample(src, code))
    for (label, rev), values in times.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{label:<12} {rev:<14} p50 {statistics.median(values):.2f} ms a slice  ({shown})")


def _in_turns(srcs: dict[str, str], code: str) -> dict[str, list[float]]:
    """``code``'s number for each revision, ``ROUNDS`` times, the revisions in turn."""
    values: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        for rev, src in srcs.items():
            values.setdefault(rev, []).append(_sample(src, code.format(src=src, root=str(ROOT))))
    return values


def log_ab(srcs: dict[str, str]) -> None:
    """µs per log call of each revision, alternating."""
    for rev, values in _in_turns(srcs, _LOG).items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{rev:<14} p50 {statistics.median(values):.2f} µs a log call  ({shown})")


def ingest_ab(srcs: dict[str, str]) -> None:
    """SQLite log ingestion, entries/s, of each revision, alternating."""
    for rev, values in _in_turns(srcs, _INGEST).items():
        shown = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{rev:<14} p50 {statistics.median(values):,.0f} entries/s  ({shown})")


def pages_ab(srcs: dict[str, str]) -> None:
    """First-page milliseconds through each revision's API, alternating with raw SQL."""
    url = ingest.fresh_sqlite(Path(tempfile.mkdtemp()), "pages.db")
    _, env, big, _, secret = api.page_store(url)
    procs, calls = [], {}
    raw = api._raw_query(url, big)
    try:
        for rev, src in srcs.items():
            port = free_port()
            code = _SERVE.format(src=src, port=port)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code], env={**env, "PYTHONPATH": src}, cwd=src
                )
            )
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"}
            )
            wait_for(lambda c=client: _up(c), f"the API of {rev}", 30)
            path = f"/api/v1/action-runs/{big}/logs"
            calls[rev] = lambda c=client, p=path: c.get(p).json()
        calls["raw keyset SQL"] = lambda: raw(0, None)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():  # warm-up
            for _ in range(10):
                call()
        for _ in range(ROUNDS * 10):
            for name, call in calls.items():
                times[name] += api.timed(call, 5, warmup=1)
        base = statistics.median(times["raw keyset SQL"])
        for name, values in times.items():
            p50 = statistics.median(values)
            print(f"{name:<16} {api.summary(values)}  {p50 / base:.2f}x raw")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _up(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    """Check out both revisions, measure in turns, remove the worktrees."""
    parts = {"slices": slices_ab, "pages": pages_ab, "log": log_ab, "ingest": ingest_ab}
    if len(sys.argv) != 4 or sys.argv[3] not in parts:
        print("usage: python -m bench.ab REV_A REV_B slices|pages|log|ingest", file=sys.stderr)
        return 2
    rev_a, rev_b, what = sys.argv[1:]
    tmp = Path(tempfile.mkdtemp(prefix="quarry-ab-"))
    srcs: dict[str, str] = {}
    try:
        for i, rev in enumerate((rev_a, rev_b)):
            srcs[rev] = _checkout(rev, tmp / f"rev{i}")
        began = time.monotonic()
        parts[what](srcs)
        print(f"({ROUNDS} rounds, {time.monotonic() - began:.0f} s)")
    finally:
        for src in srcs.values():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", src], check=False
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
