"""The write-mode cleanup of runs ended without their worker, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from worker import control
from worker.cleanup import clean_up
from worker.models import Lease, Status
from worker.settings import Settings
from worker.store import Store

PIPELINES = """
[pipelines.p]
source = { type = "demo" }
destination = { type = "files", format = "jsonl", path = "{root}" }
resources = [
  { name = "kept" },
  { name = "removed", on_failure = "remove" },
  { name = "snapshot", write_mode = "replace" },
]
"""


def settings_for(tmp_path: Path) -> Settings:
    root = tmp_path / "out"
    (tmp_path / "pipelines.toml").write_text(PIPELINES.replace("{root}", str(root)))
    return Settings(data_dir=tmp_path, pipelines_file=tmp_path / "pipelines.toml")


def written(root: Path, run_id: str) -> list[str]:
    """The resources of ``run_id`` that have a directory under the files destination."""
    return sorted(p.name for p in (root / "p" / run_id).glob("*") if p.is_dir())


def leave_files(root: Path, run_id: str) -> None:
    """What a run that died mid-way leaves: a slice file in each resource's directory."""
    for resource in ("kept", "removed", "snapshot"):
        directory = root / "p" / run_id / resource
        directory.mkdir(parents=True)
        (directory / "part-00001.jsonl").write_text('{"id": 1}\n')


def test_only_runs_ended_over_their_workers_head_owe_cleanup(store: Store) -> None:
    forced, queued, own = (store.create_run("p") for _ in range(3))
    lease = store.acquire(forced.id, "w1", 30)
    own_lease = store.acquire(own.id, "w2", 30)
    assert isinstance(lease, Lease) and isinstance(own_lease, Lease)
    control.cancel(store, forced.id, force=True, by="test")
    control.cancel(store, queued.id)  # never started: nothing written
    store.finish(own_lease, Status.FAILED, error_summary="its own worker ended it")
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert [r.id for r in store.owed_cleanups(later)] == [forced.id]
    assert store.owed_cleanups(datetime.now(UTC) - timedelta(hours=1)) == []
    assert store.claim_cleanup(forced.id)
    assert not store.claim_cleanup(forced.id)  # taken once
    assert store.owed_cleanups(later) == []
    # A holder that ends its run but cannot clean up (its process is about to end).
    stuck = store.create_run("p")
    stuck_lease = store.acquire(stuck.id, "w3", 30)
    assert isinstance(stuck_lease, Lease)
    store.finish(stuck_lease, Status.FAILED, error_summary="timeout", cleanup_owed=True)
    assert [r.id for r in store.owed_cleanups(later)] == [stuck.id]
    # A gateway's run (its external runner writes its output): nothing owed to Quarry.
    remote = store.create_run("p", gateway="edge")
    assert isinstance(store.acquire(remote.id, "edge-runner", 30), Lease)
    control.cancel(store, remote.id, force=True, by="test")
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert [r.id for r in store.owed_cleanups(after)] == [stuck.id]


def test_the_sweep_removes_what_the_write_modes_leave_nothing_of(
    store: Store, tmp_path: Path
) -> None:
    """A forced cancel's run: past the wait, append-remove and replace directories go,
    append-keep stays, an entry says so; a second sweep does nothing."""
    settings = settings_for(tmp_path)
    run = store.create_run("p")
    lease = store.acquire(run.id, "w1", 30)
    assert isinstance(lease, Lease)
    leave_files(tmp_path / "out", run.id)
    control.cancel(store, run.id, force=True, by="test")
    assert clean_up(store, settings) == []  # its worker may still be writing
    later = datetime.now(UTC) + timedelta(seconds=settings.cleanup_after_seconds + 1)
    assert clean_up(store, settings, now=later) == [run.id]
    assert written(tmp_path / "out", run.id) == ["kept"]
    (done,) = [e for e in store.entries(run.id) if e.event == "run_cleaned_up"]
    assert done.worker_id == "watchdog"
    assert clean_up(store, settings, now=later) == []


def test_a_cleanup_that_cannot_be_done_says_why_once(store: Store, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    run = store.create_run("gone")  # a pipeline no longer in the file
    lease = store.acquire(run.id, "w1", 30)
    assert isinstance(lease, Lease)
    control.cancel(store, run.id, force=True, by="test")
    later = datetime.now(UTC) + timedelta(seconds=settings.cleanup_after_seconds + 1)
    assert clean_up(store, settings, now=later) == []
    (failed,) = [e for e in store.entries(run.id) if e.event == "run_cleanup_failed"]
    assert "unknown pipeline 'gone'" in failed.message
    assert clean_up(store, settings, now=later) == []
    assert len([e for e in store.entries(run.id) if e.event == "run_cleanup_failed"]) == 1
