"""The schedule tick over a real store: clocks, catch-up, pause, and no query when idle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scheduler.ticker import Ticker
from worker.models import Trigger
from worker.pipelines import Pipeline
from worker.store import Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pipeline(name: str = "p", **settings: Any) -> Pipeline:
    return Pipeline.model_validate(
        {"name": name, "source": {"type": "demo"}, "resources": [{"name": "r"}], **settings}
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'q.db'}")
    s.upgrade()
    return s


def tick(ticker: Ticker, store: Store, now: datetime, *pipes: Pipeline) -> list[str]:
    published: list[str] = []
    result = ticker.tick(
        store,
        {p.name: p for p in pipes},
        now,
        publish=published.append,
        publish_resumed=published.append,
    )
    assert [r.id for r in result.created] == published
    return published


def fires(store: Store, name: str = "p") -> list[datetime]:
    return sorted(r.fire_time for r in store.list_runs(pipeline=name) if r.fire_time)


def test_a_new_schedule_starts_its_clock_and_fires_on_time(store: Store) -> None:
    hourly = pipeline(schedule="@hourly")
    ticker = Ticker()
    assert tick(ticker, store, T0 + timedelta(minutes=30), hourly) == []  # no past fire
    assert tick(ticker, store, T0 + timedelta(minutes=59), hourly) == []
    assert len(tick(ticker, store, T0 + timedelta(hours=1, seconds=1), hourly)) == 1
    assert tick(ticker, store, T0 + timedelta(hours=1, seconds=2), hourly) == []
    assert fires(store) == [T0 + timedelta(hours=1)]
    run = store.list_runs(pipeline="p")[0]
    assert run.trigger == Trigger.SCHEDULE
    assert (run.interval_start, run.interval_end) == (T0, T0 + timedelta(hours=1))


@pytest.mark.parametrize("catchup", [False, True])
def test_missed_intervals_after_a_beat_outage(store: Store, catchup: bool) -> None:
    hourly = pipeline(schedule="@hourly", catchup=catchup, max_catchup=4)
    tick(Ticker(), store, T0 + timedelta(minutes=1), hourly)
    # Beat down for six hours; a fresh process (a restarted beat) ticks.
    tick(Ticker(), store, T0 + timedelta(hours=6, minutes=5), hourly)
    expected = [T0 + timedelta(hours=h) for h in ((3, 4, 5, 6) if catchup else (6,))]
    assert fires(store) == expected
    # Two more processes ticking at once later on add nothing for the same hour.
    tick(Ticker(), store, T0 + timedelta(hours=6, minutes=6), hourly)
    tick(Ticker(), store, T0 + timedelta(hours=6, minutes=7), hourly)
    assert fires(store) == expected


def test_a_paused_pipeline_fires_nothing_and_resumes_from_now(store: Store) -> None:
    hourly = pipeline(schedule="@hourly")
    ticker = Ticker()
    tick(ticker, store, T0, hourly)
    store.set_paused("p", True, "test")
    assert tick(ticker, store, T0 + timedelta(hours=3, minutes=1), hourly) == []
    store.set_paused("p", False, "test")  # anchor: the real now, which is after 2026-01-01
    now = datetime.now(UTC)
    assert tick(ticker, store, now + timedelta(hours=1, minutes=1), hourly) != []
    schedule = hourly.cron
    assert schedule is not None
    assert fires(store) == [schedule.latest_at(now + timedelta(hours=1, minutes=1))]


def test_a_changed_schedule_restarts_its_clock(store: Store) -> None:
    ticker = Ticker()
    tick(ticker, store, T0, pipeline(schedule="@hourly"))
    daily = pipeline(schedule="@daily")
    assert tick(ticker, store, T0 + timedelta(hours=2, minutes=1), daily) == []  # restarted
    assert fires(store) == []
    tick(ticker, store, T0 + timedelta(days=1, minutes=1), daily)
    assert fires(store) == [T0 + timedelta(days=1)]


def test_a_tick_with_nothing_due_reads_nothing(store: Store) -> None:
    """A thousand scheduled pipelines: after the first tick, ticks between fire times do
    not touch the store's pipeline state at all."""
    many = [pipeline(f"p{i}", schedule=f"{i % 60} * * * *") for i in range(1000)]
    ticker = Ticker()
    first = ticker.tick(
        store,
        {p.name: p for p in many},
        T0,
        publish=lambda _r: None,
        publish_resumed=lambda _r: None,
    )
    assert first.looked_at == 1000
    quiet = ticker.tick(
        store,
        {p.name: p for p in many},
        T0 + timedelta(seconds=30),
        publish=lambda _r: None,
        publish_resumed=lambda _r: None,
    )
    assert quiet.looked_at == 0 and quiet.created == []
    due = ticker.tick(
        store,
        {p.name: p for p in many},
        T0 + timedelta(minutes=1, seconds=1),
        publish=lambda _r: None,
        publish_resumed=lambda _r: None,
    )
    assert due.looked_at == 17  # the pipelines firing at minute 1: p1, p61, ..., p961
    assert len(due.created) == 17
