"""The pure heart of recovery: ``decide`` over a run record and the clocks, as a table."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from worker.models import Run, Status
from worker.recovery import Action, decide, is_stale

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DB_NOW = 1_000_000.0
MAX_ATTEMPTS = 3
REPUBLISH_AFTER = timedelta(seconds=60)

BASE = Run(
    id="run_1",
    pipeline="p",
    status=Status.RUNNING,
    attempt=1,
    params={},
    gateway=None,
    lease_owner="w1",
    lease_epoch=4,
    lease_expires_at=DB_NOW + 10,
    heartbeat_at=NOW,
    checkpoint={},
    telemetry_summary={},
    error_summary=None,
    cancel_requested=False,
    created_at=NOW,
    queued_at=NOW,
    started_at=NOW,
    finished_at=None,
    updated_at=NOW,
)

CASES = [
    # (what, changes to the base record, expected action)
    ("a live lease", {}, Action.NONE),
    ("a lease expiring exactly now is not yet stale", {"lease_expires_at": DB_NOW}, Action.NONE),
    ("a lease just expired", {"lease_expires_at": DB_NOW - 0.001}, Action.RECOVER),
    ("a running run with no lease deadline", {"lease_expires_at": None}, Action.NONE),
    ("expired, attempts left", {"lease_expires_at": DB_NOW - 5, "attempt": 2}, Action.RECOVER),
    ("expired at the last attempt", {"lease_expires_at": DB_NOW - 5, "attempt": 3}, Action.GIVE_UP),
    (
        "expired past the last attempt",
        {"lease_expires_at": DB_NOW - 5, "attempt": 4},
        Action.GIVE_UP,
    ),
    (
        "expired with a cancel requested (even at the last attempt)",
        {"lease_expires_at": DB_NOW - 5, "attempt": 3, "cancel_requested": True},
        Action.CANCEL,
    ),
    (
        "a live lease with a cancel requested: its worker sees it",
        {"cancel_requested": True},
        Action.NONE,
    ),
    (
        "interrupted",
        {"status": Status.INTERRUPTED, "lease_owner": None, "lease_expires_at": None},
        Action.FAST_RECOVER,
    ),
    (
        "interrupted at the last attempt still resumes (an interruption is not a crash)",
        {"status": Status.INTERRUPTED, "lease_expires_at": None, "attempt": 3},
        Action.FAST_RECOVER,
    ),
    (
        "cancel while interrupted",
        {"status": Status.INTERRUPTED, "lease_expires_at": None, "cancel_requested": True},
        Action.CANCEL,
    ),
    ("queued just now", {"status": Status.QUEUED, "lease_expires_at": None}, Action.NONE),
    (
        "queued exactly the republish threshold",
        {"status": Status.QUEUED, "lease_expires_at": None, "queued_at": NOW - REPUBLISH_AFTER},
        Action.NONE,
    ),
    (
        "queued past the republish threshold",
        {
            "status": Status.QUEUED,
            "lease_expires_at": None,
            "queued_at": NOW - REPUBLISH_AFTER - timedelta(seconds=1),
        },
        Action.REPUBLISH,
    ),
    (
        "queued with a stale deadline left over is judged as queued",
        {"status": Status.QUEUED, "lease_expires_at": DB_NOW - 100},
        Action.NONE,
    ),
    *(
        (
            f"{status.value} is final",
            {"status": status, "lease_expires_at": DB_NOW - 100},
            Action.NONE,
        )
        for status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    ),
]


@pytest.mark.parametrize(("what", "changes", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decide(what: str, changes: dict[str, object], expected: Action) -> None:
    """Each record and clock gives exactly one verdict, with a reason for anything but none."""
    run = replace(BASE, **changes)  # type: ignore[arg-type]
    decision = decide(
        run, db_now=DB_NOW, now=NOW, max_attempts=MAX_ATTEMPTS, republish_after=REPUBLISH_AFTER
    )
    assert decision.action is expected, what
    assert decision.run is run
    assert decision.reason


def test_reasons_say_why() -> None:
    """A recovery names the gone owner and how long ago; giving up names the attempts."""
    expired = replace(BASE, lease_expires_at=DB_NOW - 12.5)
    recover = decide(
        expired, db_now=DB_NOW, now=NOW, max_attempts=MAX_ATTEMPTS, republish_after=REPUBLISH_AFTER
    )
    assert recover.reason == "lease of w1 expired 12.5s ago"
    last = replace(expired, attempt=3)
    give_up = decide(
        last, db_now=DB_NOW, now=NOW, max_attempts=MAX_ATTEMPTS, republish_after=REPUBLISH_AFTER
    )
    assert give_up.reason.startswith("attempts exhausted (3/3)")


def test_is_stale_only_for_running_runs() -> None:
    """Staleness is a running run's expired lease on the database clock, nothing else."""
    assert is_stale(replace(BASE, lease_expires_at=DB_NOW - 1), DB_NOW)
    assert not is_stale(replace(BASE, lease_expires_at=DB_NOW), DB_NOW)
    assert not is_stale(
        replace(BASE, status=Status.INTERRUPTED, lease_expires_at=DB_NOW - 1), DB_NOW
    )
