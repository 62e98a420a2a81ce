"""Every scope against every endpoint: the answer each one must get."""

from __future__ import annotations

import pytest

from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures
from worker.models import Status

SCOPES = ["none", "operator", "read", "gateway-own", "gateway-other", "revoked"]

#: endpoint -> status per scope, in SCOPES order.
MATRIX = {
    ("GET", "/api/v1/action-runs"): [401, 200, 200, 200, 200, 401],
    ("GET", "/api/v1/action-runs/{run}"): [401, 200, 200, 200, 404, 401],
    ("POST", "/api/v1/action-runs"): [401, 201, 403, 403, 403, 401],
    ("POST", "/api/v1/action-runs/{run}/cancel"): [401, 200, 403, 403, 403, 401],
    ("PATCH", "/api/v1/action-runs/{run}"): [401, 409, 403, 409, 404, 401],
    ("GET", "/api/v1/action-runs/{run}/logs"): [401, 200, 200, 200, 404, 401],
    ("GET", "/api/v1/action-runs/{ended}/logs/stream"): [401, 200, 200, 200, 404, 401],
    ("GET", "/api/v1/logs"): [401, 200, 200, 403, 403, 401],
    ("GET", "/api/v1/agent/runs"): [401, 403, 403, 200, 200, 401],
}


@pytest.mark.parametrize(("method", "path"), list(MATRIX), ids=str)
def test_scope_matrix(api: Api, method: str, path: str) -> None:  # noqa: F811
    """Each scope gets exactly the status the matrix says, with a JSON error body on refusal."""
    revoked, revoked_secret = api.store.create_token("operator")
    api.store.revoke_token(revoked.id)
    secrets = {
        "none": None,
        "operator": api.store.create_token("operator")[1],
        "read": api.store.create_token("read")[1],
        "gateway-own": api.store.create_token("gateway:east")[1],
        "gateway-other": api.store.create_token("gateway:west")[1],
        "revoked": revoked_secret,
    }
    got = []
    for scope in SCOPES:
        run = api.store.create_run("demo", gateway="east")
        ended = api.store.create_run("demo", gateway="east")
        api.store.transition(ended.id, Status.QUEUED, Status.CANCELLED)
        url = path.format(run=run.id, ended=ended.id)
        headers = {"Authorization": f"Bearer {secrets[scope]}"} if secrets[scope] else {}
        body = {"pipeline": "demo"} if path == "/api/v1/action-runs" and method == "POST" else {}
        response = api.client.request(
            method, url, headers=headers, json=body if method != "GET" else None
        )
        got.append(response.status_code)
        if response.status_code >= 400:
            assert response.json()["error"]["status"] == response.status_code
    assert got == MATRIX[(method, path)], dict(zip(SCOPES, got, strict=True))
