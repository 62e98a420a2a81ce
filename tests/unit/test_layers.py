"""The sealed Celery edge: what a module loads when it is imported, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = """
import sys
import {module}
loaded = sorted(m for m in sys.modules if m == "celery" or m.startswith(("celery.", "worker.tasks", "worker.runner", "worker.celery_app", "scheduler")))
print(",".join(loaded))
"""


@pytest.mark.parametrize(
    "module",
    ["worker", "worker.models", "worker.store", "worker.api", "worker.cli", "worker.api.external"],
)
def test_importing_leaves_celery_out(module: str) -> None:
    """The models, the store, the API and the CLI load neither Celery, the runner nor the tasks."""
    result = subprocess.run(
        [sys.executable, "-c", _CHECK.format(module=module)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == ""


def test_the_celery_app_is_found_lazily() -> None:
    """``celery -A worker`` still finds the app, with every task registered."""
    code = (
        "import worker; app = worker.app; app.loader.import_default_modules(); "
        "print(sorted(t for t in app.tasks if t.startswith('quarry.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == (
        "['quarry.execute_run', 'quarry.retention', 'quarry.schedule_tick', 'quarry.watchdog', 'quarry.webhook']"
    )
