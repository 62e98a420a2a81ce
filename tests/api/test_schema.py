"""Schemathesis over the published OpenAPI document, every check: the document tells the truth.

``st run --checks all`` fuzzes every operation (examples, coverage, fuzzing and
stateful phases) and checks each answer: no 5xx, only documented status codes,
content types and headers, responses matching their schemas, schema-invalid
requests refused and schema-valid ones accepted, ``Allow`` on every 405.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures

ST = Path(sys.executable).parent / "st"


def test_every_check_passes_on_every_operation(api: Api, tmp_path: Path) -> None:  # noqa: F811
    """``st run --checks all`` finds no failure; an open stream is left to test_stream.py."""
    _, secret = api.store.create_token("operator")
    api.store.create_run("demo")
    api.store.create_run("demo", gateway="east")
    result = subprocess.run(
        [
            str(ST),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{api.url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {secret}",
            "--exclude-path-regex",
            "/logs/stream$",
            "--max-examples",
            "40",
            "--seed",
            "20261127",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    failures = result.stdout.find("FAILURES")
    report = result.stdout[max(failures, 0) :][:12000] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "generated" in result.stdout, report
