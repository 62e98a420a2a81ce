"""The run-log store (SQLAlchemy): the only place Quarry talks to its database."""

from worker.store.engine import utcnow
from worker.store.store import Store
from worker.store.tables import new_run_id

__all__ = ["Store", "new_run_id", "utcnow"]
