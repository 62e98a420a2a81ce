"""Quarry: a SIGTERM-safe runtime for data-extraction runs on Celery.

``celery -A worker worker`` finds :data:`app` here.
"""

from worker.celery_app import app

__all__ = ["app"]
