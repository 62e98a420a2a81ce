"""Scrubbing removes credentials wherever they hide."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.scrub import REDACTED, Scrubber


@pytest.fixture
def scrubber() -> Scrubber:
    """A scrubber that knows one canary secret."""
    s = Scrubber()
    s.register(["s3cr3t-Canary/+&"])
    return s


@pytest.mark.parametrize(
    "text",
    [
        "auth failed for s3cr3t-Canary/+& on host",
        "GET /x?key=s3cr3t-Canary%2F%2B%26",
        '{"k": "s3cr3t-Canary/+&"}',
        "postgresql://quarry:hunter22@db:5432/app",
        "Authorization: Bearer abcdefghijklmnop123",
        "aws AKIAABCDEFGHIJKLMNOP here",
        "token ghp_abcdefghijklmnopqrstuvwxyz0123",
        "slack xoxb-1234567890-abcdefghij",
        "stripe sk_live_abcdefghijklmnop",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "password=hunter22 user=bob",
    ],
)
def test_text_shapes_are_removed(scrubber: Scrubber, text: str) -> None:
    """Known values, URL passwords and token shapes never survive."""
    cleaned = scrubber.text(text)
    assert REDACTED in cleaned
    for secret in (
        "s3cr3t-Canary",
        "hunter22",
        "abcdefghijklmnop",
        "AKIAABCDEFGHIJKLMNOP",
        "MIIEpAIBAAKCAQEA",
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
    ):
        assert secret not in cleaned


def test_secret_keys_at_any_depth(scrubber: Scrubber) -> None:
    """Values under secret-looking keys are redacted however deep they are."""
    data: dict[str, Any] = {
        "config": {"api_key": "x1", "nested": [{"Password": "p", "ok": "fine"}]},
        "rows": 3,
    }
    assert scrubber.data(data) == {
        "config": {"api_key": REDACTED, "nested": [{"Password": REDACTED, "ok": "fine"}]},
        "rows": 3,
    }


def test_processor_keeps_ordinary_events(scrubber: Scrubber) -> None:
    """The structlog processor leaves ordinary fields alone."""
    event = {"event": "slice_completed", "rows": 10, "resource": "events", "token": "abc"}
    assert scrubber(None, "info", event) == {
        "event": "slice_completed",
        "rows": 10,
        "resource": "events",
        "token": REDACTED,
    }


@given(st.text(alphabet="abcdeghikprstuwxyz_-:/.+ 0123456789", max_size=60))
def test_the_marker_trie_finds_what_the_literals_find(text: str) -> None:
    """The trie-shaped marker search matches exactly when some marker occurs in the text."""
    from worker.scrub import _MARKER_SEARCH, _MARKERS

    assert bool(_MARKER_SEARCH(text)) == any(marker in text for marker in _MARKERS)
