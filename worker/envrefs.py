"""``${ENV_NAME}`` references in pipeline config: resolved at run time, scrubbed everywhere.

A pipeline file holds references, never credentials:
``url = "postgresql+psycopg://etl:${WAREHOUSE_PASSWORD}@db/prod"``. The worker
resolves them when a run starts and registers every resolved value with the
scrubber before anything is logged, so the value cannot reach the run log,
stdout, the API or an error summary. ``$${`` writes a literal ``${``. Run
params are never resolved: an API caller must not be able to read the
worker's environment through them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from worker.errors import ConfigError
from worker.scrub import scrubber

_REF = re.compile(r"\$(\$)?\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def resolve(
    value: Any, where: str, environ: Mapping[str, str] | None = None
) -> tuple[Any, set[str]]:
    """``value`` with every ``${NAME}`` replaced, and the set of values substituted.

    Raises :class:`ConfigError` naming the field (``where`` plus the key path)
    and the variable when one is unset or malformed.
    """
    env = os.environ if environ is None else environ
    secrets: set[str] = set()

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, str):
            return _substitute(node, path, env, secrets)
        if isinstance(node, Mapping):
            return {k: walk(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node

    return walk(value, where), secrets


def _substitute(text: str, path: str, env: Mapping[str, str], secrets: set[str]) -> str:
    if "${" not in text:
        return text

    def one(match: re.Match[str]) -> str:
        if match.group(1):  # $${...} is a literal
            return "${" + match.group(2) + "}"
        name = match.group(2)
        if not _NAME.match(name):
            msg = f"{path}: ${{{name}}} is not a valid environment variable reference"
            raise ConfigError(msg)
        if name not in env:
            msg = f"{path}: environment variable {name} is not set"
            raise ConfigError(msg)
        secrets.add(env[name])
        return env[name]

    return _REF.sub(one, text)


def resolve_and_register(value: Any, where: str) -> Any:
    """Resolve ``value`` and register what was substituted with the process scrubber."""
    resolved, secrets = resolve(value, where)
    scrubber.register(secrets)
    return resolved
