"""The web console in headless Chromium: ``python -m bench.console [--quick] [--duration S]``.

One embedded (SQLite) store with 10,000 runs (a mix of statuses over 24
pipelines, telemetry summaries, lifecycle entries), one of which holds 200,000
entries, served by ``quarry serve``; one browser context signed in through the
sign-in form. Each figure has the bare API request for the same data, timed in
the same run, as its baseline:

1. **Runs page**: navigation start → the first ``table.runs tbody tr[data-run]``
   in the DOM, on the page's own clock (``performance.now()``, whose origin is the
   navigation's start, read by a ``MutationObserver`` installed before the page's
   own scripts), and → the first paint holding it. Baseline:
   ``GET /api/v1/action-runs?limit=50`` with a bearer token.
2. **Run page of the 200,000-entry run**: navigation start → the first
   ``#log .line`` (the tail) in the DOM and painted. Baseline: the tail request
   ``GET …/logs?before=999999999999999999&limit=500``. Then ``#log`` is scrolled
   to the top page after page, and the most lines it ever held is reported.
3. **Live log lag**: the Run page of a run that a worker-like process logs
   into at 1,000 entries/s for ``--duration`` seconds, through the worker's own
   path (``Runtime.create``: ``StoreSink`` → ``EntryWriter`` → ``Store.append_entries``,
   fenced on the lease it acquires). Each entry carries ``t_log``, the wall-clock
   time of its log call; the page records ``Date.now()`` when each line enters
   ``#log``. Both clocks are this machine's wall clock. Baseline: a plain SSE
   client on the same stream, in the same run. The page's JS heap is sampled
   every ``--heap-every`` seconds (CDP ``Performance.getMetrics``), as used and
   after a forced collection.

The API streams with its polling fallback unless ``--redis URL`` is given (then
the live part runs a second time with Redis wake-ups, on a second API process).
``--trace`` adds five seconds of a Chromium trace of the live page, summed (frames,
forced style-and-layout passes in their callbacks, pre-paint, paint); ``--parts``
picks parts (``runs,run,live``).

Chromium: ``BENCH_CHROMIUM`` or ``--chromium`` (default ``/usr/bin/chromium``
when it exists, else Playwright's own browser).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse
from sqlalchemy import insert

from bench.api import api_env, pct, timed
from bench.ingest import NullStream, fresh_sqlite
from tests.acceptance.harness import serve_api
from worker.models import Level, NewEntry
from worker.store import Store
from worker.store.engine import utcnow
from worker.store.tables import queued_run, runs, telemetry_samples

PIPELINES = 24
#: Of every 1,000 runs: their status.
MIX = {
    "succeeded": 830,
    "failed": 80,
    "cancelled": 30,
    "interrupted": 10,
    "running": 20,
    "queued": 30,
}
TAIL = "999999999999999999"
ENDING = {
    "succeeded": ("run_completed", Level.INFO, "Run completed successfully"),
    "failed": ("run_failed", Level.ERROR, "Run failed: HTTP 503 from the source after 5 retries"),
    "cancelled": ("run_cancelled", Level.WARNING, "Run cancelled by an operator"),
    "interrupted": ("run_interrupted", Level.WARNING, "Worker stopping (SIGTERM); run released"),
}

#: Installed in every document before its own scripts: first row and first log line in the
#: DOM (performance.now(), from the navigation's start), the frame after the one that
#: painted them, and each line added to #log with Date.now() (drained by the benchmark).
PROBE = r"""
(() => {
  const b = window.__bench = {
    row: null, rowPaint: null, line: null, linePaint: null, maxLines: 0, added: [],
  };
  const painted = (key) => requestAnimationFrame(() => requestAnimationFrame(() => {
    b[key] = performance.now();
  }));
  const runs = location.pathname === "/runs";
  new MutationObserver((records) => {
    const now = Date.now();
    if (runs && b.row === null && document.querySelector("table.runs tbody tr[data-run]")) {
      b.row = performance.now(); painted("rowPaint");
    }
    const log = document.getElementById("log");
    if (!log) return;
    for (const r of records) {
      if (r.target !== log) continue;
      for (const n of r.addedNodes) {
        if (n.nodeType === 1 && n.classList.contains("line")) b.added.push(+n.dataset.id, now);
      }
    }
    if (b.line === null && log.querySelector(".line")) {
      b.line = performance.now(); painted("linePaint");
    }
    if (log.childElementCount > b.maxLines) b.maxLines = log.childElementCount;
  }).observe(document, { childList: true, subtree: true });
})();
"""

#: What one navigation measured, once the paint after the awaited element is in.
READ = """(key) => {
  const b = window.__bench;
  const nav = performance.getEntriesByType("navigation")[0];
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  const tail = performance.getEntriesByType("resource").find((e) => e.name.includes("/logs?"));
  return {
    dom: b[key], paint: b[key + "Paint"], fcp: fcp ? fcp.startTime : null,
    html: nav.responseEnd, loaded: nav.loadEventEnd,
    fetchStart: tail ? tail.startTime : null, fetchEnd: tail ? tail.responseEnd : null,
  };
}"""


def _pipelines_file(path: Path) -> Path:
    """A pipelines file naming the store's pipelines (the runs page's filter lists them)."""
    blocks = [
        f'[pipelines.pipeline_{p:02d}]\ndescription = "bench"\n'
        f'[pipelines.pipeline_{p:02d}.source]\ntype = "demo"\n'
        f'[[pipelines.pipeline_{p:02d}.resources]]\nname = "profiles"\n'
        f'[pipelines.pipeline_{p:02d}.destination]\ntype = "files"\n'
        for p in range(PIPELINES)
    ]
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def fill(store: Store, total: int, big_entries: int) -> str:
    """``total`` runs over :data:`PIPELINES` pipelines in the :data:`MIX` of statuses, one a
    minute back from now, with telemetry summaries, lifecycle entries and (running runs)
    telemetry samples; the newest succeeded run gets ``big_entries`` entries. Its id."""
    rng = random.Random(13)  # noqa: S311 - a repeatable mix, no secret
    statuses = [s for s, n in MIX.items() for _ in range(n)]
    rng.shuffle(statuses)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    entries: list[NewEntry] = []
    samples: list[dict[str, Any]] = []
    for i in range(total):
        status = statuses[i % 1000]
        created = now - timedelta(minutes=total - i)
        row = queued_run(f"pipeline_{i % PIPELINES:02d}", {"since": "2024-01-01"}, created)
        row.update(
            status=status,
            started_at=None,
            finished_at=None,
            lease_owner=None,
            lease_expires_at=None,
            heartbeat_at=None,
            error_summary=None,
        )
        rows.append(row)
        if status == "queued":
            continue
        started = created + timedelta(seconds=2)
        seconds = rng.randint(20, 900)
        slices = rng.randint(4, 200)
        done = slices if status == "succeeded" else rng.randint(0, slices - 1)
        rows_loaded = done * rng.randint(500, 20_000)
        row.update(
            started_at=started,
            lease_epoch=1,
            telemetry_summary={
                "rows_loaded": rows_loaded,
                "bytes_loaded": rows_loaded * 180,
                "files_written": done,
                "progress": round(100.0 * done / slices, 2),
                "current_phase": "completed" if status == "succeeded" else "extracting",
                "current_resource": "events",
            },
            checkpoint={"position": {"resource": "events", "slice": done, "slices": slices}},
        )
        worker = f"vm-{i % 5}:{4000 + i % 97}"
        entries.append(
            NewEntry(
                row["id"],
                Level.INFO,
                "lease_acquired",
                f"Worker {worker} took ownership (attempt 1)",
                started,
                {"lease_epoch": 1, "lease_ttl_seconds": 30.0},
                worker,
                1,
            )
        )
        if status == "running":
            row.update(lease_owner=worker, lease_expires_at=time.time() + 3600, heartbeat_at=now)
            samples += [
                {
                    "run_id": row["id"],
                    "at": now - timedelta(seconds=5 * k),
                    "values": {"rows_loaded": rows_loaded - 500 * k, "bytes_loaded": 0},
                }
                for k in range(60)
            ]
            continue
        finished = min(started + timedelta(seconds=seconds), now)
        row["finished_at"] = finished
        if status == "failed":
            row["error_summary"] = "SourceError: HTTP 503 from https://api.example/v1/events"
        event, level, message = ENDING[status]
        entries.append(NewEntry(row["id"], level, event, message, finished, {}, worker, 1))
    big = next(r for r in reversed(rows) if r["status"] == "succeeded")
    with store.engine.begin() as conn:
        for k in range(0, len(rows), 2000):
            conn.execute(insert(runs), rows[k : k + 2000])
        if samples:
            conn.execute(insert(telemetry_samples), samples)
    # Lifecycle entries in time order, then the big run's log (its own ending last).
    entries.sort(key=lambda e: e.occurred_at)
    ending = next(e for e in entries if e.run_id == big["id"] and e.event == "run_completed")
    entries.remove(ending)
    for k in range(0, len(entries), 5000):
        store.append_entries(entries[k : k + 5000])
    levels = [Level.INFO] * 18 + [Level.WARNING, Level.ERROR]
    for k in range(0, big_entries, 5000):
        store.append_entries(
            [
                NewEntry(
                    big["id"],
                    levels[i % 20],
                    "slice_completed",
                    f"Slice {i + 1}/{big_entries}: 8,500 rows",
                    big["started_at"],
                    {"resource": "events", "slice": i + 1, "rows": 8500},
                    "vm-0:4000",
                    1,
                )
                for i in range(k, min(k + 5000, big_entries))
            ]
        )
    store.append_entries([ending])
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return str(big["id"])


# -- the browser ------------------------------------------------------------------------


def _chromium(arg: str | None) -> str | None:
    path = arg or os.environ.get("BENCH_CHROMIUM") or "/usr/bin/chromium"
    return path if Path(path).exists() else None


def sign_in(context: Any, base: str, secret: str) -> None:
    """Through the sign-in form, as a person would; the context keeps the session cookie."""
    page = context.new_page()
    page.goto(f"{base}/signin")
    page.fill("#token", secret)
    with page.expect_navigation():
        page.click("button[type=submit]")
    if not page.url.endswith("/runs"):
        raise RuntimeError(f"sign-in did not reach /runs: {page.url}")
    page.close()


def navigate(page: Any, url: str, key: str) -> dict[str, float]:
    """Open ``url`` (a new document) and read the probe's figures for ``key`` (row, line)."""
    page.goto(url)
    page.wait_for_function(f"() => window.__bench.{key}Paint !== null", timeout=30_000)
    figures: dict[str, float] = page.evaluate(READ, key)
    # The first paint with the element in it: first-contentful-paint when the element was in
    # the DOM before it (the render-blocking stylesheet holds the first paint), else the frame
    # after the one that painted it (an upper bound).
    fcp = figures["fcp"]
    figures["rendered"] = fcp if fcp is not None and fcp >= figures["dom"] else figures["paint"]
    return figures


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values):7.1f} ms  p95 {pct(values, 0.95):7.1f} ms"


def _timed_get(client: httpx.Client, url: str) -> float:
    began = time.perf_counter()
    response = client.get(url)
    response.raise_for_status()
    response.json()
    return (time.perf_counter() - began) * 1000


def runs_page(page: Any, client: httpx.Client, base: str, samples: int) -> None:
    """Navigation → first rendered row of /runs, against the bare API list."""
    first = navigate(page, f"{base}/runs", "row")
    for _ in range(3):  # the server's first requests, the browser's caches
        navigate(page, f"{base}/runs", "row")
        _timed_get(client, "/api/v1/action-runs?limit=50")
    shots, api = [], []
    for _ in range(samples):  # alternately, so both see the same machine
        shots.append(navigate(page, f"{base}/runs", "row"))
        api.append(_timed_get(client, "/api/v1/action-runs?limit=50"))
    dom = [s["dom"] for s in shots]
    rendered = [s["rendered"] for s in shots]
    print(f"\nRuns page (50 rows of 10,000 runs), {samples} navigations:")
    print(f"  navigation → first row in the DOM           {_ms(dom)}")
    print(f"  navigation → first paint holding it         {_ms(rendered)}  (goal <= 1000 ms)")
    print(f"  navigation → HTML received (responseEnd)    {_ms([s['html'] for s in shots])}")
    print(f"  navigation → load event end                 {_ms([s['loaded'] for s in shots])}")
    print(f"  GET /api/v1/action-runs?limit=50 (baseline) {_ms(api)}")
    print(
        f"  ratio, p50: DOM {statistics.median(dom) / statistics.median(api):.1f}x, "
        f"painted {statistics.median(rendered) / statistics.median(api):.1f}x; "
        f"first navigation after signing in: DOM {first['dom']:.1f} ms, painted {first['rendered']:.1f} ms"
    )


def run_page(page: Any, client: httpx.Client, base: str, run_id: str, samples: int) -> None:
    """Navigation → first rendered log line of a 200,000-entry run, against the bare tail;
    then the most lines #log holds while scrolling up."""
    tail = f"/api/v1/action-runs/{run_id}/logs?before={TAIL}&limit=500"
    for _ in range(3):
        navigate(page, f"{base}/runs/{run_id}", "line")
        _timed_get(client, tail)
    shots, api = [], []
    for _ in range(samples):
        shots.append(navigate(page, f"{base}/runs/{run_id}", "line"))
        api.append(_timed_get(client, tail))
    dom = [s["dom"] for s in shots]
    rendered = [s["rendered"] for s in shots]
    fetch = [s["fetchEnd"] - s["fetchStart"] for s in shots]
    print(f"\nRun page of a 200,000-entry run (tail of 500), {samples} navigations:")
    print(f"  navigation → first line in the DOM          {_ms(dom)}")
    print(f"  navigation → first paint holding it         {_ms(rendered)}")
    print(f"  navigation → HTML received (responseEnd)    {_ms([s['html'] for s in shots])}")
    print(f"  navigation → the page's tail request starts {_ms([s['fetchStart'] for s in shots])}")
    print(f"  the page's tail request (resource timing)   {_ms(fetch)}")
    print(f"  GET …/logs?before=…&limit=500 (baseline)    {_ms(api)}")
    print(
        f"  ratio, p50: DOM {statistics.median(dom) / statistics.median(api):.1f}x, "
        f"painted {statistics.median(rendered) / statistics.median(api):.1f}x"
    )
    # Scroll up: each time #log reaches its top the view reads 500 older entries and drops
    # lines at the bottom past 2,000.
    counts = []
    for _ in range(12):
        if page.evaluate("() => window.quarryLog.oldest === null"):
            break  # the run's first entry is shown
        first = page.evaluate("() => document.querySelector('#log .line').dataset.id")
        page.evaluate("() => { document.getElementById('log').scrollTop = 0; }")
        page.wait_for_function(
            "(first) => !window.quarryLog.busy && "
            "document.querySelector('#log .line').dataset.id !== first",
            arg=first,
            timeout=30_000,
        )
        counts.append(page.evaluate("() => document.getElementById('log').childElementCount"))
    most = page.evaluate("() => window.__bench.maxLines")
    print(
        f"  scrolled up {len(counts)} pages of 500: lines in #log after each {counts}; "
        f"most ever held {most} (goal <= 2,000)"
    )


# -- the live log ------------------------------------------------------------------------


def _write_live(
    *, url: str, data_dir: str, redis_url: str, run_id: str, rate: int, seconds: float
) -> None:
    """A worker-like process: acquire the run's lease and log ``rate`` entries a second for
    ``seconds`` through the worker's runtime (structlog → StoreSink → EntryWriter → store)."""
    from worker import runlog  # noqa: PLC0415 - a fresh (spawned) process
    from worker.runtime import Runtime  # noqa: PLC0415
    from worker.settings import Settings  # noqa: PLC0415

    sys.stdout = NullStream()  # the runtime renders every entry to stdout: rendered, not kept
    settings = Settings(
        database_url=url,
        data_dir=Path(data_dir),
        redis_url=redis_url,
        log_format="json",
        max_entries_per_run=10 * rate * int(seconds) + 1000,  # none dropped by the cap
    )
    rt = Runtime.create(settings)
    owner = "bench-writer:1"
    base = runlog.get_logger(run_id=run_id, worker_id=owner)

    def acquired(lease: Any) -> list[NewEntry]:
        with rt.sink.hold() as held:
            base.bind(attempt=lease.attempt, epoch=lease.epoch).info(
                "lease_acquired",
                message=f"Worker {owner} took ownership (attempt {lease.attempt})",
                lease_epoch=lease.epoch,
            )
        return held

    lease = rt.store.acquire(run_id, owner, 3600, acquired)
    if lease is None or not hasattr(lease, "epoch"):
        raise RuntimeError("the writer could not take the run's lease")
    log = base.bind(attempt=lease.attempt, epoch=lease.epoch)
    start = time.time()
    i = 0
    while (elapsed := time.time() - start) < seconds:
        due = int(elapsed * rate) + 1
        while i < due:
            i += 1
            log.info(
                "slice_completed",
                message=f"Slice {i}: 8,500 rows",
                resource="events",
                rows=8500,
                t_log=time.time() * 1000,
            )
        time.sleep(0.001)
    rt.close()


def _sse_baseline(
    base: str, secret: str, run_id: str, seen: dict[int, float], stop: threading.Event
) -> None:
    """A plain SSE client on the same stream: when it received each entry (ms, wall clock)."""
    headers = {"Authorization": f"Bearer {secret}"}
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(5, read=None)) as client,
        connect_sse(client, "GET", f"/api/v1/action-runs/{run_id}/logs/stream") as source,
    ):
        for sse in source.iter_sse():
            if not sse.data:
                continue  # a keep-alive
            seen[json.loads(sse.data)["id"]] = time.time() * 1000
            if stop.is_set():
                return


#: Renderer metrics sampled with the heap (CDP ``Performance.getMetrics``; durations are
#: cumulative seconds of the page's main thread).
METRICS = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration")


def _sample(cdp: Any) -> dict[str, float]:
    """JS heap used (MB), the same after a forced collection, DOM nodes and :data:`METRICS`."""

    def metrics() -> dict[str, float]:
        return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}

    used = metrics()["JSHeapUsedSize"] / 1e6
    cdp.send("HeapProfiler.collectGarbage")
    after = metrics()
    return {
        "used": used,
        "collected": after["JSHeapUsedSize"] / 1e6,
        "nodes": after["Nodes"],
        **{name: after[name] for name in METRICS},
    }


#: Installed in the live page: when the browser's EventSource delivered each entry (its
#: ``lastEventId`` is the entry id), ahead of the page's own handler.
RECEIPTS = r"""
(() => {
  const Native = window.EventSource;
  window.__got = [];
  window.EventSource = function (url, init) {
    const es = new Native(url, init);
    es.addEventListener("message", (m) => { window.__got.push(+m.lastEventId, Date.now()); });
    return es;
  };
  window.EventSource.prototype = Native.prototype;
  Object.assign(window.EventSource, { CONNECTING: 0, OPEN: 1, CLOSED: 2 });
})();
"""


TRACE_CATEGORIES = ["devtools.timeline", "blink", "toplevel"]


def _trace_summary(path: Path) -> str:
    """Frames drawn, the time in their frame callbacks and in the forced style-and-layout
    passes inside them, pre-paint and paint, all on the page's main thread."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if "dur" in e]
    callbacks = [
        e for e in events if e["name"] == "FrameRequestCallbackCollection::ExecuteFrameCallbacks"
    ]
    if not callbacks:
        return "no frames"
    main = callbacks[0]["tid"]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in callbacks]

    def total(name: str) -> tuple[int, float]:
        found = [e for e in events if e["name"] == name and e["tid"] == main]
        return len(found), sum(e["dur"] for e in found) / 1000

    forced = [
        e
        for e in events
        if e["name"] == "Blink.ForcedStyleAndLayout.UpdateTime"
        and e["tid"] == main
        and any(a <= e["ts"] <= b for a, b in spans)
    ]
    busy = total("ThreadControllerImpl::RunTask")[1]
    return (
        f"{len(spans)} frames; main thread busy {busy:,.0f} ms; frame callbacks "
        f"{sum(b - a for a, b in spans) / 1000:,.0f} ms, of which {len(forced)} forced "
        f"style-and-layout passes {sum(e['dur'] for e in forced) / 1000:,.0f} ms; "
        f"pre-paint {total('PrePaint')[1]:,.0f} ms; paint {total('Paint')[1]:,.0f} ms"
    )


def _summary(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values):6.0f} ms  p99 {pct(values, 0.99):6.0f} ms  "
        f"max {max(values):6.0f} ms"
    )


def live(
    context: Any,
    base: str,
    *,
    url: str,
    data_dir: Path,
    redis_url: str,
    secret: str,
    rate: int,
    seconds: float,
    heap_every: float,
    browser: Any = None,
) -> None:
    """The Run page of a run logging ``rate`` entries a second: lag, heap, lines in the DOM.

    With ``browser``, five seconds of a Chromium trace of the page, from a third of the
    way in, summed (:func:`_trace_summary`)."""
    store = Store(url)
    run_id = store.create_run("pipeline_00").id
    store.close()
    page = context.new_page()
    page.add_init_script(RECEIPTS)
    page.goto(f"{base}/runs/{run_id}")
    page.wait_for_function(
        "() => window.quarryLog && window.quarryLog.mode === 'live' && window.quarryLog.es "
        "&& window.quarryLog.es.readyState === 1",
        timeout=30_000,
    )
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    sse_seen: dict[int, float] = {}
    stop = threading.Event()
    listener = threading.Thread(
        target=_sse_baseline, args=(base, secret, run_id, sse_seen, stop), daemon=True
    )
    listener.start()
    time.sleep(1)  # both streams open and joined to the run's feed
    samples = [(0.0, _sample(cdp))]
    appeared: dict[int, float] = {}
    got: dict[int, float] = {}

    def drain() -> None:
        lines, receipts = page.evaluate(
            "() => { const a = [window.__bench.added, window.__got]; "
            "window.__bench.added = []; window.__got = []; return a; }"
        )
        for into, flat in ((appeared, lines), (got, receipts)):
            for k in range(0, len(flat), 2):
                into.setdefault(int(flat[k]), flat[k + 1])

    writer = mp.get_context("spawn").Process(
        target=_write_live,
        kwargs={
            "url": url,
            "data_dir": str(data_dir),
            "redis_url": redis_url,
            "run_id": run_id,
            "rate": rate,
            "seconds": seconds,
        },
    )
    began = time.monotonic()
    writer.start()
    next_sample = heap_every
    trace_at = seconds / 3 if browser is not None else None
    trace = data_dir / "live-trace.json"
    while writer.is_alive():
        page.wait_for_timeout(1000)
        drain()
        elapsed = time.monotonic() - began
        if elapsed >= next_sample:
            samples.append((elapsed, _sample(cdp)))
            next_sample += heap_every
        if trace_at is not None and elapsed >= trace_at:
            trace_at = None
            browser.start_tracing(page=page, path=str(trace), categories=TRACE_CATEGORIES)
            page.wait_for_timeout(5000)
            browser.stop_tracing()
    writer.join()
    page.wait_for_timeout(3000)  # the last flush, poll and frame
    drain()
    stop.set()
    samples.append((time.monotonic() - began, _sample(cdp)))
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    t_log = {
        entry_id: json.loads(data)["t_log"]
        for entry_id, data in conn.execute(
            "SELECT id, data FROM log_entries WHERE run_id = ? AND event = 'slice_completed'",
            (run_id,),
        )
    }
    conn.close()
    lags = [appeared[i] - t for i, t in t_log.items() if i in appeared]
    sse_lags = [sse_seen[i] - t for i, t in t_log.items() if i in sse_seen]
    browser_lags = [got[i] - t for i, t in t_log.items() if i in got]
    rendering = [appeared[i] - got[i] for i in t_log if i in appeared and i in got]
    dump = data_dir / "live-lags.json"
    dump.write_text(
        json.dumps(
            {
                "entries": [
                    [i, t, appeared.get(i), got.get(i), sse_seen.get(i)] for i, t in t_log.items()
                ],
                "samples": samples,
            }
        )
    )
    lines = page.evaluate("() => document.getElementById('log').childElementCount")
    most = page.evaluate("() => window.__bench.maxLines")
    received = page.evaluate("() => window.quarryLog.received")
    page.close()
    wakeups = "Redis wake-ups" if redis_url else "polling fallback (the embedded default)"
    print(f"\nLive log at {rate:,} entries/s for {seconds:.0f} s, API stream with {wakeups}:")
    print(
        f"  {len(t_log):,} entries written; {len(lags):,} appeared in #log; "
        f"{received:,} stream events taken by the page; {len(sse_lags):,} by the plain client"
    )
    if lags:
        print(f"  log call → line in #log                  {_summary(lags)}  (goal p99 <= 1000 ms)")
    if sse_lags:
        print(f"  log call → plain SSE client (baseline)   {_summary(sse_lags)}")
    if browser_lags:
        print(f"  log call → the browser's EventSource     {_summary(browser_lags)}")
    if rendering:
        print(f"  EventSource → line in #log, same entry   {_summary(rendering)}")
    print(f"  lines in #log at the end {lines:,}; most ever held {most:,} (goal <= ~2,000)")
    print(f"  per-entry times: {dump}")
    print(
        "  by time: JS heap MB (used / after a forced collection), DOM nodes; the page's "
        "main thread busy since the previous sample (%: all tasks / script / layout / style)"
    )
    previous: dict[str, float] | None = None
    last_at = 0.0
    for at, m in samples:
        busy = ""
        if previous is not None and at > last_at:
            share = [100 * (m[k] - previous[k]) / (at - last_at) for k in METRICS]
            busy = "  " + " / ".join(f"{x:3.0f}" for x in share)
        print(
            f"    {at:6.0f} s  {m['used']:5.1f} / {m['collected']:5.1f} MB  "
            f"{m['nodes']:7,.0f} nodes{busy}"
        )
        previous, last_at = m, at
    if trace.exists():
        print(f"  five seconds of a Chromium trace ({trace}): {_trace_summary(trace)}")
    collected = [m["collected"] for _, m in samples]
    used = [m["used"] for _, m in samples]
    print(
        f"  heap after collection: start {collected[0]:.1f}, end {collected[-1]:.1f}, "
        f"max {max(collected):.1f} MB; used: start {used[0]:.1f}, end {used[-1]:.1f}, "
        f"max {max(used):.1f} MB"
    )


# -- the whole -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Fill the store, serve it, and measure the three parts."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.console", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="30 s of live log, fewer samples")
    parser.add_argument(
        "--duration", type=float, help="seconds of live log (default 300; --quick 30)"
    )
    parser.add_argument(
        "--heap-every", type=float, help="seconds between heap samples (default 30; --quick 5)"
    )
    parser.add_argument("--rate", type=int, default=1000, help="live entries a second")
    parser.add_argument("--runs", type=int, default=10_000, help="runs in the store")
    parser.add_argument("--entries", type=int, default=200_000, help="entries of the big run")
    parser.add_argument(
        "--redis", default="", help="a Redis URL: the live log again, with Redis wake-ups"
    )
    parser.add_argument("--chromium", help="browser executable")
    parser.add_argument(
        "--trace", action="store_true", help="five seconds of a Chromium trace of the live page"
    )
    parser.add_argument(
        "--parts", default="runs,run,live", help="which parts, comma-separated: runs,run,live"
    )
    args = parser.parse_args(argv)
    seconds = args.duration or (30.0 if args.quick else 300.0)
    heap_every = args.heap_every or (5.0 if args.quick else 30.0)
    samples = 15 if args.quick else 40
    parts = set(args.parts.split(","))
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - a dev dependency
    except ImportError:
        print("bench.console needs Playwright (pip install -e '.[dev]')", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="quarry-bench-console-"))
    url = fresh_sqlite(tmp, "console.db")
    store = Store(url)
    began = time.perf_counter()
    big = fill(store, args.runs, args.entries)
    filled = time.perf_counter() - began
    _, secret = store.create_token("operator")
    in_process = {
        "Store.list_runs(limit=51)": lambda: store.list_runs(limit=51),
        "Store.dashboard()": store.dashboard,
        "Store.attempt_history(big run)": lambda: store.attempt_history(big),
    }
    reads = {name: statistics.median(timed(fn, 20, warmup=1)) for name, fn in in_process.items()}
    store.close()
    pipelines = _pipelines_file(tmp / "pipelines.toml")
    executable = _chromium(args.chromium)
    print(
        f"Quarry console bench — SQLite store of {args.runs:,} runs (one with {args.entries:,} "
        f"entries, filled in {filled:.0f} s); {os.cpu_count()} cores"
    )
    print(
        "  in-process reads behind the pages, p50: "
        + "; ".join(f"{k} {v:.1f} ms" for k, v in reads.items())
    )
    servers = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            print(f"  browser: headless Chromium {browser.version}; {_load()}")
            variants = [("", "")] + ([(args.redis, "redis")] if args.redis else [])
            for redis_url, label in variants:
                data_dir, env = api_env(url, redis_url)
                env["QUARRY_PIPELINES_FILE"] = str(pipelines)
                proc, base = serve_api(env, tmp / f"api{label}.log")
                servers.append(proc)
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                context.add_init_script(PROBE)
                sign_in(context, base, secret)
                if not label:
                    page = context.new_page()
                    with httpx.Client(
                        base_url=base, headers={"Authorization": f"Bearer {secret}"}
                    ) as client:
                        if "runs" in parts:
                            runs_page(page, client, base, samples)
                        if "run" in parts:
                            run_page(page, client, base, big, max(8, samples // 2))
                    page.close()
                if "live" not in parts:
                    continue
                live(
                    context,
                    base,
                    url=url,
                    data_dir=data_dir,
                    redis_url=redis_url,
                    secret=secret,
                    rate=args.rate,
                    seconds=seconds,
                    heap_every=heap_every,
                    browser=browser if args.trace else None,
                )
                context.close()
            browser.close()
        print(f"\ndone; {_load()}")
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=10)
        for path in tmp.glob("console.db*"):  # hundreds of MB; the servers' logs stay
            path.unlink()
    return 0


def _load() -> str:
    """The machine's load: the figures are only as quiet as it was."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
