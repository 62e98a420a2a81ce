"""Quarry: a SIGTERM-safe runtime for data-extraction runs on Celery.

``celery -A worker worker`` finds :data:`app` here. It is loaded on first use, so
importing the models, the store, the API or the CLI never imports Celery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from worker.celery_app import app  # noqa: PLC0415 - the lazy edge

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
