"""Scrubbing: one function that removes credentials from anything Quarry emits.

It runs as the first structlog processor (so before the store and stdout) and
on every error summary. It removes values under secret-looking keys at any
depth, the known secret values the process registered (pipeline secrets,
credentials from the environment) in their raw, URL-encoded and JSON-escaped
forms, passwords inside URLs, and well-known token shapes.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from worker.errors import first_line

#: What replaces a secret.
REDACTED = "[REDACTED]"

#: Key names (lower-cased, ``-`` read as ``_``) whose values are always secret.
SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "auth_header",
    "credential",
    "private_key",
    "access_key",
    "session_key",
    "cookie",
    "dsn",
)

#: Secrets shorter than this are not scrubbed by value: they would mangle ordinary text.
MIN_SECRET_LENGTH = 4

#: Token shapes of the major clouds, SaaS APIs and auth schemes, matched anywhere in text.
_SHAPE_PATTERNS = (
    r"(?i:bearer|token|apikey|api-key|digest|basic|negotiate)\s+[A-Za-z0-9\-._~+/=]{8,}",
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{20,}\b",
    r"\bgithub_pat_[A-Za-z0-9_]{20,}\b",
    r"\bglpat-[A-Za-z0-9_\-]{20,}",
    r"\bxox[abposre]-[A-Za-z0-9-]{10,}\b",
    r"hooks\.slack\.com/services/[A-Za-z0-9/]{20,}",
    r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{10,}\b",
    r"\bsk-(?:proj-|ant-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",
    r"\bAIza[0-9A-Za-z_\-]{35}",
    r"\bya29\.[0-9A-Za-z_\-]{20,}",
    r"\bhf_[A-Za-z0-9]{30,}",
    r"\bnpm_[A-Za-z0-9]{36}\b",
    r"\bpypi-[A-Za-z0-9_\-]{50,}",
    r"\bSG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}",
    r"\bdop_v1_[a-f0-9]{64}\b",
    r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}\b",
    r"\bATATT[A-Za-z0-9_\-=]{40,}",
    r"\bq(?:ry|rs)_[A-Za-z0-9_\-]{20,}",
    r"(?<=[?&;]sig=)[A-Za-z0-9%+/=]{10,}",
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
)
_SHAPES = re.compile("|".join(_SHAPE_PATTERNS))
#: A bare 40-character AWS secret access key: base64 letters with upper case, lower case
#: and a digit (a SHA-1 in hex has no upper case), standing alone.
_BARE_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
# scheme://user:password@host — keep the user and the host, drop the password (which may
# itself hold '/' or '@': it runs to the last '@' before the host).
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@\"'<>]*:)(?P<pw>[^\s\"'<>]+)@(?=[^\s@\"'<>/]+)"
)
#: Key names in text (any case, ``-``, ``_`` or nothing between words) whose value is secret.
_TEXT_KEYS = (
    r"passw(?:or)?d|pwd|secret|token|api[-_]?key|authorization|auth[-_]?header|credential"
    r"|private[-_]?key|access[-_]?key|session[-_]?key|cookie|dsn|account[-_]?key"
)
# key=value, key: value, "key": "value", 'key': 'value' — the value quoted or bare.
_KEY_VALUE = re.compile(
    r"(?P<key>(?i:" + _TEXT_KEYS + r")[A-Za-z0-9_\-]*)"
    r"(?P<sep>[\"']?\s*[=:]\s*)"
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\s\"'&,;}]+)"
)
# Authorization-like headers: the quoted value, or the rest of the line, whatever the scheme.
_HEADER = re.compile(
    r"(?P<key>(?i:(?:proxy-)?authorization|x-api-key|x-auth-token|cookie|set-cookie))"
    r"(?P<sep>[\"']?\s*:\s*)"
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\r\n]+)"
)
# PASSWORD 'x', IDENTIFIED BY x, password x: a secret after a word, not a separator.
_WORD_VALUE = re.compile(
    r"(?P<key>\b(?i:passw(?:or)?d|pwd|identified\s+by))(?P<sep>\s+)"
    r"(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s\"',;)]+)"
)


#: Lower-case literals at least one of which every pattern above but the bare AWS secret
#: needs to match: any of them means the text is scanned in full.
_MARKERS = (
    "bearer",
    "basic",
    "digest",
    "negotiate",
    "akia",
    "asia",
    "agpa",
    "aida",
    "aroa",
    "anpa",
    "anva",
    "aipa",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xox",
    "hooks.slack",
    "k_live_",
    "k_test_",
    "sk-",
    "aiza",
    "ya29.",
    "hf_",
    "npm_",
    "pypi-",
    "sg.",
    "dop_v1_",
    "shpat_",
    "shpca_",
    "shppa_",
    "shpss_",
    "atatt",
    "eyj",
    "qry_",
    "qrs_",
    "private key-----",
    "://",
    "pwd",
    "passw",
    "secret",
    "token",
    "authorization",
    "auth_header",
    "auth-header",
    "credential",
    "key",
    "cookie",
    "dsn",
    "sig=",
    "identified",
)


#: Context Quarry binds itself (ids, counters): never secret, not worth scanning.
_TRUSTED_KEYS = frozenset({"run_id", "worker_id", "attempt", "epoch", "event"})


def literal_trie(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, its alternation shaped as a trie of their prefixes.

    The regex engine tries the alternatives of a flat ``a|b|c`` one by one at every
    position; in a trie each position costs one branch per distinct next character,
    which halves the marker search on ordinary text.
    """
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + emit(node[char]) for char in sorted(node) if char]
        if not branches:
            return ""
        group = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # A word ends here: anything after it is optional (its match already counts).
        return "" if "" in node else group

    return emit(root)


#: Any marker, as one search over a trie of the literals.
_MARKER_SEARCH = re.compile(literal_trie(_MARKERS)).search
#: The shortest text that can hold a bare AWS secret key (most log text is shorter).
_AWS_SECRET_LENGTH = 40


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a key (a data field, a header name) names a secret: ``X-Api-Key``, ``password``."""
    name = key.lower().replace("-", "_")
    return any(part in name for part in SECRET_KEY_PARTS)


def _keep_key(match: re.Match[str]) -> str:
    """The key and separator of a key-value match, its value redacted (quotes kept)."""
    value = match.group("value")
    if value == REDACTED or value.strip("\"'") == REDACTED:
        return match.group(0)
    quote = value[0] if value[:1] in {'"', "'"} else ""
    return f"{match.group('key')}{match.group('sep')}{quote}{REDACTED}{quote}"


def _aws_secret(match: re.Match[str]) -> str:
    """A 40-character run redacted when it mixes upper case, lower case and digits."""
    text = match.group(0)
    mixed = (
        any(c.isupper() for c in text)
        and any(c.islower() for c in text)
        and any(c.isdigit() for c in text)
    )
    return REDACTED if mixed else text


#: Types ``isinstance`` tests on every log call, as tuples: a ``int | float`` union in
#: the call is built anew each time and tests at a third of the speed.
_SCALARS = (int, float, bool)
_SEQUENCES = (list, tuple, set, frozenset)


class Scrubber:
    """Removes secrets from strings and nested data; knows the process's secret values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._value_pattern: re.Pattern[str] | None = None

    def register(self, values: Iterable[str | None]) -> None:
        """Remember secret values so they are scrubbed wherever they appear."""
        with self._lock:
            for value in values:
                if not value or len(value) < MIN_SECRET_LENGTH:
                    continue
                self._values.add(value)
                self._values.add(urllib.parse.quote(value, safe=""))
                self._values.add(urllib.parse.quote_plus(value))
                self._values.add(json.dumps(value)[1:-1])
            ordered = sorted(self._values, key=len, reverse=True)
            self._value_pattern = (
                re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None
            )

    def text(self, value: str) -> str:
        """``value`` with every known secret, URL password and token shape removed."""
        pattern = self._value_pattern
        if pattern is not None and pattern.search(value):
            value = pattern.sub(REDACTED, value)
        # The regexes below cost microseconds per string; one search for their literal
        # markers costs a fraction of that and rules out most text.
        if not _MARKER_SEARCH(value.lower()):
            if len(value) < _AWS_SECRET_LENGTH or not _BARE_AWS_SECRET.search(value):
                return value
            return _BARE_AWS_SECRET.sub(_aws_secret, value)
        value = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED + "@", value)
        value = _HEADER.sub(_keep_key, value)
        value = _SHAPES.sub(REDACTED, value)
        value = _BARE_AWS_SECRET.sub(_aws_secret, value)
        value = _WORD_VALUE.sub(_keep_key, value)
        return _KEY_VALUE.sub(_keep_key, value)

    def data(self, value: Any) -> Any:
        """A copy of ``value`` with secret keys and secret text removed at any depth."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {
                k: (REDACTED if isinstance(k, str) and is_secret_key(k) else self.data(v))
                for k, v in value.items()
            }
        if isinstance(value, _SEQUENCES):
            return [self.data(v) for v in value]
        return value

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """structlog processor: scrub the whole event dict."""
        out: dict[str, Any] = {}
        for key, value in event_dict.items():
            if key in _TRUSTED_KEYS:
                out[key] = value
            elif is_secret_key(key):
                out[key] = REDACTED
            elif isinstance(value, str):
                out[key] = self.text(value)
            elif isinstance(value, _SCALARS) or value is None:
                out[key] = value
            else:
                out[key] = self.data(value)
        return out


#: The process-wide scrubber.
scrubber = Scrubber()


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, scrubbed: an error as one log or status line."""
    return f"{type(exc).__name__}: {scrubber.text(first_line(exc))}"


def scrub(value: str) -> str:
    """Scrub a string with the process-wide scrubber."""
    return scrubber.text(value)
