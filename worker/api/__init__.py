"""The HTTP API (FastAPI): runs and their logs over the store, behind bearer tokens.

``app`` builds the application; ``auth`` the token and its scope; ``guard`` bounds
requests; ``params`` the query models; one router per resource (``runs``, ``logs``,
``health``, ``metrics``); ``stream`` the live log; ``external`` the runs PATCH contract.
"""

from worker.api.app import create_app

__all__ = ["create_app"]
