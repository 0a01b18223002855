"""The one shape of every error answer of the ingress: ``{"error", "detail", "request_id"}``."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

import orjson
from aiohttp import web

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a new one."""
    given = headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def error_body(error: str, detail: str, request_id: str) -> bytes:
    return orjson.dumps({"error": error, "detail": detail, "request_id": request_id})


def error_response(
    status: int, error: str, detail: str, request_id: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(error, detail, request_id),
        content_type="application/json",
        headers=headers,
    )


def raw_error(
    status: int, reason: str, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> bytes:
    """A whole HTTP/1.1 error answer as bytes, for the connection guard (no aiohttp request exists)."""
    body = error_body(error, detail, uuid.uuid4().hex)
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
