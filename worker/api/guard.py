"""The request guard: bounds every request before any other work is done for it."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api.responses import error

#: Largest request body accepted, read or declared.
MAX_BODY_BYTES = 1024 * 1024


class Guard:
    """Bounds every request before any other work: body size while it is read (413), NUL in
    the path or query (400).

    Plain ASGI rather than ``@app.middleware("http")``: that wrapper passes every
    response message through a memory stream and extra tasks, a cost paid by
    each page and by each event of each open stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _too_large()(scope, receive, send)
            return
        if length is None and (
            scope["method"] in {"POST", "PATCH", "PUT", "DELETE"}
            or any(k == b"transfer-encoding" for k, _ in scope["headers"])
        ):
            body = await _read_body(receive, MAX_BODY_BYTES)
            if body is None:
                await _too_large()(scope, receive, send)
                return
            receive = _replay(body, receive)
        # No store can hold NUL in text; a NUL in a filter or an id can match nothing.
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"\x00" in query or b"%00" in query:
            message = "NUL characters are not allowed in paths or query parameters"
            await error(400, message)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large() -> JSONResponse:
    # Connection: close, so the server reads no more of a body it has refused.
    return error(413, f"request body over {MAX_BODY_BYTES} bytes", {"Connection": "close"})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes ``limit`` bytes (the rest unread)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's own messages."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
