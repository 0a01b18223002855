"""Structured logging: one JSON object per line on stderr.

Callers pass context with ``extra={...}``; every key that is not a standard ``LogRecord`` attribute
becomes a field of the line. Secrets are never passed to a logger: the settings hold them as
``SecretStr`` and the ingress only logs which credential *kind* matched.

The libraries' own loggers (faust, mode, aiokafka, aiohttp) go through the same root handler, so a
worker's output is JSON too: ``processors.worker`` starts faust with ``override_logging=False``,
because faust's worker would otherwise replace the root handler with its coloured text one.

A library line can quote what a client sent: aiohttp's server logs a request it cannot parse with
the parser's message, which quotes the raw line — a header with a key in it and a bare LF or a NUL,
say. ``scrub_library_loggers`` (part of ``configure``) keeps such a line's event and the error's
type and drops the quoted bytes, on every component's aiohttp server (the ingress answers those
requests itself, ``ingress.guard.OwnAnswers``; a worker's query port and a sink's port are
aiohttp's own). No secret reaches a log line, whatever bytes arrive.

Correlation fields: ``request_id`` (the ingress's, or the client's ``X-Request-Id``) travels in the
raw record's headers into the split agent's lines and dead letters, and inside every segment event
and membership change; ``change_ids`` name the changes a sink line is about.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Render a record as a single JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _NoRequestBytes(logging.Filter):
    """Keeps a parser error's type and drops its message (the raw request line it quotes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "malformed HTTP request refused"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.error_type = type(exc).__name__
        return True


_SCRUB = _NoRequestBytes()


def scrub_library_loggers() -> None:
    """Keep the raw request bytes aiohttp's parser errors quote out of the log (idempotent)."""
    server = logging.getLogger("aiohttp.server")
    if _SCRUB not in server.filters:
        server.addFilter(_SCRUB)


def configure(level: str = "INFO") -> None:
    """Send every logger's output, as JSON lines, to stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    numeric = logging.getLevelName(level)
    # Libraries that set up handlers of their own would print text lines: route them to the root.
    for name in ("faust", "mode", "aiokafka", "aiohttp", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # aiokafka logs every failed reconnect at ERROR; our own lines say what it means for a request.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, numeric))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    scrub_library_loggers()
    # Python warnings and uncaught exceptions become JSON lines too, not bare tracebacks.
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("audience_relay").critical("uncaught exception", exc_info=(kind, value, tb))
