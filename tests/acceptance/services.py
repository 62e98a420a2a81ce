"""Servers of a test's own, so that the test can stop and restart them without touching the
machine's shared ones (other test processes use those at the same time)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.acceptance.harness import free_port, wait_for
from tests.conftest import require


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


class PrivatePostgres:
    """A PostgreSQL server of its own (initdb, trust on loopback, a free port), with one
    database ``quarry``; :meth:`stop` and :meth:`start` are a restart as an upgrade does it.

    Its directory is made under the system's temporary directory: the ``postgres`` user
    cannot enter pytest's (owner-only) temporary directories.
    """

    def __init__(self) -> None:
        bindir = _postgres_bin()
        if bindir is None or shutil.which("runuser") is None or os.geteuid() != 0:
            require("a private PostgreSQL server", RuntimeError("needs pg_ctl, runuser and root"))
        assert bindir is not None
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="quarry-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self._as_postgres(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        self.start()
        self._as_postgres(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-qc",
            "CREATE DATABASE quarry",
        )  # fmt: skip
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/quarry"

    def _as_postgres(self, tool: str, *args: str) -> None:
        program = (
            self.bin / tool if (self.bin / tool).exists() else Path(shutil.which(tool) or tool)
        )
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(program), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, done.args, done.stdout, done.stderr
            ) from RuntimeError(done.stderr.strip())

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w",
            "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: every session is ended, as a restart does)."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        """Stop the server if it runs and remove its files."""
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A Redis server of its own on a free port, no persistence: :meth:`stop` is an outage
    (the process is gone, connections refused), :meth:`start` brings it back empty."""

    def __init__(self, root: Path) -> None:
        if shutil.which("redis-server") is None:
            require("redis-server", RuntimeError("redis-server is not installed"))
        self.port = free_port()
        self.root = root
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the server and wait until it answers."""
        log = (self.root / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            wait_for(lambda: _pings(client), "the private Redis to answer", 30)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server at once (SIGKILL: an outage, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the server."""
        self.stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
