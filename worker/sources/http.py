"""The HTTP API source: a paginated JSON API, declared in the pipeline file.

The ``[source]`` table holds what every resource shares (``base_url``,
``headers`` — an auth header comes from an env secret, ``"Bearer ${CRM_TOKEN}"``
— timeouts and the retry budget); each resource's ``options`` hold its
``path``, the ``records`` path inside the JSON body, its ``pagination``
(``next_link``, ``cursor``, ``page`` or ``none``) and, for a sliced resource,
the query parameters its window goes in (``window_params``).

Failures: 429 waits ``Retry-After`` (seconds or an HTTP date, capped); 5xx,
timeouts and connection errors back off exponentially with jitter. Every retry
is a ``source_retry`` warning in the run log. When the budget is spent, or on
any other 4xx, the resource fails with the status and path named.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Iterator, Mapping
from datetime import UTC
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from worker.errors import ConfigError, SourceError
from worker.models import Event
from worker.pipelines import Bound, ResourceConfig, Window, parse_options
from worker.scrub import is_secret_key, scrubber
from worker.sources.base import ReadContext, Row

#: The most pages one slice may take: a loop guard against an API that links to itself.
MAX_PAGES = 1_000_000


class HttpConfig(BaseModel):
    """The ``[source]`` table of an HTTP pipeline."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=30.0, gt=0)
    #: Retries after the first attempt of one request (429, 5xx, timeouts).
    max_retries: int = Field(default=5, ge=0, le=100)
    backoff_seconds: float = Field(default=1.0, ge=0)
    max_backoff_seconds: float = Field(default=60.0, ge=0)
    #: A longer ``Retry-After`` than this is capped to it.
    max_retry_after_seconds: float = Field(default=300.0, ge=0)


class NoPagination(BaseModel):
    """One request per slice."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["none"] = "none"


class NextLink(BaseModel):
    """The body (``next`` path) or the ``Link: rel="next"`` header names the next page's URL."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["next_link"]
    #: Dotted path to the next URL in the body; empty: use the Link header.
    next: str = ""


class CursorPagination(BaseModel):
    """The body carries an opaque cursor sent back as a query parameter."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["cursor"]
    cursor_path: str
    cursor_param: str = "cursor"


class PageNumber(BaseModel):
    """``?page=N`` from ``start`` until an empty page (or ``total_pages_path`` says so)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["page"]
    page_param: str = "page"
    start: int = 1
    total_pages_path: str | None = None


Pagination = Annotated[
    NoPagination | NextLink | CursorPagination | PageNumber, Field(discriminator="type")
]


class WindowParams(BaseModel):
    """The query parameters a slice's window bounds go in, and their format."""

    model_config = ConfigDict(extra="forbid")
    start: str
    end: str | None = None
    format: Literal["iso", "unix", "unix_ms"] = "iso"


class HttpResource(BaseModel):
    """A resource's ``options``."""

    model_config = ConfigDict(extra="forbid")

    path: str
    #: Dotted path to the list of records; empty when the body is the list.
    records: str = ""
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    pagination: Pagination = Field(default_factory=NoPagination)
    window_params: WindowParams | None = None
    #: Incremental: the record field whose highest value is kept, sent as ``since_param``.
    cursor_field: str | None = None
    since_param: str | None = None


def dig(body: Any, path: str) -> Any:
    """``body`` at dotted ``path`` (``""`` is the body itself); None when absent."""
    node = body
    for part in filter(None, path.split(".")):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _format_bound(value: Bound, fmt: str) -> str | int:
    if isinstance(value, int):
        return value
    value = value.astimezone(UTC)
    if fmt == "unix":
        return int(value.timestamp())
    if fmt == "unix_ms":
        return int(value.timestamp() * 1000)
    return value.isoformat().replace("+00:00", "Z")


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpSource:
    """Reads paginated JSON resources over one HTTP client."""

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        # Credential headers (Authorization, X-Api-Key, Cookie, …) are scrubbed by value
        # wherever they would go, even when written literally instead of as ${ENV}.
        scrubber.register(v for k, v in config.headers.items() if is_secret_key(k))
        self.client = httpx.Client(
            base_url=config.base_url,
            headers=config.headers,
            timeout=config.timeout_seconds,
            follow_redirects=True,
        )
        self._specs: dict[str, HttpResource] = {}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> HttpSource:
        """Build from the pipeline's source table merged with run params."""
        return cls(parse_options(HttpConfig, options, "source"))

    def _spec(self, resource: ResourceConfig) -> HttpResource:
        spec = self._specs.get(resource.name)
        if spec is None:
            where = f"resources.{resource.name}.options"
            spec = parse_options(HttpResource, resource.options, where)
            if resource.slices is not None and spec.window_params is None:
                msg = f"{where}.window_params: a sliced resource needs its window's parameters"
                raise ConfigError(msg)
            self._specs[resource.name] = spec
        return spec

    def read(
        self, resource: ResourceConfig, window: Window | None, context: ReadContext
    ) -> Iterator[list[Row]]:
        """Follow the resource's pagination, one page of records per request."""
        spec = self._spec(resource)
        params: dict[str, Any] = {**self.config.params, **spec.params}
        if window is not None and spec.window_params is not None:
            wp = spec.window_params
            params[wp.start] = _format_bound(window.start, wp.format)
            if wp.end:
                params[wp.end] = _format_bound(window.end, wp.format)
        if context.since is not None and spec.since_param:
            params[spec.since_param] = context.since
        pagination = spec.pagination
        url: str = spec.path
        if isinstance(pagination, PageNumber):
            params[pagination.page_param] = pagination.start
        query: dict[str, Any] | None = params
        request = (url, query)
        for _ in range(MAX_PAGES):
            response = self._get(url, query, resource.name, context)
            body = self._json(response, resource.name)
            records = dig(body, spec.records)
            if not isinstance(records, list):
                msg = (
                    f"{resource.name}: records path {spec.records or '(body)'!r} "
                    f"is {type(records).__name__}, not a list"
                )
                raise SourceError(msg)
            page = [r if isinstance(r, dict) else {"value": r} for r in records]
            if spec.cursor_field is not None:
                marks = [r[spec.cursor_field] for r in page if r.get(spec.cursor_field) is not None]
                if marks:
                    context.observe(max(marks))
            if page:
                yield page
            following = self._next(pagination, body, response, query or {}, page)
            if following is None:
                return
            if following == request:
                msg = f"{resource.name}: the API's next page is the page just read; stopping"
                raise SourceError(msg)
            request = following
            url, query = following
        msg = f"{resource.name}: more than {MAX_PAGES:,} pages; the API's pagination loops"
        raise SourceError(msg)

    @staticmethod
    def _next(
        pagination: Any,
        body: Any,
        response: httpx.Response,
        params: dict[str, Any],
        page: list[Row],
    ) -> tuple[str, dict[str, Any] | None] | None:
        if isinstance(pagination, NextLink):
            link = dig(body, pagination.next) if pagination.next else None
            if not pagination.next:
                link = response.links.get("next", {}).get("url")
            # The next link carries its own query string (an empty params dict would drop it).
            return (str(link), None) if link else None
        if isinstance(pagination, CursorPagination):
            cursor = dig(body, pagination.cursor_path)
            if cursor in (None, ""):
                return None
            return str(response.request.url.copy_with(query=None)), {
                **params,
                pagination.cursor_param: cursor,
            }
        if isinstance(pagination, PageNumber):
            current = int(params[pagination.page_param])
            total = dig(body, pagination.total_pages_path) if pagination.total_pages_path else None
            if not page or (isinstance(total, int) and current >= total):
                return None
            return str(response.request.url.copy_with(query=None)), {
                **params,
                pagination.page_param: current + 1,
            }
        return None

    def _get(
        self, url: str, params: dict[str, Any] | None, resource: str, context: ReadContext
    ) -> httpx.Response:
        """One GET under the retry budget; the last failure becomes a SourceError."""
        cfg = self.config
        attempts = cfg.max_retries + 1
        path = httpx.URL(url).path or url
        for attempt in range(1, attempts + 1):
            wait: float | None = None
            try:
                response = self.client.get(url, params=params)
            except httpx.TimeoutException:
                problem = f"timed out after {cfg.timeout_seconds:g}s"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__})"
            else:
                status = response.status_code
                if status < 400:
                    return response
                problem = f"HTTP {status}"
                if status == 429:
                    asked = retry_after(response.headers.get("Retry-After"))
                    wait = None if asked is None else min(asked, cfg.max_retry_after_seconds)
                elif status < 500:
                    msg = f"{resource}: GET {path} returned HTTP {status}: {_snippet(response)}"
                    raise SourceError(scrubber.text(msg))
            if attempt == attempts:
                msg = f"{resource}: GET {path} failed after {attempts} attempts: {problem}"
                # The server or the network kept failing: a later run may find it back.
                raise SourceError(scrubber.text(msg), retryable=True)
            if wait is None:
                ceiling = min(cfg.max_backoff_seconds, cfg.backoff_seconds * 2 ** (attempt - 1))
                wait = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto
            context.log.warning(
                Event.SOURCE_RETRY,
                message=(
                    f"{problem} from GET {path}; retrying in {wait:.1f}s "
                    f"(attempt {attempt + 1}/{attempts})"
                ),
                resource=resource,
                problem=problem,
                wait_seconds=round(wait, 3),
                attempt=attempt + 1,
                max_attempts=attempts,
            )
            context.pause(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _json(response: httpx.Response, resource: str) -> Any:
        try:
            return response.json()
        except ValueError:
            msg = (
                f"{resource}: GET {response.request.url.path} returned a body that is not JSON: "
                f"{_snippet(response)}"
            )
            raise SourceError(scrubber.text(msg)) from None

    def close(self) -> None:
        """Close the HTTP client's connections."""
        self.client.close()


def _snippet(response: httpx.Response) -> str:
    text = response.text[:200].replace("\n", " ")
    return text or "(empty body)"
