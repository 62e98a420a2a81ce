"""Cron schedules in time zones, and the pipeline settings that go with them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import ConfigError
from worker.pipelines import load_pipelines, plan_slices
from worker.schedules import Schedule

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_five_fields_aliases_and_a_seconds_field() -> None:
    assert Schedule("0 * * * *").next_after(T0) == T0 + timedelta(hours=1)
    assert Schedule("@hourly").next_after(T0) == T0 + timedelta(hours=1)
    assert Schedule("@daily").next_after(T0) == T0 + timedelta(days=1)
    assert Schedule("*/15 * * * * *").next_after(T0) == T0 + timedelta(seconds=15)
    assert Schedule("30 2 * * * *").next_after(T0) == T0 + timedelta(minutes=2, seconds=30)


@pytest.mark.parametrize(
    ("expression", "zone", "fragment"),
    [
        ("61 * * * *", "UTC", "invalid cron expression"),
        ("* * *", "UTC", "has 3 fields"),
        ("@reboot", "UTC", "unknown alias"),
        ("", "UTC", "empty cron expression"),
        ("0 * * * *", "Mars/Olympus", "unknown time zone"),
    ],
)
def test_bad_schedules_say_what_is_wrong(expression: str, zone: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Schedule(expression, zone)


def test_daily_at_two_in_paris_across_both_dst_changes() -> None:
    paris = Schedule("0 2 * * *", "Europe/Paris")
    # 29 March 2026: 02:00 does not exist in Paris (clocks jump to 03:00 = 01:00 UTC).
    spring = paris.next_after(datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert spring == datetime(2026, 3, 29, 1, tzinfo=UTC)
    # The day after, 02:00 CEST is 00:00 UTC.
    assert paris.next_after(spring) == datetime(2026, 3, 30, 0, tzinfo=UTC)
    # 25 October 2026: 02:00 CET (after the fall back) is 01:00 UTC.
    autumn = paris.next_after(datetime(2026, 10, 24, 12, tzinfo=UTC))
    assert autumn.hour in (0, 1) and autumn.date().day == 25


def test_an_hourly_schedule_fires_every_real_hour_through_the_fall_back() -> None:
    paris = Schedule("0 * * * *", "Europe/Paris")
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)  # 00:00 CEST on the 25th
    fires = list(paris.fires(start, start + timedelta(hours=5)))
    assert fires == [start + timedelta(hours=h) for h in range(1, 6)]  # no hour lost or doubled


def test_each_fire_closes_the_interval_since_the_previous_one() -> None:
    hourly = Schedule("@hourly")
    fire = T0 + timedelta(hours=10)
    interval = hourly.interval(fire)
    assert (interval.start, interval.end) == (fire - timedelta(hours=1), fire)
    assert hourly.latest_at(fire) == fire
    assert hourly.latest_at(fire + timedelta(minutes=59)) == fire


@given(
    minutes=st.integers(min_value=0, max_value=5000),
    limit=st.integers(min_value=1, max_value=50),
)
def test_the_newest_missed_fires_are_the_tail_of_all_of_them(minutes: int, limit: int) -> None:
    every5 = Schedule("*/5 * * * *")
    until = T0 + timedelta(minutes=minutes)
    everything = list(every5.fires(T0, until))
    assert every5.latest_fires(T0, until, limit) == everything[-limit:]


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pipelines.toml"
    path.write_text(body)
    return path


BASE = 'source = { type = "demo" }\n'


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ('schedule = "61 * * * *"', "schedule: Value error, invalid cron expression"),
        ('schedule = "@hourly"\ntimezone = "Nowhere/City"', "timezone: Value error, unknown"),
        ("max_active_runs = 0", "max_active_runs: Input should be greater than or equal to 1"),
        ('retry_delay = "soon"', "retry_delay: Value error, invalid duration"),
        ('page_timeout = "0s"', "page_timeout: Value error, must be positive"),
        ('run_timeout = "90d"', "run_timeout: Value error, must be positive and at most 30 days"),
    ],
)
def test_bad_pipeline_settings_name_their_field(
    tmp_path: Path, settings: str, fragment: str
) -> None:
    path = write(tmp_path, f"[pipelines.p]\n{settings}\n{BASE}resources = [{{ name = 'r' }}]\n")
    with pytest.raises(ConfigError, match="pipeline 'p'") as caught:
        load_pipelines(path)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("resource", "fragment"),
    [
        ("{ name = 'r', write_mode = 'merge' }", 'write_mode = "merge" needs a primary_key'),
        ("{ name = 'r', primary_key = 'id' }", 'primary_key applies to write_mode = "merge"'),
        ("{ name = 'r', write_mode = 'upsert' }", "write_mode: Input should be"),
        (
            "{ name = 'r', write_mode = 'replace', on_failure = 'remove' }",
            'on_failure applies to write_mode = "append"',
        ),
        (
            "{ name = 'r', slices = { window = 'interval', step = '1h' } }",
            'resources.r.slices.window: "interval" needs the pipeline\'s schedule',
        ),
        (
            "{ name = 'r', slices = { window = 'interval', step = '1h', start = 2026-01-01T00:00:00Z } }",
            "drop start and end",
        ),
    ],
)
def test_bad_resource_settings_name_their_field(
    tmp_path: Path, resource: str, fragment: str
) -> None:
    path = write(tmp_path, f"[pipelines.p]\n{BASE}resources = [{resource}]\n")
    with pytest.raises(ConfigError) as caught:
        load_pipelines(path)
    assert fragment in str(caught.value)


def test_interval_slices_cut_the_runs_interval(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[pipelines.p]\nschedule = '@daily'\n"
        f"{BASE}resources = [{{ name = 'r', slices = {{ window = 'interval', step = '6h' }} }}]\n",
    )
    spec = load_pipelines(path)["p"].resources[0].slices
    assert spec is not None
    windows = plan_slices(spec, (T0, T0 + timedelta(days=1)))
    assert [(w.start, w.end) for w in windows] == [
        (T0 + timedelta(hours=6 * i), T0 + timedelta(hours=6 * (i + 1))) for i in range(4)
    ]
    with pytest.raises(ConfigError, match="no data interval"):
        plan_slices(spec)


def test_the_parsed_file_is_reused_until_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path, f"[pipelines.p]\n{BASE}resources = [{{ name = 'r' }}]\n")
    first = load_pipelines(path)
    assert load_pipelines(path)["p"] is first["p"]
    path.write_text(f"[pipelines.q]\n{BASE}resources = [{{ name = 'r' }}, {{ name = 's' }}]\n")
    assert list(load_pipelines(path)) == ["q"]
