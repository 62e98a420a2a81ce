"""The deploy files parse, name commands that exist, and keep the shutdown timings consistent;
the Prometheus rules and the Grafana dashboard check and name only series Quarry exports."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require
from worker import workermetrics
from worker.api.metrics import StoreCollector
from worker.models import Lease, Status
from worker.pipelines import Pipeline
from worker.settings import Settings
from worker.store import Store

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
    for service in compose()["services"].values():
        names |= {k for k in service.get("environment", {}) if k.startswith("QUARRY_")}
    for doc in k8s():
        if doc["kind"] == "ConfigMap":
            names |= {k for k in doc["data"] if k.startswith("QUARRY_")}
        for container in (
            doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            names |= {
                e["name"] for e in container.get("env", []) if e["name"].startswith("QUARRY_")
            }
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


# -- Prometheus and Grafana ---------------------------------------------------------------

PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "quarry.json"
#: Grafana's variables, as a query sees them once substituted.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$pipeline": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool in deploy/prometheus (skipped locally without it, required in CI)."""
    found = shutil.which("promtool")
    if found is None:
        require("promtool", FileNotFoundError("promtool is not on PATH (Debian: prometheus)"))
    assert found is not None
    return subprocess.run(
        [found, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the Grafana dashboard: panel targets and variable queries."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert query, variable["definition"]
            exprs.append(query.group(1))
    return exprs


def rule_exprs() -> list[str]:
    """Every expression of the example alert and recording rules."""
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def exported_series(tmp_path: Path) -> set[str]:
    """Every sample name Quarry exports: the API's /metrics over a store that has seen a run
    (so its histograms have buckets) and a worker's own series."""
    store = Store(f"sqlite:///{tmp_path / 'quarry.db'}")
    store.upgrade()
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w", 30)
    assert isinstance(lease, Lease)
    store.finish(lease, Status.SUCCEEDED)
    registry = CollectorRegistry(auto_describe=False)
    settings = Settings(data_dir=tmp_path, pipelines_file=DEPLOY.parent / "pipelines.toml")
    registry.register(StoreCollector(store, settings))
    for series in vars(workermetrics._Metrics()).values():
        registry.register(series)
    text = generate_latest(registry).decode()
    store.close()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_and_rules_name_only_exported_series(tmp_path: Path) -> None:
    """The dashboard parses, and every quarry_ series its panels and the alert rules name is
    one Quarry exports (a renamed series breaks this test, not a graph at 3 a.m.)."""
    exported = exported_series(tmp_path)
    assert {"quarry_runs_ended_total", "quarry_worker_runs_in_progress"} <= exported
    named = {
        name
        for expr in dashboard_exprs() + rule_exprs()
        for name in re.findall(r"\bquarry_[a-z_]+", expr)
    }
    assert named
    assert named <= exported, named - exported
    board = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    """promtool: the scrape config and the rules check, the alerts' unit tests pass, and every
    dashboard query parses as PromQL (as a recording rule of a scratch file)."""
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    queries = []
    for i, expr in enumerate(dashboard_exprs()):
        query = expr
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        queries.append({"record": f"quarry:dashboard_query_{i}", "expr": query})
    scratch = tmp_path / "dashboard_rules.yml"
    scratch.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": queries}]}))
    result = promtool("check", "rules", str(scratch))
    assert result.returncode == 0, result.stdout + result.stderr
