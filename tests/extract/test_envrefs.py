"""``${ENV}`` references in pipeline config."""

from __future__ import annotations

import pytest

from worker.envrefs import resolve
from worker.errors import ConfigError


def test_references_resolve_at_any_depth_and_are_reported_as_secrets() -> None:
    """Strings in nested tables and lists resolve; every substituted value comes back."""
    value, secrets = resolve(
        {"url": "postgresql://etl:${PW}@db/x", "headers": {"Authorization": "Bearer ${TOKEN}"},
         "list": ["${PW}", 3], "n": 5},
        "source",
        {"PW": "s3cr3t-pw", "TOKEN": "tok-123456"},
    )  # fmt: skip
    assert value == {
        "url": "postgresql://etl:s3cr3t-pw@db/x",
        "headers": {"Authorization": "Bearer tok-123456"},
        "list": ["s3cr3t-pw", 3],
        "n": 5,
    }
    assert secrets == {"s3cr3t-pw", "tok-123456"}


def test_a_missing_variable_names_the_field_and_the_variable() -> None:
    """The error says where the reference is and what is unset, nothing more."""
    with pytest.raises(
        ConfigError,
        match=r"^source\.headers\.Authorization: environment variable CRM_TOKEN is not set$",
    ):
        resolve({"headers": {"Authorization": "Bearer ${CRM_TOKEN}"}}, "source", {})


def test_malformed_reference_and_escape() -> None:
    """``${not valid}`` is an error; ``$${X}`` is a literal ``${X}``."""
    with pytest.raises(ConfigError, match="not a valid environment variable reference"):
        resolve({"a": "${not valid}"}, "destination", {})
    value, secrets = resolve({"a": "cost: $${PRICE}"}, "source", {"PRICE": "1"})
    assert value == {"a": "cost: ${PRICE}"}
    assert secrets == set()
