"""Checkpoint decisions, pure over the checkpoint dict: where a run resumes, what a committed
slice or resource records, and the totals so far."""

from __future__ import annotations

from typing import Any


def resource_state(checkpoint: dict[str, Any], resource: str) -> dict[str, Any]:
    """The checkpointed state of ``resource`` (empty when it has not started)."""
    state = checkpoint.get("resources", {}).get(resource, {})
    return dict(state) if isinstance(state, dict) else {}


def is_resource_done(checkpoint: dict[str, Any], resource: str) -> bool:
    """Whether the checkpoint says ``resource`` completed."""
    return resource_state(checkpoint, resource).get("status") == "completed"


def next_slice(checkpoint: dict[str, Any], resource: str) -> int:
    """The 1-based slice to start ``resource`` at: one past the last committed slice."""
    return int(resource_state(checkpoint, resource).get("next_slice", 1))


def record_slice(
    checkpoint: dict[str, Any],
    resource: str,
    *,
    index: int,
    rows: int,
    files: int,
    bytes_: int,
    seconds: float,
    since: Any = None,
    high_water: Any = None,
    total: int | None = None,
) -> dict[str, Any]:
    """A new checkpoint with slice ``index`` of ``resource`` committed.

    ``since`` and ``high_water`` are incremental marks, already JSON-encoded:
    where this run started reading the resource, and the highest cursor value
    it has read so far (kept across slices). ``total``: the resource's slice count, kept in
    the position so that a reader can say how far the resource is.
    """
    state = resource_state(checkpoint, resource)
    if since is not None:
        state["since"] = since
    if high_water is not None:
        state["high_water"] = high_water
    state.update(
        status="in_progress",
        next_slice=index + 1,
        rows=int(state.get("rows", 0)) + rows,
        files=int(state.get("files", 0)) + files,
        bytes=int(state.get("bytes", 0)) + bytes_,
        duration_seconds=round(float(state.get("duration_seconds", 0.0)) + seconds, 3),
    )
    position: dict[str, Any] = {"resource": resource, "slice": index}
    if total is not None:
        position["slices"] = total  # for a reader: "events: slice 37/104"
    return _with_resource(checkpoint, resource, state, position=position)


def record_resource_done(checkpoint: dict[str, Any], resource: str) -> dict[str, Any]:
    """A new checkpoint with ``resource`` completed."""
    state = resource_state(checkpoint, resource)
    state["status"] = "completed"
    return _with_resource(
        checkpoint, resource, state, position={"resource": resource, "slice": None}
    )


def _with_resource(
    checkpoint: dict[str, Any], resource: str, state: dict[str, Any], position: dict[str, Any]
) -> dict[str, Any]:
    resources = dict(checkpoint.get("resources", {}))
    resources[resource] = state
    return {**checkpoint, "resources": resources, "position": position}


def totals(checkpoint: dict[str, Any]) -> dict[str, int]:
    """Rows, files and bytes committed across all resources."""
    out = {"rows": 0, "files": 0, "bytes": 0}
    for state in checkpoint.get("resources", {}).values():
        for key in out:
            out[key] += int(state.get(key, 0))
    return out
