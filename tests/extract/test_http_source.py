"""The HTTP source against a real local server that paginates, rate-limits and fails."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.crm_api import CrmServer
from tests.extract.conftest import RecordingLog
from worker.errors import ConfigError, SourceError
from worker.pipelines import ResourceConfig, SliceSpec, plan_slices
from worker.scrub import scrubber
from worker.sources.base import ReadContext
from worker.sources.http import HttpSource, retry_after

TOKEN = "crm-token"
SPEC = SliceSpec(
    start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2026, 1, 1, 10, 1, tzinfo=UTC), step="2h"
)
WINDOW_PARAMS = {"start": "updated_since", "end": "updated_before"}
STYLES = {
    "cursor": {
        "path": "/v1/contacts",
        "records": "data",
        "pagination": {"type": "cursor", "cursor_path": "meta.next_cursor"},
    },
    "next_link": {
        "path": "/v1/events",
        "records": "data",
        "pagination": {"type": "next_link", "next": "links.next"},
    },
    "page": {
        "path": "/v1/lists",
        "records": "results",
        "pagination": {"type": "page", "total_pages_path": "total_pages"},
    },
}


def make_source(crm: CrmServer, **options: Any) -> HttpSource:
    return HttpSource.from_options(
        {
            "base_url": crm.url,
            "headers": {"Authorization": f"Bearer {TOKEN}"},
            "backoff_seconds": 0.01,
            **options,
        }
    )


@pytest.fixture
def pauses() -> list[float]:
    """The backoff waits a source asked for."""
    return []


def read_all(
    source: HttpSource, resource: ResourceConfig, log: Any, pauses: list[float]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    windows = plan_slices(resource.slices) if resource.slices else [None]
    for window in windows:
        ctx = ReadContext(log=log, pause=pauses.append)
        out += [row for page in source.read(resource, window, ctx) for row in page]
    return out


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_pagination_style_reads_each_window_exactly(
    crm: CrmServer, style: str, log: RecordingLog, pauses: list[float]
) -> None:
    """Windows go out as query params; pages are followed to the end; nothing twice."""
    resource = ResourceConfig(
        name="contacts", slices=SPEC, options={**STYLES[style], "window_params": WINDOW_PARAMS}
    )
    source = make_source(crm)
    rows = read_all(source, resource, log, pauses)
    source.close()
    assert [r["id"] for r in rows] == list(range(1, 601))  # one a minute: 10 hours
    assert crm.requests > 12  # pages of 50: many requests per window
    assert log.records == [] and pauses == []


def test_429_waits_retry_after_and_5xx_back_off_each_logged(
    crm: CrmServer, log: RecordingLog, pauses: list[float]
) -> None:
    """Rate limits and server errors are retried within the budget, each a warning."""
    crm.rate_limit_every, crm.retry_after, crm.error_every = 3, "2", 5
    resource = ResourceConfig(name="contacts", options=STYLES["cursor"])
    rows = read_all(make_source(crm), resource, log, pauses)
    assert [r["id"] for r in rows] == list(range(1, 601))
    retries = log.events("source_retry")
    assert len(retries) == crm.faults > 0
    assert {r["problem"] for r in retries} == {"HTTP 429", "HTTP 503"}
    assert 2.0 in pauses  # Retry-After honoured
    assert all(r["attempt"] >= 2 and r["max_attempts"] == 6 for r in retries)
    assert "retrying in" in retries[0]["message"] and "/v1/contacts" in retries[0]["message"]


def test_timeouts_are_retried(crm: CrmServer, log: RecordingLog, pauses: list[float]) -> None:
    """A request that hangs past the timeout is retried like a 5xx."""
    crm.hang_every, crm.hang_seconds = 2, 1.5
    resource = ResourceConfig(
        name="contacts", options={**STYLES["cursor"], "params": {"limit": 200}}
    )
    rows = read_all(make_source(crm, timeout_seconds=0.3), resource, log, pauses)
    assert len(rows) == 600
    assert any("timed out" in r["problem"] for r in log.events("source_retry"))


def test_the_budget_ends_in_a_clear_error(
    crm: CrmServer, log: RecordingLog, pauses: list[float]
) -> None:
    """After max_retries the resource fails naming the path, attempts and last problem."""
    crm.always_fail = True
    resource = ResourceConfig(name="contacts", options=STYLES["cursor"])
    with pytest.raises(
        SourceError, match=r"^contacts: GET /v1/contacts failed after 3 attempts: HTTP 500$"
    ):
        read_all(make_source(crm, max_retries=2), resource, log, pauses)
    assert len(log.events("source_retry")) == 2


def test_other_4xx_fail_at_once_without_the_token(
    crm: CrmServer, log: RecordingLog, pauses: list[float]
) -> None:
    """A 401 is not retried; the error names the status, never the header's secret."""
    source = HttpSource.from_options(
        {"base_url": crm.url, "headers": {"Authorization": "Bearer wrong-but-secret-token"}}
    )
    resource = ResourceConfig(name="contacts", options=STYLES["cursor"])
    with pytest.raises(SourceError, match="HTTP 401") as info:
        read_all(source, resource, log, pauses)
    assert log.records == []
    assert "wrong-but-secret-token" not in str(info.value)
    assert "wrong-but-secret-token" not in scrubber.text("leaked Bearer wrong-but-secret-token")


def test_body_shapes_and_config_errors(
    crm: CrmServer, log: RecordingLog, pauses: list[float]
) -> None:
    """A records path that is not a list fails; bad options name their field."""
    resource = ResourceConfig(name="contacts", options={**STYLES["cursor"], "records": "meta"})
    with pytest.raises(SourceError, match=r"records path 'meta' is dict, not a list"):
        read_all(make_source(crm), resource, log, pauses)
    with pytest.raises(ConfigError, match=r"source\.base_url"):
        HttpSource.from_options({"base_url": "ftp://x"})
    sliced = ResourceConfig(name="contacts", slices=SPEC, options=STYLES["cursor"])
    with pytest.raises(ConfigError, match=r"resources\.contacts\.options\.window_params"):
        read_all(make_source(crm), sliced, log, pauses)
    bad = ResourceConfig(name="c", options={"path": "/x", "pagination": {"type": "sideways"}})
    with pytest.raises(ConfigError, match=r"resources\.c\.options\.pagination"):
        read_all(make_source(crm), bad, log, pauses)


def test_incremental_sends_the_mark_and_keeps_the_highest(
    crm: CrmServer, log: RecordingLog
) -> None:
    """``cursor_field`` tracks the highest value; ``since_param`` sends the last run's."""
    resource = ResourceConfig(
        name="contacts",
        options={**STYLES["cursor"], "cursor_field": "updated_at", "since_param": "updated_since"},
    )
    source = make_source(crm)
    ctx = ReadContext(log=log, since="2026-01-01T09:00:00Z")
    rows = [r for p in source.read(resource, None, ctx) for r in p]
    assert [r["id"] for r in rows] == list(range(540, 601))
    assert ctx.high_water == "2026-01-01T10:00:00Z"


def test_retry_after_forms() -> None:
    """Delta-seconds and HTTP dates; garbage is ignored."""
    assert retry_after("3") == 3.0
    assert retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after("soon") is None
    assert retry_after(None) is None


def test_credential_headers_are_scrubbed_and_ordinary_ones_are_not(crm: CrmServer) -> None:
    """A literal X-Api-Key value is a secret from then on; an Accept header is not."""
    HttpSource.from_options(
        {
            "base_url": crm.url,
            "headers": {"X-Api-Key": "literal-key-8d7f", "Accept": "application/vnd.crm+json"},
        }
    ).close()
    assert "literal-key-8d7f" not in scrubber.text("sent literal-key-8d7f")
    assert scrubber.text("sent application/vnd.crm+json") == "sent application/vnd.crm+json"
