"""The deploy files parse, name commands that exist, and keep the shutdown timings consistent;
the Prometheus rules and the Grafana dashboard check and name only series Quarry exports."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
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


UNITS = (
    "quarry-worker@.service",
    "quarry-worker-control.service",
    "quarry-beat.service",
    "quarry-api.service",
)


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
    for name in UNITS:
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
    for name in ("worker-1", "worker-2", "worker-control"):
        assert seconds(compose()["services"][name]["stop_grace_period"]) > WORST_CASE_EXIT
    for name in ("quarry-worker", "quarry-worker-control"):
        worker = next(d for d in k8s() if d["metadata"]["name"] == name)
        spec = worker["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > WORST_CASE_EXIT
        assert worker["spec"]["strategy"]["type"] == "RollingUpdate"
    for name in ("quarry-worker@.service", "quarry-worker-control.service"):
        service = unit(name)["Service"]
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


# -- What the deploy files expect: volumes, secrets, the pipelines file, users -------------

#: A URL with a password in it (``scheme://user:password@host``).
CREDENTIAL_URL = re.compile(r"://[^/@\s:]*:([^@\s/]+)@")
CONTROL_QUEUE = f"{DEFAULTS.queue}.control"


def secret_template() -> dict[str, Any]:
    """The Kubernetes Secret template (a file of its own: re-applying quarry.yaml must not
    reset real credentials to placeholders)."""
    return yaml.safe_load((DEPLOY / "kubernetes" / "quarry-secrets.example.yaml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined: (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def k8s_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) for every workload of quarry.yaml."""
    found = []
    for doc in k8s():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        found += [(spec, c) for c in spec.get("containers", [])]
    return found


def k8s_config() -> dict[str, str]:
    """The quarry-config ConfigMap."""
    cm = next(d for d in k8s() if d["metadata"]["name"] == "quarry-config")
    data: dict[str, str] = cm["data"]
    return data


def mounted_volume(spec: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume a container mounts at ``path``."""
    mount = next(m for m in container.get("volumeMounts", []) if m["mountPath"] == path)
    return next(v for v in spec["volumes"] if v["name"] == mount["name"])


def is_worker(argv: list[str]) -> bool:
    """A ``celery -A worker worker`` command."""
    return argv[:4] == ["celery", "-A", "worker", "worker"]


def option(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in an argv, or None."""
    return argv[argv.index(name) + 1] if name in argv else None


def test_image_data_dir_belongs_to_the_runtime_user_before_its_volume() -> None:
    """The image creates its data directory owned by its non-root user before VOLUME (a new
    named volume copies that ownership), and carries no pipelines file of its own."""
    steps = dockerfile()
    kinds = [kind for kind, _ in steps]
    user = next(args for kind, args in steps if kind == "USER")
    assert user not in {"root", "0"}
    env = " ".join(args for kind, args in steps if kind == "ENV")
    data_dir = re.search(r"QUARRY_DATA_DIR=(\S+)", env)
    assert data_dir, env
    volume = kinds.index("VOLUME")
    assert json.loads(steps[volume][1]) == [data_dir.group(1)]
    owned = [
        i
        for i, (kind, args) in enumerate(steps)
        if kind == "RUN"
        and re.search(
            rf"(install -d -o {user} [^&]*|chown [^&]*\b{user}\b[^&]*){re.escape(data_dir.group(1))}",
            args,
        )
    ]
    assert owned and owned[0] < volume, "the data directory is not made the user's before VOLUME"
    assert not any(kind in {"COPY", "ADD"} and "pipelines" in args for kind, args in steps)
    assert re.search(r"QUARRY_PIPELINES_FILE=/etc/\S+", env), env


def test_k8s_data_dir_is_a_shared_claim() -> None:
    """Every Kubernetes worker mounts QUARRY_DATA_DIR from a ReadWriteMany claim defined in
    the file: a run resumed on another pod sees the files its first pod wrote."""
    data_dir = k8s_config()["QUARRY_DATA_DIR"]
    claims = {d["metadata"]["name"]: d for d in k8s() if d["kind"] == "PersistentVolumeClaim"}
    workers = [(s, c) for s, c in k8s_containers() if is_worker(c["command"])]
    assert len(workers) >= 2  # the run workers and the control-queue worker
    for spec, container in workers:
        claim = mounted_volume(spec, container, data_dir)["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]


def test_liveness_probe_pings_its_own_worker() -> None:
    """A worker's liveness probe pings its own node name (-d equal to --hostname) and goes
    through a shell when that name holds a variable (exec probes expand none)."""
    probed = 0
    for _, container in k8s_containers():
        if not is_worker(container["command"]):
            continue
        hostname = option(container["command"], "--hostname")
        assert hostname, "a worker without --hostname cannot be pinged alone"
        variables = re.findall(r"\$\((\w+)\)", hostname)
        defined = {e["name"] for e in container.get("env", [])}
        assert set(variables) <= defined  # $(VAR) in a command expands only defined ones
        probe = container["livenessProbe"]["exec"]["command"]
        if probe[:2] == ["sh", "-c"]:
            probe = shlex.split(probe[2])
            probe = probe[1:] if probe[0] == "exec" else probe
        else:
            assert "$" not in " ".join(probe), probe
        assert probe[:5] == ["celery", "-A", "worker", "inspect", "ping"], probe
        assert option(probe, "-d") == re.sub(r"\$\((\w+)\)", r"$\1", hostname)
        probed += 1
    assert probed >= 2


def test_credentials_only_in_the_secret() -> None:
    """The Secret template holds the URLs and the webhook key; every Quarry pod reads it;
    no ConfigMap or env value of quarry.yaml (or compose) carries a password."""
    secret = secret_template()
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", "quarry-secrets")
    assert {"QUARRY_DATABASE_URL", "QUARRY_BROKER_URL", "QUARRY_WEBHOOK_SECRET"} <= set(
        secret["stringData"]
    )
    fields = {f"QUARRY_{name.upper()}" for name in Settings.model_fields}
    assert set(secret["stringData"]) <= fields
    assert all(d["kind"] != "Secret" for d in k8s())
    for _, container in k8s_containers():
        assert {"secretRef": {"name": "quarry-secrets"}} in container["envFrom"]
        for env in container.get("env", []):
            assert not CREDENTIAL_URL.search(str(env.get("value", ""))), env
    for doc in k8s():
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] != "quarry-pipelines":
            for key, value in doc["data"].items():
                assert not re.search(r"SECRET|PASSWORD|TOKEN", key), key
                assert not CREDENTIAL_URL.search(value), key
    for value in compose()["x-quarry"]["environment"].values():
        password = CREDENTIAL_URL.search(str(value))
        assert password is None or password.group(1).startswith("${"), value


def test_pipelines_file_is_mounted_not_baked() -> None:
    """QUARRY_PIPELINES_FILE is a ConfigMap (Kubernetes), a bind mount of the repository's
    file (compose) and a file under /etc (systemd)."""
    path = Path(k8s_config()["QUARRY_PIPELINES_FILE"])
    for spec, container in k8s_containers():
        if container["command"][:3] == ["quarry", "db", "upgrade"]:
            continue  # migrations read no pipelines
        cm = mounted_volume(spec, container, str(path.parent))["configMap"]["name"]
        data = next(d for d in k8s() if d["metadata"]["name"] == cm)["data"]
        assert path.name in data
    quarry = compose()["x-quarry"]
    target = quarry["environment"]["QUARRY_PIPELINES_FILE"]
    binds = [v.split(":") for v in quarry["volumes"]]
    source = next(b[0] for b in binds if b[1] == target)
    assert (DEPLOY / source).resolve() == DEPLOY.parent / "pipelines.toml"
    env = (DEPLOY / "systemd" / "quarry.env.example").read_text()
    assert re.search(r"^QUARRY_PIPELINES_FILE=/etc/", env, re.MULTILINE)


def test_systemd_units_own_a_state_directory_as_a_dedicated_user() -> None:
    """Every unit runs as the unprivileged quarry user (defined by the sysusers file) with
    StateDirectory=quarry, which is QUARRY_DATA_DIR, and keeps the system read-only."""
    env = (DEPLOY / "systemd" / "quarry.env.example").read_text()
    data_dir = re.search(r"^QUARRY_DATA_DIR=(\S+)$", env, re.MULTILINE)
    assert data_dir
    sysusers = (DEPLOY / "systemd" / "quarry.sysusers.conf").read_text()
    for name in UNITS:
        service = unit(name)["Service"]
        assert service.get("User") not in {None, "root", "0"}, name
        assert re.search(rf"^u {service['User']} ", sysusers, re.MULTILINE)
        assert f"/var/lib/{service['StateDirectory']}" == data_dir.group(1), name
        assert service["ProtectSystem"] == "strict", name
        assert service["NoNewPrivileges"] == "yes", name
        argv = shlex.split(service["ExecStart"])
        schedule = option(argv, "--schedule")
        assert schedule is None or schedule.startswith(data_dir.group(1) + "/"), name


def test_every_worker_logs_info_and_the_control_queue_has_its_own_worker() -> None:
    """Workers start with --loglevel info, and each deployment runs a worker on the control
    queue alone, so ticks and sweeps never wait for a run slot."""
    workers = [c for c in commands() if is_worker(c)]
    assert all(option(c, "--loglevel") == "info" for c in workers)
    assert all(option(c, "--hostname") for c in workers)
    compose_control = compose()["services"]["worker-control"]["command"]
    k8s_control = next(
        c["command"]
        for _, c in k8s_containers()
        if "-Q" in c["command"] and is_worker(c["command"])
    )
    unit_control = shlex.split(unit("quarry-worker-control.service")["Service"]["ExecStart"])
    for argv in (compose_control, k8s_control, unit_control):
        assert option(argv, "-Q") == CONTROL_QUEUE, argv
    # The image's working directory is root's: compose's beat keeps its file in the volume.
    schedule = option(compose()["services"]["beat"]["command"], "--schedule")
    assert schedule
    assert schedule.startswith(compose()["x-quarry"]["environment"]["QUARRY_DATA_DIR"] + "/")


def test_compose_file_passes_compose_config() -> None:
    """``docker compose config`` (or docker-compose v1) accepts the file; skipped without
    either (neither needs a running engine)."""
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        argv = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        argv = ["docker-compose"]
    else:
        pytest.skip("neither docker compose nor docker-compose is installed")
    result = subprocess.run(
        [*argv, "-f", "docker-compose.yml", "config", "-q"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The rabbitmq profile: a RabbitMQ service, and every Quarry service on the URL given.
    amqp = "amqp://quarry:quarry@rabbitmq:5672//"
    with_rabbitmq = subprocess.run(
        [*argv, "-f", "docker-compose.yml", "--profile", "rabbitmq", "config"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "QUARRY_BROKER_URL": amqp},
    )
    assert with_rabbitmq.returncode == 0, with_rabbitmq.stderr
    services = yaml.safe_load(with_rabbitmq.stdout)["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:")
    quarry = [
        name for name, svc in services.items() if "QUARRY_BROKER_URL" in svc.get("environment", {})
    ]
    assert {"api", "beat", "migrate"} <= set(quarry)
    assert {services[name]["environment"]["QUARRY_BROKER_URL"] for name in quarry} == {amqp}


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
    # A scheduled pipeline whose clock has run for a while: its due fire time is exported.
    store.start_schedule(
        "hourly_events", "0 * * * * Europe/Paris", datetime.now(UTC) - timedelta(days=1)
    )
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
