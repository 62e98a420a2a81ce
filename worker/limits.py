"""Bounds on every value a client hands Quarry, checked when it is written, never when read.

A JSON value from outside (run params, an entry's ``data``, a telemetry summary
or sample) is accepted only when every reader can serialise it again: orjson
and pydantic refuse nesting past ~255 levels and integers past 64 bits, so a
stored value beyond either would break every page that holds it. Times from
clients must lie in a window around the server's clock. Each check raises
:class:`InvalidInput` with a message that names the field.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, WithJsonSchema

from worker.errors import InvalidInput

#: Deepest nesting of objects and arrays in one JSON input (readers manage ~255).
MAX_JSON_DEPTH = 32
#: Most object members plus array items in one JSON input, counted over the whole tree.
MAX_JSON_NODES = 10_000
#: Longest object key, in characters.
MAX_KEY_LENGTH = 256
#: Longest string in a JSON input, in characters (a message has its own, larger limit).
MAX_JSON_STRING = 64 * 1024
#: Integers in JSON inputs: what a signed 64-bit column, orjson and jsonb all hold.
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1
#: Integer fields stored in 32-bit columns (lease epochs, attempts).
MAX_INT32 = 2**31 - 1
#: How far a client's clock may be ahead of the server's.
CLOCK_SKEW = timedelta(minutes=5)


def check_json(value: Any, field: str, *, json_types: bool = True) -> Any:
    """``value`` when it is within the JSON bounds above; :class:`InvalidInput` otherwise.

    Walked without recursion, so no input can exhaust the stack while it is checked.
    ``json_types=False`` bounds only the shape (depth, nodes, keys), for documents such
    as a TOML pipelines file whose scalars include dates.
    """
    nodes = 0
    pending: list[tuple[Any, str, int]] = [(value, field, 0)]
    while pending:
        item, where, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                msg = f"{where}: nested deeper than {MAX_JSON_DEPTH} levels"
                raise InvalidInput(msg)
            nodes += len(item)
            if nodes > MAX_JSON_NODES:
                msg = f"{field}: more than {MAX_JSON_NODES} keys and items in all"
                raise InvalidInput(msg)
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
                        msg = f"{where}: keys are strings of at most {MAX_KEY_LENGTH} characters"
                        raise InvalidInput(msg)
                    pending.append((child, f"{where}.{key}", depth + 1))
            else:
                pending.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
        elif json_types:
            _check_scalar(item, where)
    return value


def _check_scalar(item: Any, where: str) -> None:
    """A JSON scalar within bounds: a 64-bit integer, a finite number, a bounded string."""
    if isinstance(item, bool) or item is None:
        return
    if isinstance(item, int):
        if not MIN_INT <= item <= MAX_INT:
            msg = f"{where}: integers must lie between -2^63 and 2^63-1"
            raise InvalidInput(msg)
    elif isinstance(item, float):
        if not math.isfinite(item):
            msg = f"{where}: numbers must be finite (no NaN or Infinity)"
            raise InvalidInput(msg)
    elif isinstance(item, str):
        if len(item) > MAX_JSON_STRING:
            msg = f"{where}: strings are at most {MAX_JSON_STRING} characters"
            raise InvalidInput(msg)
    else:
        msg = f"{where}: not a JSON value ({type(item).__name__})"
        raise InvalidInput(msg)


def _bounded(value: Any) -> Any:
    try:
        return check_json(value, "value")
    except InvalidInput as exc:
        # pydantic prefixes the field's location; drop the placeholder root name.
        raise ValueError(str(exc).removeprefix("value.").removeprefix("value")) from None


#: The OpenAPI schema of a JSON value within the bounds above (depth and the node count
#: are checked by the handler: JSON Schema cannot say them). Published as a component.
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": f"Any JSON value, nested at most {MAX_JSON_DEPTH} levels, "
    f"at most {MAX_JSON_NODES} keys and items in all.",
    "anyOf": [
        {"type": "string", "maxLength": MAX_JSON_STRING},
        {"type": "integer", "minimum": MIN_INT, "maximum": MAX_INT},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {
            "type": "object",
            "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
            "propertyNames": {"maxLength": MAX_KEY_LENGTH},
        },
    ],
}

#: A JSON object within the bounds, as a pydantic field type.
BoundedJson = Annotated[
    dict[str, Any],
    AfterValidator(_bounded),
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
            "propertyNames": {"maxLength": MAX_KEY_LENGTH},
        }
    ),
]


def client_time(value: datetime, field: str, *, not_before: datetime | None = None) -> datetime:
    """A time a client sent, in UTC, when it is no later than now plus the allowed skew.

    ``not_before`` is the earliest acceptable time (a run's start, less the skew).
    """
    when = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    if when > now + CLOCK_SKEW:
        msg = f"{field}: {when.isoformat()} is in the future (server time {now.isoformat()})"
        raise InvalidInput(msg)
    if not_before is not None and when < not_before - CLOCK_SKEW:
        msg = f"{field}: {when.isoformat()} is before the run began ({not_before.isoformat()})"
        raise InvalidInput(msg)
    return when
