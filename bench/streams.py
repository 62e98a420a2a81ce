"""Many stream clients over several API processes, during a run logging fast.

``python -m bench.streams [--apis 4] [--clients 2000] [--rate 1000] [--seconds 20]
[--client raw|sse]`` (in ``make bench BENCH_ARGS=scale``): ``--apis`` ``quarry
serve`` processes over one PostgreSQL store and one Redis; ``--clients`` SSE
clients spread over them, in ``--client-processes`` processes of their own
(asyncio); one worker-like process logging ``--rate`` entries a second for
``--seconds`` through structlog and the worker's writer, with Redis wake-ups.
The goal is that no client is ever more than a second behind (from the log call
to its receipt). Two baselines run in the same run: one client on one API process,
and the same clients on ``--apis`` bare asyncio servers (``raw``) that send each
client the bytes a Quarry stream sends for the same entries, every 0.2 s (the
worker's flush interval), with no store, Redis, ASGI or HTTP framework: what
this machine's cores and loopback give for that many bytes to that many clients.

Clients: ``raw`` (the default) reads the stream's bytes on a bare connection,
counts each read's frames, checks their ids rise and takes the lag of the read's
oldest entry, so a client costs little per event and the measure is the
servers'; ``sse`` parses every event with httpx-sse and notes the lag of every
50th, as an application would.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from bench.api import pct, stream_setup
from bench.ingest import NullStream
from tests.acceptance.harness import free_port, serve_api, wait_for
from worker import jsonfmt, runlog
from worker.api.stream import frame
from worker.models import Entry, Level
from worker.notify import Publisher
from worker.runlog import EntryWriter, StoreSink
from worker.store import Store

#: Seconds after the run's last entry a client behind stops reading (it counts as behind).
GIVE_UP = 30


def _produce(url: str, redis_url: str, run_id: str, rate: int, seconds: float) -> None:
    """A worker-like process: ``rate`` entries a second through structlog and the writer."""
    store = Store(url)
    store.on_entries = Publisher(redis_url)
    writer = EntryWriter(store.entry_flusher(), flush_ms=200, batch_size=2000)
    runlog.configure(StoreSink(writer), log_format="json", stream=NullStream())
    log = runlog.get_logger(run_id=run_id, worker_id="bench").bind(attempt=1)
    writer.start()
    began = time.monotonic()
    total = int(rate * seconds)
    for i in range(total):
        due = began + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        log.info("slice_completed", message=f"Slice {i}", sent_at=time.time())
    log.info("run_completed", message="done", sent_at=time.time())
    writer.close()
    store.close()


def _raw_fanout(port: int, run_id: str, rate: int, seconds: float, go: Any) -> None:
    """One raw server process (the baseline): accept clients on ``port``; once ``go`` is
    set, every 0.2 s send each of them, as one HTTP chunk, the frames of the entries
    due by then (``frame`` of the entries Quarry would store), then ``run_completed``
    and the end of the stream."""

    async def main() -> None:
        clients: list[asyncio.StreamWriter] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the probe that it listens
                writer.close()
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            clients.append(writer)

        server = await asyncio.start_server(accept, "127.0.0.1", port, backlog=4096)
        await asyncio.to_thread(go.wait)
        began = time.time()
        total, sent = int(rate * seconds), 0

        def entry(i: int) -> bytes:
            at = began + i / rate
            last = i == total
            return frame(
                Entry(
                    id=i + 1,
                    run_id=run_id,
                    level=Level.INFO,
                    event="run_completed" if last else "slice_completed",
                    message="done" if last else f"Slice {i}",
                    data={"sent_at": at},
                    worker_id="bench",
                    attempt=1,
                    occurred_at=datetime.fromtimestamp(at, UTC),
                ).as_dict()
            )

        while sent <= total:
            await asyncio.sleep(0.2)
            due = min(total + 1, int((time.time() - began) * rate) + 1)
            frames = b"".join(entry(i) for i in range(sent, due))
            sent = due
            if frames:
                chunk = b"%x\r\n%b\r\n" % (len(frames), frames)
                for writer in clients:
                    writer.write(chunk)
        for writer in clients:
            writer.write(b"0\r\n\r\n")
            writer.close()
        await asyncio.sleep(GIVE_UP)  # the last bytes drain before the process goes
        server.close()

    asyncio.run(main())


async def _listen(
    base: str, secret: str, run_id: str, opened: Any, until: list[float]
) -> tuple[int, float, list[float]]:
    """Events received, the largest lag (ms) and a sample of lags, for one client; it stops
    at the run's end, or at ``until[0]`` (wall clock, set when the run starts) if behind."""
    headers = {"Authorization": f"Bearer {secret}"}
    path = f"/api/v1/action-runs/{run_id}/logs/stream"
    count, worst, sample = 0, 0.0, []
    async with (
        httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(300)) as client,
        aconnect_sse(client, "GET", path) as source,
    ):
        opened()
        async for sse in source.aiter_sse():
            if not sse.data:  # the server's keep-alive ping
                continue
            now = time.time()
            lag = (now - jsonfmt.loads(sse.data)["data"]["sent_at"]) * 1000
            count += 1
            worst = max(worst, lag)
            if count % 50 == 0:
                sample.append(lag)
            if now > until[0]:
                break
    return count, worst, sample


async def _listen_raw(
    base: str, secret: str, run_id: str, opened: Any, until: list[float]
) -> tuple[int, float, list[float]]:
    """:func:`_listen` at the byte level, on a bare asyncio connection: each read's complete
    frames are counted, their ids checked to rise, and the lag taken of the read's oldest
    entry (its first frame, the worst of the read), so a client costs a little per read
    and nearly nothing per event. The sample is one lag a read."""
    url = httpx.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    path = f"/api/v1/action-runs/{run_id}/logs/stream"
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {secret}\r\n"
        "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise AssertionError(f"stream refused: {head[:80]!r}")
    opened()
    count, worst, sample, last_id, pending = 0, 0.0, [], 0, b""
    try:
        while chunk := await reader.read(1 << 18):
            pending += chunk
            end = pending.rfind(b"\r\n\r\n")
            if end < 0:
                continue
            # Whole frames up to here. Every frame's id line follows a newline (the frame
            # before it, or the HTTP chunk's size line; the cut keeps the newline with the
            # frame after it); a data line holds none.
            block, pending = pending[: end + 2], pending[end + 2 :]
            first = block.find(b"\nid: ")
            if first < 0:
                continue  # keep-alive pings only
            id_end = block.index(b"\r\n", first)
            first_id = int(block[first + 5 : id_end])
            tail = block.rfind(b"\nid: ")
            tail_id = int(block[tail + 5 : block.index(b"\r\n", tail)])
            if first_id <= last_id or tail_id < first_id:
                raise AssertionError(f"ids out of order: {last_id} then {first_id}..{tail_id}")
            last_id = tail_id
            data = block[id_end + 8 : block.index(b"\r\n", id_end + 2)]
            now = time.time()
            lag = (now - jsonfmt.loads(data)["data"]["sent_at"]) * 1000
            count += block.count(b"\nid: ")
            worst = max(worst, lag)
            sample.append(lag)
            if now > until[0]:
                break
    finally:
        writer.close()
    return count, worst, sample


def _clients(
    bases: list[str], secret: str, run_id: str, n: int, queues: tuple[Any, Any, Any], *, raw: bool
) -> None:
    """One client process: ``n`` clients, spread over the API processes. Queues: it says on
    the first when all are open, puts their results on the second, and reads from the third
    when a client still behind gives up (a wall-clock time)."""
    ready, out, stop_at = queues

    async def main() -> list[tuple[int, float, list[float]]]:
        opened = [0]

        until = [float("inf")]

        def one_open() -> None:
            opened[0] += 1
            if opened[0] == n:
                ready.put(n)

        listen = _listen_raw if raw else _listen
        tasks = [
            asyncio.create_task(listen(bases[i % len(bases)], secret, run_id, one_open, until))
            for i in range(n)
        ]
        until[0] = await asyncio.to_thread(stop_at.get)
        return await asyncio.gather(*tasks)

    out.put(asyncio.run(main()))


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class _Servers:
    """The servers of one load and what feeds them: ``quarry serve`` processes and a
    worker-like producer, or (``raw``) the bare fan-out baseline's processes."""

    def __init__(self, url: str, redis_url: str, args: argparse.Namespace, *, raw: bool) -> None:
        self.run_id, self.secret, tmp, env = stream_setup(url, redis_url, "bench-streams")
        ctx = mp.get_context("fork")
        self._go = ctx.Event()
        self._fanouts: list[Any] = []
        self._apis: list[Any] = []
        self._producer: Any = None
        if raw:
            ports = [free_port() for _ in range(args.apis)]
            self._fanouts = [
                ctx.Process(
                    target=_raw_fanout, args=(port, self.run_id, args.rate, args.seconds, self._go)
                )
                for port in ports
            ]
            for fanout in self._fanouts:
                fanout.start()
            for port in ports:
                wait_for(lambda port=port: _listening(port), "a raw server to listen", 30)
            self.bases = [f"http://127.0.0.1:{port}" for port in ports]
        else:
            self._apis = [serve_api(env, tmp / f"api-{i}.log") for i in range(args.apis)]
            self.bases = [base for _, base in self._apis]
            self._producer = ctx.Process(
                target=_produce, args=(url, redis_url, self.run_id, args.rate, args.seconds)
            )

    def start(self) -> None:
        """The run starts logging (or the raw servers sending)."""
        if self._producer is not None:
            self._producer.start()
        self._go.set()

    def stop(self) -> None:
        """Wait for the producer; stop every server."""
        if self._producer is not None and self._producer.pid is not None:
            self._producer.join()
        for fanout in self._fanouts:
            fanout.terminate()
            fanout.join(timeout=10)
        for proc, _ in self._apis:
            proc.terminate()
            proc.wait(timeout=10)


def measure(
    url: str, redis_url: str, args: argparse.Namespace, *, raw: bool = False
) -> dict[str, Any]:
    """One load: ``args.clients`` clients over ``args.apis`` servers, Quarry's or (``raw``)
    the bare fan-out baseline's."""
    servers = _Servers(url, redis_url, args, raw=raw)
    ctx = mp.get_context("fork")
    ready, out, stop_at = ctx.Queue(), ctx.Queue(), ctx.Queue()
    per = [args.clients // args.client_processes] * args.client_processes
    per[0] += args.clients - sum(per)
    procs = [
        ctx.Process(
            target=_clients,
            args=(servers.bases, servers.secret, servers.run_id, n, (ready, out, stop_at)),
            kwargs={"raw": args.client == "raw"},
        )
        for n in per
        if n
    ]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120 + args.clients / 10)
        time.sleep(1.0)  # every stream joined its run's feed
        servers.start()
        for _ in procs:  # a client still behind this long after the run gives up
            stop_at.put(time.time() + args.seconds + GIVE_UP)
        results = [r for _ in procs for r in out.get(timeout=args.seconds + GIVE_UP + 120)]
        for p in procs:
            p.join()
    finally:
        servers.stop()
    expected = int(args.rate * args.seconds) + 1
    worst = sorted(w for _, w, _ in results)
    sample = [lag for _, _, s in results for lag in s]
    return {
        "clients": len(results),
        "complete": sum(1 for c, _, _ in results if c == expected),
        "behind": sum(1 for w in worst if w > 1000),
        "worst_p50": statistics.median(worst),
        "worst_max": worst[-1],
        "lag_p50": statistics.median(sample),
        "lag_p99": pct(sample, 0.99),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import REDIS, drop_pg, fresh_pg  # noqa: PLC0415 - no cycle at import

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apis", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--client-processes", type=int, default=8)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--client",
        choices=("raw", "sse"),
        default="raw",
        help="raw: frames counted and checked per read at the byte level; sse: httpx-sse, "
        "every event parsed",
    )
    parser.add_argument(
        "--no-raw-baseline",
        dest="raw_baseline",
        action="store_false",
        help="leave out the bare asyncio fan-out baseline",
    )
    args = parser.parse_args(argv)
    url = fresh_pg("quarry_bench_streams")
    if url is None:
        return 1
    try:
        one = argparse.Namespace(**{**vars(args), "apis": 1, "clients": 1, "client_processes": 1})
        base = measure(url, REDIS, one)
        got = measure(url, REDIS, args)
        bare = measure(url, REDIS, args, raw=True) if args.raw_baseline else None
    finally:
        drop_pg("quarry_bench_streams")
    print(
        f"\n{args.clients:,} stream clients over {args.apis} API processes ({args.client_processes} "
        f"client processes), a run logging {args.rate:,} entries/s for {args.seconds:.0f} s"
    )
    print(f"  clients that got every entry: {got['complete']:,} of {got['clients']:,}")
    print(
        f"  clients ever more than 1 s behind: {got['behind']:,} (goal 0); a client's worst lag "
        f"p50 {got['worst_p50']:.0f} ms, max {got['worst_max']:.0f} ms"
    )
    print(
        f"  lag, every 50th entry of every client: p50 {got['lag_p50']:.0f} ms, p99 "
        f"{got['lag_p99']:.0f} ms; one client on one API process (baseline): p50 "
        f"{base['lag_p50']:.0f} ms, p99 {base['lag_p99']:.0f} ms, worst {base['worst_max']:.0f} ms"
    )
    if bare is not None:
        print(
            f"  raw fan-out baseline, the same clients on {args.apis} bare asyncio servers: "
            f"{bare['complete']:,} of {bare['clients']:,} got every entry, {bare['behind']:,} "
            f"ever more than 1 s behind; lag p50 {bare['lag_p50']:.0f} ms, p99 "
            f"{bare['lag_p99']:.0f} ms, a client's worst lag p50 {bare['worst_p50']:.0f} ms, "
            f"max {bare['worst_max']:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
