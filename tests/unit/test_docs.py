"""The docs keep up with the code: every module is in the design's map, no doc reads like a diary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DESIGN = (REPO / "docs" / "design.md").read_text(encoding="utf-8")


def _modules() -> list[str]:
    found = []
    for package in ("worker", "scheduler"):
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if "/migrations/" not in relative:
                found.append(relative)
    return found


@pytest.mark.parametrize("module", _modules())
def test_every_module_is_in_the_design_map(module: str) -> None:
    """A module added under worker/ or scheduler/ must be described in docs/design.md."""
    assert f"`{module}`" in DESIGN, f"{module} is missing from the module map in docs/design.md"


@pytest.mark.parametrize(
    "doc", ["README.md", *sorted(p.name for p in (REPO / "docs").glob("*.md"))]
)
def test_docs_state_the_present(doc: str) -> None:
    """No dates, commit hashes or session diary in the README or docs/."""
    path = REPO / doc if doc == "README.md" else REPO / "docs" / doc
    text = path.read_text(encoding="utf-8")
    diary = re.compile(
        r"this session|last session|\(changed\)|`[0-9a-f]{7,40}`|"
        r"\b20[0-9]{2}-[01][0-9]-[0-3][0-9](?![T0-9])"
    )
    assert diary.findall(text) == []


def test_no_benchmark_figures_in_code_comments() -> None:
    """Figures belong in docs/benchmarks.md with their command, not in comments."""
    figure = re.compile(r"#.*\b\d+(?:\.\d+)?\s?(?:ms|µs|us)\b")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for package in ("worker", "scheduler")
        for path in (REPO / package).rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if figure.search(line)
    ]
    assert offenders == []
