"""The deploy files parse, name commands that exist, and keep the shutdown timings consistent."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.pipelines import Pipeline
from worker.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BIN = Path(sys.executable).parent
DEFAULTS = Settings()
#: The orchestrator's kill must come after the worker's own worst-case exit.
WORST_CASE_EXIT = DEFAULTS.shutdown_grace_seconds + DEFAULTS.soft_shutdown_seconds + 3


def compose() -> dict[str, Any]:
    """The compose file."""
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s() -> list[dict[str, Any]]:
    """Every Kubernetes object."""
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "quarry.yaml").read_text()) if d]


def unit(name: str) -> configparser.ConfigParser:
    """A systemd unit file."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def commands() -> list[list[str]]:
    """Every command the deploy files run."""
    services = compose()["services"].values()
    found = [s["command"] for s in services if "build" in s]  # the Quarry image's services
    for doc in k8s():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        found += [c["command"] for c in spec.get("containers", []) if "command" in c]
        jobs = doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        assert all(c.get("image", "").startswith("quarry") for c in jobs)
    for name in ("quarry-worker@.service", "quarry-beat.service", "quarry-api.service"):
        argv = shlex.split(unit(name)["Service"]["ExecStart"])
        found.append([Path(argv[0]).name, *argv[1:]])
    return found


def seconds(value: str | int) -> float:
    """``30s`` / ``30`` → 30."""
    match = re.fullmatch(r"(\d+)s?", str(value))
    assert match, value
    return float(match.group(1))


@pytest.mark.parametrize("argv", sorted({tuple(c[:4]) for c in commands()}), ids=" ".join)
def test_every_command_exists(argv: tuple[str, ...]) -> None:
    """Each deploy command is a real celery or quarry subcommand (its --help succeeds)."""
    program, *rest = argv
    assert program in {"celery", "quarry"}
    if program == "celery":
        assert rest[:2] == ["-A", "worker"]
        sub = rest[:3]
    else:
        sub = [a for a in rest if not a.startswith("-")][:2]
    result = subprocess.run(
        [str(BIN / program), *sub, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_quarry_variable_is_a_setting() -> None:
    """No deploy file sets a QUARRY_ variable that Settings does not read."""
    names: set[str] = set()
    names |= set(compose()["x-quarry"]["environment"])
    for doc in k8s():
        if doc["kind"] == "ConfigMap":
            names |= {k for k in doc["data"] if k.startswith("QUARRY_")}
    for line in (DEPLOY / "systemd" / "quarry.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("=", 1)[0])
    fields = {f"QUARRY_{name.upper()}" for name in Settings.model_fields}
    assert names
    assert names <= fields, names - fields


def test_shutdown_timings_fit_inside_the_kill_deadlines() -> None:
    """Grace periods exceed the worker's own worst-case exit, everywhere."""
    for name in ("worker-1", "worker-2"):
        assert seconds(compose()["services"][name]["stop_grace_period"]) > WORST_CASE_EXIT
    worker = next(d for d in k8s() if d["metadata"]["name"] == "quarry-worker")
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > WORST_CASE_EXIT
    assert worker["spec"]["strategy"]["type"] == "RollingUpdate"
    service = unit("quarry-worker@.service")["Service"]
    assert service["KillMode"] == "mixed"
    assert seconds(service["TimeoutStopSec"]) > WORST_CASE_EXIT


def test_single_beat_and_durable_broker() -> None:
    """One beat replica; Redis keeps its messages and never evicts one."""
    beat = next(d for d in k8s() if d["metadata"]["name"] == "quarry-beat")
    assert beat["spec"]["replicas"] == 1
    redis = compose()["services"]["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert {"postgres", "redis", "api", "worker-1", "worker-2", "beat"} <= set(
        compose()["services"]
    )


def test_packaged_pipelines_validate() -> None:
    """The pipelines file shipped in the Kubernetes ConfigMap is valid."""
    cm = next(d for d in k8s() if d["metadata"]["name"] == "quarry-pipelines")
    document = tomllib.loads(cm["data"]["pipelines.toml"])
    pipelines = [
        Pipeline.model_validate({"name": n, **b}) for n, b in document["pipelines"].items()
    ]
    assert [p.name for p in pipelines] == ["demo"]


def test_readme_states_the_deadline_relation() -> None:
    """The README's operations section ties the shutdown to the orchestrators' deadlines."""
    readme = (DEPLOY.parent / "README.md").read_text()
    for needle in (
        "terminationGracePeriodSeconds",
        "TimeoutStopSec",
        "QUARRY_SHUTDOWN_GRACE_SECONDS",
    ):
        assert needle in readme
