"""``/metrics``: the store's per-pipeline counters and gauges, and this process's streams, in
Prometheus's text format (``prometheus_client``; the series are listed in docs/metrics.md).

Every value but ``quarry_stream_clients`` comes from the store, read once per scrape
(:meth:`~worker.store.Store.metrics_snapshot`): run-level counters are raised by
whichever process made the change, so no process's memory could hold them.
Labels are pipelines (from the pipelines file and the store) and small fixed
vocabularies, never run ids. Counters of every declared pipeline are exported
from zero, so ``increase()`` sees a pipeline's first failure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from worker.api import stream
from worker.api.params import NoQueryDep
from worker.api.responses import documented
from worker.errors import QuarryError
from worker.models import TERMINAL, Status
from worker.pipelines import Pipeline, load_pipelines
from worker.settings import Settings
from worker.store import Store
from worker.store import metrics as stored
from worker.store.metrics import MetricsSnapshot

#: The exposition format's content type, as prometheus_client writes it.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Kinds exported from zero for every pipeline (others appear once counted).
RECOVERY_KINDS = ("expired_lease", "lost_process", "fast", "republish", "give_up")
INTERRUPTION_KINDS = ("sigterm", "worker_lost", "retry")
ENDED = tuple(sorted(s.value for s in TERMINAL))

router = APIRouter()


def _labels(text: str) -> dict[str, str]:
    """A stored label key (``status=failed,le=300``) as a dict."""
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


class StoreCollector(Collector):
    """The store's metrics, read at each scrape."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def _declared(self) -> dict[str, Pipeline]:
        try:
            return load_pipelines(self.settings.pipelines_file)
        except (QuarryError, OSError):
            return {}  # a broken file: the store's pipelines still export

    def _due(self, declared: dict[str, Pipeline], now: datetime) -> GaugeMetricFamily:
        """Per scheduled pipeline, the fire time whose run should have succeeded by now: the
        one before the newest fire. Not for a paused pipeline, nor before its clock started."""
        due = GaugeMetricFamily(
            "quarry_pipeline_due_timestamp_seconds",
            "A scheduled pipeline's fire time before its newest one: a run fired then should "
            "have succeeded by now (seconds since the Unix epoch; none while paused).",
            labels=["pipeline"],
        )
        scheduled = {name: p.cron for name, p in declared.items() if p.cron is not None}
        states = self.store.pipeline_states(scheduled) if scheduled else {}
        for name, cron in sorted(scheduled.items()):
            state = states.get(name)
            if cron is None or state is None or state.paused or state.anchor is None:
                continue
            fire = cron.previous_before(cron.latest_at(now))
            if fire >= state.anchor:
                due.add_metric([name], fire.timestamp())
        return due

    def collect(self) -> Iterator[Metric]:
        """Every family of one consistent read of the store."""
        snap = self.store.metrics_snapshot()
        declared = self._declared()
        pipelines = snap.pipelines(list(declared))
        runs = GaugeMetricFamily("quarry_runs", "Runs in the store by status.", labels=["status"])
        for status in Status:
            runs.add_metric([status.value], snap.runs.get(status.value, 0))
        yield runs
        active = GaugeMetricFamily(
            "quarry_pipeline_active_runs",
            "Runs that started and have not ended (running, interrupted, or between attempts).",
            labels=["pipeline"],
        )
        queued = GaugeMetricFamily(
            "quarry_pipeline_queued_runs",
            "Queued runs that have not started yet.",
            labels=["pipeline"],
        )
        for pipeline in pipelines:
            active.add_metric([pipeline], snap.active.get(pipeline, 0))
            queued.add_metric([pipeline], snap.queued.get(pipeline, 0))
        yield active
        yield queued
        yield self._due(declared, datetime.now(UTC))
        yield from _counters(snap, pipelines)
        yield from _histograms(snap)
        yield CounterMetricFamily(
            "quarry_log_entries_total",
            "Log entries written (the newest entry id).",
            value=snap.max_entry_id,
        )
        yield GaugeMetricFamily(
            "quarry_stream_clients",
            "Open log streams on this API process.",
            value=stream.CLIENTS.value,
        )


#: Stored counter → (exported name, help, the label its stored key holds, zero-filled values).
_COUNTERS: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    stored.STARTED: ("quarry_runs_started_total", "Runs that took their first lease.", None, ()),
    stored.ENDED: (
        "quarry_runs_ended_total",
        "Runs that ended, by final status.",
        "status",
        ENDED,
    ),
    stored.RECOVERIES: (
        "quarry_run_recoveries_total",
        "Watchdog and worker recoveries: expired_lease, lost_process (a pool process "
        "died), fast (after SIGTERM), republish (lost message), give_up (attempts exhausted).",
        "kind",
        RECOVERY_KINDS,
    ),
    stored.INTERRUPTIONS: (
        "quarry_run_interruptions_total",
        "Attempts that stopped before their run ended: a signal (sigterm, sigint, sigquit), "
        "worker_lost (its lease expired), retry, external (a gateway's runner).",
        "kind",
        INTERRUPTION_KINDS,
    ),
    stored.ROWS: ("quarry_rows_loaded_total", "Rows committed with their slice.", None, ()),
    stored.BYTES: ("quarry_bytes_loaded_total", "Bytes committed with their slice.", None, ()),
    stored.DROPPED: (
        "quarry_log_entries_dropped_total",
        "Info entries dropped past QUARRY_MAX_ENTRIES_PER_RUN.",
        None,
        (),
    ),
}


def _counters(snap: MetricsSnapshot, pipelines: Sequence[str]) -> Iterator[Metric]:
    values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _COUNTERS}
    for name, (_, _, label, zeros) in _COUNTERS.items():
        for pipeline in pipelines:
            keys: list[tuple[str, ...]] = (
                [(pipeline, zero) for zero in zeros] if label else [(pipeline,)]
            )
            for key in keys:
                values[name][key] = 0.0
    last = GaugeMetricFamily(
        "quarry_last_success_timestamp_seconds",
        "When the pipeline's newest successful run ended (seconds since the Unix epoch).",
        labels=["pipeline"],
    )
    for pipeline, name, labels, value in snap.counters:
        if name == stored.LAST_SUCCESS:
            last.add_metric([pipeline], value)
        elif name in _COUNTERS:
            label = _COUNTERS[name][2]
            key = (pipeline, _labels(labels).get(label, "")) if label else (pipeline,)
            values[name][key] = value
    for name, (exported, help_text, label, _) in _COUNTERS.items():
        family = CounterMetricFamily(
            exported, help_text, labels=["pipeline", *([label] if label else [])]
        )
        for key, value in sorted(values[name].items()):
            family.add_metric(list(key), value)
        yield family
    yield last


#: Stored histogram → (exported name, help, its buckets, its label besides ``pipeline``).
_HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...], str | None]] = {
    stored.DURATION: (
        "quarry_run_duration_seconds",
        "Runs' duration from first start to end, by final status.",
        stored.DURATION_BUCKETS,
        "status",
    ),
    stored.QUEUE_WAIT: (
        "quarry_queue_wait_seconds",
        "Time from a run's creation (trigger, fire) to its first lease.",
        stored.QUEUE_WAIT_BUCKETS,
        None,
    ),
}


def _histograms(snap: MetricsSnapshot) -> Iterator[Metric]:
    # (histogram, pipeline, label value) → bucket bound → count, and → sum
    buckets: dict[tuple[str, str, str], dict[float, float]] = {}
    sums: dict[tuple[str, str, str], float] = {}
    for pipeline, name, labels, value in snap.counters:
        base, _, part = name.rpartition("_")
        if base not in _HISTOGRAMS:
            continue
        parsed = _labels(labels)
        _, _, bounds, label = _HISTOGRAMS[base]
        key = (base, pipeline, parsed.get(label, "") if label else "")
        if part == "bucket":
            bound = float(parsed.get("le", "+Inf"))
            # A bound no longer in the list (the buckets changed) counts in the next one up.
            bound = next((b for b in bounds if bound <= b), math.inf)
            into = buckets.setdefault(key, {})
            into[bound] = into.get(bound, 0.0) + value
        elif part == "sum":
            sums[key] = value
    for base, (exported, help_text, bounds, label) in _HISTOGRAMS.items():
        family = HistogramMetricFamily(
            exported, help_text, labels=["pipeline", *([label] if label else [])]
        )
        for key in sorted(k for k in buckets if k[0] == base):
            _, pipeline, label_value = key
            cumulative, points = 0.0, []
            for bound in (*bounds, math.inf):
                cumulative += buckets[key].get(bound, 0.0)
                points.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
            names = [pipeline, *([label_value] if label else [])]
            family.add_metric(names, points, sums.get(key, 0.0))
        yield family


def registry_of(request: Request) -> CollectorRegistry:
    """This application's registry (its own, never the process-global one), made at first use."""
    state: Any = request.app.state
    registry: CollectorRegistry | None = getattr(state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector(state.store, state.settings))
        state.metrics_registry = registry
    return registry


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            "description": "Prometheus text format (the series are in docs/metrics.md).",
        },
        **documented(),
    },
)
def metrics(request: Request, _q: NoQueryDep) -> Response:
    """Per-pipeline run counters, durations, queue waits and rows; runs by status; streams."""
    return Response(generate_latest(registry_of(request)), media_type=CONTENT_TYPE)
