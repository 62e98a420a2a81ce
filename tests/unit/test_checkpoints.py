"""Checkpoint decisions and human wording are pure and exact."""

from __future__ import annotations

from worker import checkpoints, wording


def test_checkpoint_records_slices_and_resume_point() -> None:
    """After slices 1 and 2 commit, a restart begins at slice 3 with totals summed."""
    cp: dict[str, object] = {}
    cp = checkpoints.record_slice(cp, "events", index=1, rows=10, files=1, bytes_=100, seconds=1.0)
    cp = checkpoints.record_slice(cp, "events", index=2, rows=5, files=1, bytes_=50, seconds=0.5)
    assert checkpoints.next_slice(cp, "events") == 3
    assert not checkpoints.is_resource_done(cp, "events")
    assert checkpoints.next_slice(cp, "profiles") == 1
    assert cp["position"] == {"resource": "events", "slice": 2}
    done = checkpoints.record_resource_done(cp, "events")
    assert checkpoints.is_resource_done(done, "events")
    assert checkpoints.totals(done) == {"rows": 15, "files": 2, "bytes": 150}
    assert cp is not done  # the input is never mutated
    assert not checkpoints.is_resource_done(cp, "events")


def test_wording_matches_the_run_log_docs() -> None:
    """Counts and durations read like the seed's messages."""
    assert wording.format_count(12500) == "12,500"
    assert wording.plural(1, "file") == "1 file"
    assert wording.plural(3, "file") == "3 files"
    assert wording.format_duration(4 * 3600 + 15 * 60) == "4h 15m"
    assert wording.format_duration(125) == "2m 5s"
    assert wording.format_duration(3.25) == "3.2s"
