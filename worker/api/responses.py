"""What every route answers with: JSON errors (and their OpenAPI description), JSON bodies
that survive any stored value, and pages built around the store's own JSON bytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from worker import jsonfmt
from worker.scrub import scrubber
from worker.store.reads import JsonPage

#: What a client is told to wait before retrying while the store is unreachable.
RETRY_AFTER_SECONDS = 5


class ErrorDetail(BaseModel):
    """The error of a refused request."""

    status: int
    message: str


class ErrorBody(BaseModel):
    """Every error this API answers: ``{"error": {"status": 404, "message": "…"}}``."""

    error: ErrorDetail


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route can answer (all JSON ErrorBody)."""
    reasons = {
        400: "A parameter is malformed, unknown, or a token was put in the URL.",
        401: "No bearer token, or a token that is unknown or revoked.",
        403: "The token's scope does not allow this.",
        404: "No such run (or not one this token may see).",
        409: "The run's state or lease does not allow this change.",
        413: "The request body is over 1 MiB.",
        422: "The body or a parameter fails validation; the message names the field.",
        503: "The store (or the broker, for a trigger) is unreachable; retry after Retry-After.",
    }
    return {
        code: {"model": ErrorBody, "description": reasons[code]}
        for code in sorted({400, 413, 422, 503, *codes})
    }


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": scrubber.text(message)}},
        status_code=status,
        headers=headers,
    )


def unavailable() -> JSONResponse:
    return error(
        503,
        "the store is unreachable; retry shortly",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def json_body(value: Any, status_code: int = 200) -> Response:
    """A JSON response that survives a stored value no encoder can write (see jsonfmt)."""
    return Response(jsonfmt.safe_bytes(value), status_code, media_type="application/json")


def page_response(page: JsonPage, *, null_cursor: bool) -> Response:
    """``{"entries": [...], "cursor": "<id>"}`` around the store's JSON, FastAPI's encoder skipped.

    The cursor is a string; on the last page it is null (``null_cursor``) or absent.
    """
    if page.cursor is not None:
        tail = b',"cursor":"%d"}' % page.cursor
    else:
        tail = b',"cursor":null}' if null_cursor else b"}"
    return Response(b"".join((b'{"entries":', page.entries, tail)), media_type="application/json")
