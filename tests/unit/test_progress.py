"""Checkpoint decisions and human wording are pure and exact."""

from __future__ import annotations

from worker import progress


def test_checkpoint_records_slices_and_resume_point() -> None:
    """After slices 1 and 2 commit, a restart begins at slice 3 with totals summed."""
    cp: dict[str, object] = {}
    cp = progress.record_slice(cp, "events", index=1, rows=10, files=1, bytes_=100, seconds=1.0)
    cp = progress.record_slice(cp, "events", index=2, rows=5, files=1, bytes_=50, seconds=0.5)
    assert progress.next_slice(cp, "events") == 3
    assert not progress.is_resource_done(cp, "events")
    assert progress.next_slice(cp, "profiles") == 1
    assert cp["position"] == {"resource": "events", "slice": 2}
    done = progress.record_resource_done(cp, "events")
    assert progress.is_resource_done(done, "events")
    assert progress.totals(done) == {"rows": 15, "files": 2, "bytes": 150}
    assert cp is not done  # the input is never mutated
    assert not progress.is_resource_done(cp, "events")


def test_wording_matches_the_run_log_docs() -> None:
    """Counts and durations read like the seed's messages."""
    assert progress.format_count(12500) == "12,500"
    assert progress.plural(1, "file") == "1 file"
    assert progress.plural(3, "file") == "3 files"
    assert progress.format_duration(4 * 3600 + 15 * 60) == "4h 15m"
    assert progress.format_duration(125) == "2m 5s"
    assert progress.format_duration(3.25) == "3.2s"
