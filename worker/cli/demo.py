"""``quarry demo``: the demo pipeline on a real worker process, followed live."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from worker.cli import console as view
from worker.cli import runs
from worker.cli.common import (
    err,
    fail,
    open_store,
    out,
)
from worker.errors import ConfigError
from worker.models import Status
from worker.pipelines import load_pipelines
from worker.runtime import prepare_store
from worker.settings import Settings, get_settings


def _demo_pipelines(settings: Settings) -> Path:
    """The configured pipelines file if it declares ``demo``, else the packaged one."""
    try:
        if "demo" in load_pipelines(settings.pipelines_file):
            return settings.pipelines_file
    except ConfigError:
        pass
    return Path(str(resources.files("worker") / "demo_pipelines.toml"))


def demo(
    timeout: Annotated[
        float, typer.Option(metavar="SECONDS", help="Give up after this many seconds.")
    ] = 300.0,
) -> None:
    """Run the demo pipeline on a real worker process and follow it live."""
    settings = get_settings()
    pipelines_file = _demo_pipelines(settings).resolve()
    env = {**os.environ, "QUARRY_PIPELINES_FILE": str(pipelines_file)}
    os.environ["QUARRY_PIPELINES_FILE"] = str(pipelines_file)
    get_settings.cache_clear()
    settings = get_settings()
    prepare_store()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    worker_log = settings.data_dir / "demo-worker.log"
    err.print(f"starting a worker (celery -A worker worker), its log: {worker_log}")
    with worker_log.open("ab") as sink:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "--concurrency",
                "1",
                "--loglevel",
                "warning",
                "--hostname",
                f"quarry-demo-{os.getpid()}@%h",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        store = open_store(settings)
        run_id = runs.trigger_run(store, "demo", {})
        err.print(f"triggered run {run_id} of pipeline 'demo'")
        deadline = time.monotonic() + timeout
        run = view.follow(
            store,
            run_id,
            out,
            alive=lambda: worker.poll() is None and time.monotonic() < deadline,
        )
    finally:
        _stop_worker(worker)
    if run.status is Status.SUCCEEDED:
        summary = run.telemetry_summary
        where = settings.files_root / "demo" / run_id
        out.print(
            f"\n[bold green]demo succeeded[/]: {int(summary.get('rows_loaded', 0)):,} rows in "
            f"{int(summary.get('files_written', 0)):,} files under {where}"
        )
        return
    if worker.returncode not in (None, 0, -signal.SIGTERM):
        fail(f"the worker exited with {worker.returncode}; see {worker_log}")
    fail(f"demo run {run_id} ended {run.status.value}: {run.error_summary or 'see its logs'}")


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm-stop the worker with SIGTERM, as a deploy would; kill it if it hangs."""
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
