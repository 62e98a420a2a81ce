"""The scrubber against a corpus of credential shapes that grows with every one found."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.scrub import REDACTED, Scrubber

CORPUS = Path(__file__).parent / "scrub_corpus"


def _cases(name: str) -> list[str]:
    """The cases of a corpus file: its lines, or for leaks.txt its «»-marked cases."""
    text = (CORPUS / name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if name != "leaks.txt":
        return lines
    # A case may span lines (a PEM key): join lines while a « is open.
    cases: list[str] = []
    for line in lines:
        if cases and cases[-1].count("«") > cases[-1].count("»"):
            cases[-1] += "\n" + line
        else:
            cases.append(line)
    return cases


@pytest.mark.parametrize("case", _cases("leaks.txt"))
def test_no_marked_secret_survives(case: str) -> None:
    """Every marked secret is gone from the scrubbed text, in messages and as data."""
    secrets = re.findall(r"«(.*?)»", case, flags=re.DOTALL)
    assert secrets, f"a leaks.txt case marks no secret: {case!r}"
    text = case.replace("«", "").replace("»", "")
    for cleaned in (Scrubber().text(text), str(Scrubber().data({"message": [text]}))):
        assert REDACTED in cleaned
        for secret in secrets:
            # Not one word of it left: a half-redacted secret is a leaked secret.
            for word in re.findall(r"[A-Za-z0-9]{5,}", secret):
                assert word not in cleaned, (word, text, cleaned)


@pytest.mark.parametrize("line", _cases("clean.txt"))
def test_ordinary_text_is_left_alone(line: str) -> None:
    """Lines with no credential come out unchanged."""
    assert Scrubber().text(line) == line
