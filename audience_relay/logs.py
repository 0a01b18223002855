"""Structured logging: one JSON object per line on stderr.

Callers pass context with ``extra={...}``; every key that is not a standard ``LogRecord`` attribute
becomes a field of the line. Secrets are never passed to a logger: the settings hold them as
``SecretStr`` and the ingress only logs which credential *kind* matched.

The libraries' own loggers (faust, mode, aiokafka, aiohttp) go through the same root handler, so a
worker's output is JSON too: ``processors.worker`` starts faust with ``override_logging=False``,
because faust's worker would otherwise replace the root handler with its coloured text one.

Repeats: a warning or error whose text is the same as one logged less than ``RELAY_LOG_REPEAT_SECONDS``
ago by the same logger is not written; the next one written after that carries ``repeated`` (how many
were left out) and ``repeated_since`` (when the first of those was). So a loop that fails a thousand
times a second while the broker is away (aiokafka's ``Unable connect to node …``) costs one line per
interval, not a thousand; info and debug lines are never folded (they name one request or batch).

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

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class _Folded:
    last_written: float
    left_out: int = 0
    first_left_out: float = 0.0


class RepeatFilter(logging.Filter):
    """Writes a repeated warning or error at most once per ``interval`` seconds, with a count.

    Repeats are records of the same logger, level and text (``getMessage()``: aiokafka's lines carry
    what differs in the text). The first is written; those within ``interval`` of the last written
    one are counted and left out; the next written one carries ``repeated`` and ``repeated_since``
    (wall-clock time of the first left out). ``flush`` writes the counts still pending (at exit).
    Thread-safe: faust's consumer logs from its own thread.
    """

    def __init__(
        self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic, max_keys: int = 4096
    ) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[tuple[str, int, str], _Folded] = {}
        self._lock = threading.Lock()
        self._sink: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.interval <= 0:
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = self._clock()
        with self._lock:
            folded = self._seen.get(key)
            if folded is None:
                if len(self._seen) >= self._max_keys:
                    # Many distinct texts (ids in them): forget the oldest rather than grow forever.
                    self._seen.pop(next(iter(self._seen)))
                self._seen[key] = _Folded(now)
                return True
            if now - folded.last_written < self.interval:
                if not folded.left_out:
                    folded.first_left_out = record.created
                folded.left_out += 1
                return False
            if folded.left_out:
                record.repeated = folded.left_out
                record.repeated_since = _iso(folded.first_left_out)
            self._seen[key] = _Folded(now)
            return True

    def flush(self, handler: logging.Handler) -> None:
        """Write one line per text with repeats left out since it was last written."""
        if getattr(getattr(handler, "stream", None), "closed", False):
            return  # at exit under a test runner, whose captured stream is gone already
        with self._lock:
            pending = [(key, f) for key, f in self._seen.items() if f.left_out]
            for key, _ in pending:
                self._seen[key] = _Folded(self._clock())
        for (name, level, text), folded in pending:
            record = logging.LogRecord(name, level, "", 0, "%s", (text,), None)
            record.repeated = folded.left_out
            record.repeated_since = _iso(folded.first_left_out)
            handler.acquire()
            try:
                handler.emit(record)  # not handle(): that would run this filter on it again
            finally:
                handler.release()


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


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


def configure(level: str = "INFO", repeat_seconds: float = 30.0) -> None:
    """Send every logger's output, as JSON lines, to stderr at ``level``, repeats folded."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    repeats = RepeatFilter(repeat_seconds)
    handler.addFilter(repeats)
    atexit.register(repeats.flush, handler)
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
