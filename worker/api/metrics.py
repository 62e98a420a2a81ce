"""``/metrics``: Prometheus text format over the store's counts and this process's streams."""

from __future__ import annotations

from fastapi import APIRouter, Response

from worker.api import stream
from worker.api.auth import StoreDep
from worker.api.params import NoQueryDep
from worker.api.responses import documented
from worker.models import Status

#: The exposition format's content type.
CONTENT_TYPE = "text/plain; version=0.0.4"

router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            "description": "Prometheus text format.",
        },
        **documented(),
    },
)
def metrics(db: StoreDep, _q: NoQueryDep) -> Response:
    """Runs by status, recoveries, entries written, stream clients."""
    stats = db.stats()
    lines = [
        "# HELP quarry_runs Runs in the store by status.",
        "# TYPE quarry_runs gauge",
        *(
            f'quarry_runs{{status="{status.value}"}} {stats["runs"].get(status.value, 0)}'
            for status in Status
        ),
        "# HELP quarry_run_recoveries_total Expired leases recovered by the watchdog.",
        "# TYPE quarry_run_recoveries_total counter",
        f"quarry_run_recoveries_total {stats['recoveries']}",
        "# HELP quarry_log_entries_total Log entries written (the newest entry id).",
        "# TYPE quarry_log_entries_total counter",
        f"quarry_log_entries_total {stats['max_entry_id']}",
        "# HELP quarry_stream_clients Open log streams on this API process.",
        "# TYPE quarry_stream_clients gauge",
        f"quarry_stream_clients {stream.CLIENTS.value}",
    ]
    return Response("\n".join(lines) + "\n", media_type=CONTENT_TYPE)
