"""The Celery app. Configuration is lazy: nothing reads settings or connects at import."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from worker import broker as _broker  # noqa: F401 - registers the embedded transport
from worker import consuming, workerlogs
from worker.settings import Settings, get_settings

#: Name of the task that executes a run.
EXECUTE_RUN = "quarry.execute_run"
#: Name of the watchdog sweep task.
WATCHDOG = "quarry.watchdog"
#: Name of the retention task.
RETENTION = "quarry.retention"
#: Name of the webhook delivery task.
WEBHOOK = "quarry.webhook"
#: Name of the schedule tick.
SCHEDULE_TICK = "quarry.schedule_tick"

#: Redis redelivers an unacked message after this long. Runs are acked when they start
#: and control tasks last seconds, so this only bounds a message lost with its worker.
REDIS_VISIBILITY_TIMEOUT = 3600
#: The runs queue's highest priority on RabbitMQ (``x-max-priority``): resumed runs 1, new 0.
RABBITMQ_MAX_PRIORITY = 1


def is_amqp(broker_url: str) -> bool:
    """Whether the broker is RabbitMQ (AMQP 0.9.1)."""
    return broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings as the runtime needs them (documented in docs/operations.md)."""
    broker = settings.celery_broker_url
    transport: dict[str, Any] = {}
    if broker.startswith(("redis://", "rediss://", "unix://")):
        transport = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT}
    elif broker.startswith("quarry-sqla+"):
        transport = {"polling_interval": 0.2}
    control = f"{settings.queue}.control"
    # RabbitMQ orders by priority only in a queue declared with a maximum (Redis keeps one
    # list per priority step by itself): resumed runs go ahead of new ones.
    runs = Queue(settings.queue, max_priority=RABBITMQ_MAX_PRIORITY) if is_amqp(broker) else None
    return {
        "broker_url": broker,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # A broker outage of any length: workers and beat keep reconnecting (Celery gives
        # up after 100 attempts by default).
        "broker_connection_max_retries": None,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Control tasks (seconds long) are acked when they return and go back to the queue
        # if their process dies. A run is acked when it starts (execute_run sets
        # acks_late=False): its lease owns it from then on. See worker/consuming.py.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message per pool process; worker/consuming.py keeps it at that.
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        # The watchdog has its own queue: behind a backlog of runs it would wait for hours.
        "task_queues": (runs or Queue(settings.queue), Queue(control)),
        "task_routes": {
            EXECUTE_RUN: {"queue": settings.queue},
            WATCHDOG: {"queue": control},
            RETENTION: {"queue": control},
            WEBHOOK: {"queue": control},
            SCHEDULE_TICK: {"queue": control},
        },
        "beat_schedule": {
            "quarry-watchdog": {
                "task": WATCHDOG,
                "schedule": settings.watchdog_interval_seconds,
                # A sweep no worker took in time is stale; the next one supersedes it.
                "options": {"queue": control, "expires": settings.watchdog_interval_seconds},
            },
            # Pipelines' schedules: a tick nobody took in time is superseded by the next.
            "quarry-schedule": {
                "task": SCHEDULE_TICK,
                "schedule": settings.schedule_tick_seconds,
                "options": {"queue": control, "expires": settings.schedule_tick_seconds},
            },
            "quarry-retention": {
                "task": RETENTION,
                "schedule": settings.retention_interval_seconds,
                "options": {"queue": control, "expires": settings.retention_interval_seconds},
            },
        },
        "beat_schedule_filename": str(settings.data_dir / "celerybeat-schedule"),
        # Worker shutdown, see worker/signals.py and docs/operations.md:
        # SIGTERM (warm) -> runs stop at a safe point; after shutdown_grace_seconds the
        # worker escalates to a cold shutdown that waits soft_shutdown_seconds at most.
        "worker_soft_shutdown_timeout": settings.soft_shutdown_seconds,
        # Our structlog pipeline owns stdout; Celery must not wrap it.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


app = Celery(
    "quarry", include=["worker.tasks", "scheduler.tasks"], task_cls="worker.consuming:QuarryTask"
)
app.add_defaults(lambda: celery_config(get_settings()))
# Take a message only when a pool process can start it: see worker/consuming.py.
app.steps["consumer"].add(consuming.GateStep)
# What the worker logs and at which level: see worker/workerlogs.py and docs/operations.md.
workerlogs.install(runs=[EXECUTE_RUN], quiet=[WATCHDOG, SCHEDULE_TICK])
