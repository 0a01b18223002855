"""The ingress's only look inside a body: is it a JSON object or a non-empty array of objects?

Pure functions, so that the fuzz and property tests can drive them directly.
"""

from __future__ import annotations

import orjson


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def body_problem(body: bytes) -> str | None:
    """Why ``body`` cannot be a Lytics webhook body, or None when it can.

    Accepted: a JSON object (one user event) or a non-empty JSON array whose elements are all objects
    (Lytics "Batch Events"). Anything else is answered 400 and kept in the dead-letter topic.
    """
    if not body.strip():
        return "the body is empty: Lytics sends a JSON object or an array of objects"
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"the body is not valid UTF-8 JSON: {exc}"
    if isinstance(value, dict):
        return None
    if isinstance(value, list):
        if not value:
            return "the body is an empty JSON array: a batch must hold at least one user event"
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                return f"element {index} of the batch is a JSON {_kind(item)}, not an object (a user event)"
        return None
    return f"the body is a JSON {_kind(value)}: expected an object or an array of objects"
