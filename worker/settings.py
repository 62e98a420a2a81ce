"""Quarry's one typed settings object, read once from ``QUARRY_*`` environment variables."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Directory for everything the embedded default keeps on disk.
DEFAULT_DATA_DIR = Path(".quarry")


class Settings(BaseSettings):
    """Every tunable of Quarry; defaults are the embedded mode (no services needed)."""

    model_config = SettingsConfigDict(env_prefix="QUARRY_", extra="ignore", frozen=True)

    #: Where the embedded store, broker and file output live.
    data_dir: Path = DEFAULT_DATA_DIR
    #: SQLAlchemy URL of the run-log store; empty means SQLite under ``data_dir``.
    database_url: str = ""
    #: Celery broker URL; empty means kombu's SQLAlchemy transport over SQLite under ``data_dir``.
    broker_url: str = ""
    #: The pipelines file (TOML or YAML).
    pipelines_file: Path = Path("pipelines.toml")
    #: Redis for stream wake-ups; empty means the broker's Redis, if the broker is Redis.
    redis_url: str = ""
    #: The API the CLI reads logs through (``--api``); empty means the store directly.
    api_url: str = ""
    #: Bearer token for ``api_url``.
    api_token: SecretStr = SecretStr("")
    #: Endpoints (comma-separated) that get a signed POST when a run ends.
    webhook_urls: str = ""
    #: HMAC-SHA256 key of the webhook signature.
    webhook_secret: SecretStr = SecretStr("")
    #: Root of the files destination when a pipeline does not name a path.
    output_dir: Path | None = None
    #: Celery queue that carries ``execute_run``.
    queue: str = "quarry.runs"
    #: Identity of this worker in leases and log entries; empty means host:pid.
    worker_id: str = ""

    #: A lease not renewed for this long is expired and may be recovered.
    lease_ttl_seconds: float = Field(default=30.0, gt=0)
    #: How often the heartbeat renews the lease; must be well under the TTL.
    lease_renew_seconds: float = Field(default=10.0, gt=0)
    #: How often a ``heartbeat`` entry is written to the run log (the lease is renewed far more).
    heartbeat_log_seconds: float = Field(default=300.0, gt=0)
    #: How often the heartbeat appends a telemetry sample.
    telemetry_sample_seconds: float = Field(default=5.0, gt=0)
    #: Samples kept per run; past it the series is thinned so it still spans the run.
    telemetry_max_samples: int = Field(default=2000, ge=10)
    #: How long a console sign-in lasts before the form asks for the token again.
    console_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    #: The store writer flushes buffered entries at least this often.
    log_flush_ms: int = Field(default=200, ge=1)
    #: The store writer flushes as soon as this many entries are buffered.
    log_batch_size: int = Field(default=2000, ge=1)
    #: Info and debug entries kept per run; past it they are dropped (never warnings or
    #: errors) and ``log_truncated`` entries count what was dropped.
    max_entries_per_run: int = Field(default=100_000, ge=100)
    #: Longest message stored; longer ones are truncated with a marker.
    max_message_bytes: int = Field(default=64 * 1024, ge=256)
    #: Attempts (first run + recoveries) before a run is given up.
    max_attempts: int = Field(default=3, ge=1)
    #: How often beat ticks the pipelines' schedules (and publishes due retries).
    schedule_tick_seconds: float = Field(default=1.0, gt=0, le=60)
    #: Most runs one backfill may create.
    max_backfill_runs: int = Field(default=1000, ge=1, le=100_000)
    #: How often beat schedules the watchdog sweep.
    watchdog_interval_seconds: float = Field(default=10.0, gt=0)
    #: A run queued this long without a worker taking it is re-published (lost message).
    queued_republish_seconds: float = Field(default=60.0, gt=0)
    #: A run ended without its worker (a forced cancel, a dead worker's) has its write-mode
    #: cleanup done by the watchdog this long after it ended, when its worker writes no more.
    cleanup_after_seconds: float = Field(default=30.0, gt=0, le=86_400)
    #: After SIGTERM the worker waits this long for runs to reach a safe point, then
    #: escalates to Celery's cold shutdown.
    shutdown_grace_seconds: float = Field(default=20.0, gt=0)
    #: Celery's soft shutdown (``worker_soft_shutdown_timeout``) during that cold shutdown.
    soft_shutdown_seconds: float = Field(default=4.0, ge=0)
    #: Entries and samples older than this are deleted by the retention task.
    retention_days: float = Field(default=30.0, gt=0)
    #: How often beat schedules retention.
    retention_interval_seconds: float = Field(default=3600.0, gt=0)
    #: The worker's own metrics are served on this port (0: not served). Each worker on a
    #: host needs its own (see docs/metrics.md).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    #: stdout rendering of log events.
    log_format: Literal["console", "json"] = "console"
    #: Lowest level rendered and stored.
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def model_post_init(self, __context: object) -> None:
        """Refuse a renew interval that cannot keep the lease alive."""
        if self.lease_renew_seconds >= self.lease_ttl_seconds:
            msg = "QUARRY_LEASE_RENEW_SECONDS must be smaller than QUARRY_LEASE_TTL_SECONDS"
            raise ValueError(msg)

    @property
    def store_url(self) -> str:
        """The store's SQLAlchemy URL, the embedded SQLite file when none is set."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'quarry.db').resolve()}"

    @property
    def celery_broker_url(self) -> str:
        """The broker URL, kombu's SQLAlchemy transport over SQLite when none is set."""
        if self.broker_url:
            return self.broker_url
        return f"quarry-sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def notify_url(self) -> str:
        """Where stream wake-ups are published: ``redis_url``, else a Redis broker, else none."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return ""

    @property
    def webhook_endpoints(self) -> list[str]:
        """The webhook URLs, split."""
        return [url.strip() for url in self.webhook_urls.split(",") if url.strip()]

    @property
    def files_root(self) -> Path:
        """Root directory of the files destination."""
        return self.output_dir if self.output_dir is not None else self.data_dir / "output"

    @property
    def embedded(self) -> bool:
        """Whether the store is the embedded SQLite file."""
        return self.store_url.startswith("sqlite")

    def secret_values(self) -> list[str]:
        """Credentials this process holds, for the scrubber: URL passwords, tokens, keys."""
        values = [self.webhook_secret.get_secret_value(), self.api_token.get_secret_value()]
        for url in (self.database_url, self.broker_url, self.redis_url, self.api_url):
            password = urlsplit(url).password if "://" in url else None
            if password:
                values += [password, unquote(password)]
        return [v for v in values if v]

    def identity(self) -> str:
        """This process's worker id: the configured one, or host:pid."""
        return self.worker_id or f"{socket.gethostname()}:{os.getpid()}"


@functools.cache
def get_settings() -> Settings:
    """Read the settings once per process."""
    return Settings()
