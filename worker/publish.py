"""Publishing to the broker: a run's wake-up message, a webhook delivery. The one place
outside the Celery edge that sends a message, and it loads Celery only when it sends.

The API, the CLI and the watchdog publish through here, so importing any of
them does not import Celery (``tests/unit/test_layers.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.settings import get_settings

if TYPE_CHECKING:
    from celery import Celery

#: Message priorities: a run resuming after an interruption or a crash goes ahead of
#: runs not yet started, since it holds a lease history and half its output, and a
#: rolling deploy should not park it behind the whole backlog. Kombu's Redis transport
#: reads the lower number first; RabbitMQ the higher (its runs queue is declared with
#: ``x-max-priority`` 1). The embedded SQLite broker is FIFO.
RESUME_PRIORITY = 0
NEW_RUN_PRIORITY = 5
RABBITMQ_RESUME_PRIORITY = 1
RABBITMQ_NEW_RUN_PRIORITY = 0


def run_priority(broker_url: str, *, resume: bool) -> int:
    """The message priority of a new or a resumed run on this broker."""
    from worker.celery_app import is_amqp  # noqa: PLC0415 - Celery only when sending

    if is_amqp(broker_url):
        return RABBITMQ_RESUME_PRIORITY if resume else RABBITMQ_NEW_RUN_PRIORITY
    return RESUME_PRIORITY if resume else NEW_RUN_PRIORITY


def send_run(celery: Celery, queue: str, run_id: str, *, resume: bool = False) -> None:
    """Publish the wake-up message of ``run_id`` through ``celery``."""
    from worker.celery_app import EXECUTE_RUN  # noqa: PLC0415 - Celery only when sending

    celery.send_task(
        EXECUTE_RUN,
        args=[run_id],
        queue=queue,
        priority=run_priority(str(celery.conf.broker_url), resume=resume),
    )


def publish_run(run_id: str) -> None:
    """Send the wake-up message of a new run to the runs queue."""
    from worker.celery_app import app  # noqa: PLC0415 - Celery only when sending

    send_run(app, get_settings().queue, run_id)


def publish_resumed(run_id: str) -> None:
    """Send the wake-up message of a recovered run, ahead of runs not yet started."""
    from worker.celery_app import app  # noqa: PLC0415 - Celery only when sending

    send_run(app, get_settings().queue, run_id, resume=True)


def send_webhook(delivery_id: int) -> None:
    """Queue the delivery of one webhook on the control queue."""
    from worker.celery_app import WEBHOOK, app  # noqa: PLC0415 - Celery only when sending

    app.send_task(WEBHOOK, args=[delivery_id], queue=f"{get_settings().queue}.control")
