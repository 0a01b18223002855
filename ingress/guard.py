"""Slow, abusive and malformed clients: a connection cap, head and body deadlines, and our own
answer to a request aiohttp cannot parse.

aiohttp's server has a keep-alive timeout but no deadline for receiving a request head or body, so a
client that sends its headers (or body) a byte at a time can hold a connection, a handler and buffers
for as long as it likes (slowloris). ``GuardedSite`` (aiohttp's ``TCPSite`` with these pieces in its
protocol factory, and the TLS handshake bounded by the head deadline) closes that gap for every app
it serves — the webhook port and the operations port alike:

- ``GuardedConnection`` wraps aiohttp's per-connection protocol at the asyncio level. It counts the
  listener's open connections and refuses one over ``max_connections`` with a canned 503 +
  Retry-After before any aiohttp code runs. It starts a deadline when a connection opens and whenever
  the first byte of a new request arrives on an idle keep-alive connection; if no request head was
  complete when it fires, the client gets a 408 and the connection is closed.
- It also bounds what a connection makes the process hold before any credential is checked: a
  head is counted as it arrives (``HeadMeter``: up to the blank line, without parsing HTTP) and
  refused with a 431 past ``MAX_HEAD_BYTES`` before aiohttp holds it; aiohttp gets one request at a
  time — bytes after a complete head wait here until aiohttp has handed that head on (then they are
  its body, or the next request), and the next request waits, unparsed, until the one being served
  is answered (HTTP/1.1 pipelining, ``MAX_PIPELINED_BYTES`` at most, else the connection is cut).
- The site wraps the server's ``request_factory`` and ``request_handler``: the first is called the
  moment aiohttp hands a parsed head on, which is how the connection knows the head was complete
  without parsing HTTP itself (from then on the head deadline no longer applies); the second gives
  the body its own deadline (if the body has not fully arrived in time, the pending read fails, the
  handler's clean-up runs — releasing its in-flight reservation — and the client gets a 408 on a
  closed connection) and marks the connection idle again when the request is answered. Being the
  site's, not an app middleware, they hold whatever app is served: a request being served is never
  answered 408.
- ``OwnAnswers`` is aiohttp's ``RequestHandler`` with its error answer replaced. aiohttp answers a
  request it cannot parse itself, logging the parser's message — which quotes the offending raw line,
  say a header with a bare LF or a NUL and a key in it — at ERROR and echoing it in a text/plain 400.
  Here the answer is a fixed JSON body and the log line names the error's type, never its text: no
  secret reaches a log line or an answer, whatever bytes arrive.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ingress import metrics
from ingress.errors import error_response, raw_error, request_id_of

log = logging.getLogger("ingress")

#: How long a refused or timed-out connection may take to close cleanly before it is aborted.
CLOSE_GRACE_SECONDS = 1.0

#: The most a request head may take (request line, headers, the blank line). aiohttp's own limits
#: are per line (8190 bytes) and per count (128 headers), i.e. a head of about 1 MiB, which it holds
#: in memory several times over until the head is complete: unauthenticated memory per connection.
MAX_HEAD_BYTES = 32 * 1024

#: The most a connection may send beyond a request that is being served (HTTP/1.1 pipelining) before
#: it is cut: those bytes wait here, unparsed, until the request is answered.
MAX_PIPELINED_BYTES = 64 * 1024


@dataclass
class ConnectionLimits:
    """What one listener allows, and how many connections it holds now."""

    max_connections: int
    header_timeout: float
    retry_after: int
    #: The whole body must arrive within this after its head.
    body_timeout: float = 30.0
    listener: str = "main"
    open: int = 0
    refusing: int = 0
    _closing: set[GuardedConnection] = field(default_factory=set)

    def close_all(self) -> None:
        """At shutdown: drop the connections still being refused or cut."""
        for conn in list(self._closing):
            conn.abort()


class HeadTooLarge(Exception):
    """A request head over ``MAX_HEAD_BYTES``."""


class HeadMeter:
    """Counts a request head's bytes up to its end (the blank line), without parsing HTTP.

    Leading empty lines are counted but cannot end the head (RFC 9112 lets a server skip them).
    """

    def __init__(self, limit: int = MAX_HEAD_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._started = False
        self._window = b""  # the last 3 bytes seen, for an end split across two reads

    def feed(self, data: bytes) -> int | None:
        """How many bytes of ``data`` finish the head, or None when it goes on.

        Raises ``HeadTooLarge`` once the head (so far) is over the limit.
        """
        start = 0
        if not self._started:
            start = len(data) - len(data.lstrip(b"\r\n"))
            self._started = start < len(data)
        if self._started:
            window = self._window + data[start:]
            end = window.find(b"\r\n\r\n")
            if end >= 0:
                used = start + end + 4 - len(self._window)
                self._add(used)
                return used
            self._window = window[-3:]
        self._add(len(data))
        return None

    def _add(self, n: int) -> None:
        self.size += n
        if self.size > self.limit:
            raise HeadTooLarge(self.size)


class BodyTimeout(TimeoutError):
    """The request body did not arrive within the body deadline.

    A ``TimeoutError`` so that aiohttp's own post-handler drain of an unread body stops on it quietly.
    """


# idle: kept alive between requests (aiohttp's keep-alive timeout applies); head: a request head is
# arriving (head deadline, size limit); queued: the head has ended, aiohttp hands it on next; busy: a
# handler runs; drain: the handler answered without reading the whole body and aiohttp reads the rest
# (bounded by the head deadline, closed silently); cut: refused, what still arrives is dropped.
_IDLE, _HEAD, _QUEUED, _BUSY, _DRAIN, _CUT = "idle", "head", "queued", "busy", "drain", "cut"


class GuardedConnection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the cap and the head deadline around it."""

    #: Live connections by transport, so the middleware can find the one a request came on.
    live: dict[asyncio.BaseTransport, GuardedConnection] = {}

    def __init__(self, limits: ConnectionLimits, inner_factory: Callable[[], asyncio.Protocol]) -> None:
        self.limits = limits
        self._inner_factory = inner_factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self._state = _HEAD
        self._head = HeadMeter()
        self._got_bytes = False
        #: The body of the request being served (aiohttp's payload stream), while there is one.
        self._payload: Any = None
        #: Bytes that arrived after the served request's body: the next requests, not parsed yet.
        self._held: list[bytes] = []
        #: Bytes that came after a complete head, before aiohttp handed it on: body or next request.
        self._pending: list[bytes] = []
        self._feeding = False  # pending body bytes are on their way to aiohttp
        self._releasing = False  # held requests are on their way to aiohttp
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        limits = self.limits
        if limits.open >= limits.max_connections:
            self._refuse()
            return
        limits.open += 1
        metrics.CONNECTIONS_OPEN.labels(limits.listener).set(limits.open)
        GuardedConnection.live[transport] = self
        self.inner = self._inner_factory()
        # A fresh connection must deliver its first request head within the deadline too: a client
        # that connects and sends nothing holds a slot as surely as one that sends a byte a second.
        self._arm(limits.header_timeout)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None or self._state == _CUT:
            return  # being refused: read and drop, so closing does not reset the connection
        if self._releasing:
            self._hold(data)  # after the bytes held before it, in the order they came
            return
        if self._state in (_BUSY, _DRAIN) and self._payload is not None and self._payload.is_eof():
            if self._state == _BUSY:
                self._hold(data)
                return
            self._state = _IDLE  # drained: what comes now is the next request
        if self._state == _IDLE:
            # The first byte of the next request on a kept-alive connection starts its head deadline.
            self._state = _HEAD
            self._head = HeadMeter()
            self._arm(self.limits.header_timeout)
        if self._state == _QUEUED or self._feeding:
            # Body or next requests: which one is known once aiohttp hands the head on (and, once
            # known, the bytes go to aiohttp in the order they came).
            self._pending.append(data)
            return
        if self._state == _HEAD:
            try:
                end = self._head.feed(data)
            except HeadTooLarge:
                self._refuse_head()
                return
            if end is not None:
                self._state = _QUEUED  # in time: aiohttp hands the head on in a moment
                self._disarm()
                if end < len(data):
                    self._pending.append(data[end:])
                    data = data[:end]
        self._got_bytes = self._got_bytes or bool(data)
        self.inner.data_received(data)

    def _feed(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.data_received(data)

    def _feed_pending(self) -> None:
        self._feeding = False
        pending, self._pending = b"".join(self._pending), []
        self._feed(pending)

    def _hold(self, data: bytes) -> None:
        """Keep the next request's bytes until this one is answered, so aiohttp parses (and holds)
        one request per connection at a time; a client that sends too much ahead is cut."""
        self._held.append(data)
        if sum(map(len, self._held)) > MAX_PIPELINED_BYTES:
            log.info("too many bytes sent ahead of an answer; closing the connection")
            self._held.clear()
            self._close()

    def _release_held(self) -> None:
        self._releasing = False
        held, self._held = b"".join(self._held), []
        if held:
            self._feed(held)

    def eof_received(self) -> bool | None:
        if self.inner is None:
            self._close()
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        limits = self.limits
        limits._closing.discard(self)
        if self.inner is None:
            limits.refusing -= 1
            return
        limits.open -= 1
        metrics.CONNECTIONS_OPEN.labels(limits.listener).set(limits.open)
        if self.transport is not None:
            GuardedConnection.live.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # --- called by the site's request hooks ------------------------------------------------------

    def request_started(self, payload: Any) -> None:
        """A head is complete and handed on to be served: the head deadline no longer applies."""
        self._state = _BUSY
        self._payload = payload
        self._disarm()
        if not self._pending:
            return
        if payload.is_eof():
            # No body: what followed the head is the next request.
            pending, self._pending = self._pending, []
            for chunk in pending:
                self._hold(chunk)
        else:
            # Body bytes: to aiohttp once this call (made from within aiohttp) has returned, and
            # whatever arrives until then after them.
            self._feeding = True
            self._loop.call_soon(self._feed_pending)

    def request_finished(self, body_read: bool) -> None:
        """Back to idle keep-alive (aiohttp's keep-alive timeout governs), until the next byte.

        If the body was not read to its end, the bytes still coming are that body, not a new head:
        they must not earn a 408 after the answer was sent, but they get no more time than a head.
        """
        self._got_bytes = False
        if body_read:
            self._state = _IDLE
            self._payload = None
            if self._held:
                self._releasing = True
                self._loop.call_soon(self._release_held)
        else:
            self._state = _DRAIN
            self._arm(self.limits.header_timeout)

    # --- internals ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._head_deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_deadline(self) -> None:
        self._timer = None
        if self._state not in (_HEAD, _DRAIN) or self.transport is None or self.transport.is_closing():
            return  # the head arrived in time (queued, busy) or the connection is idle or going
        if self._state == _DRAIN:
            self._close()  # an answer was already sent: no second one
            return
        metrics.TIMEOUTS.labels("headers").inc()
        peer = self.transport.get_extra_info("peername")
        log.info(
            "request head not received in time; closing the connection",
            extra={"peer": str(peer[0]) if peer else None, "timeout_s": self.limits.header_timeout},
        )
        if self._got_bytes:
            # A partial head: say why. (A connection that sent nothing at all is simply closed.)
            self.transport.write(
                raw_error(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    f"the request head did not arrive within {self.limits.header_timeout:g} s",
                )
            )
        self._close()

    def _refuse_head(self) -> None:
        """A head over ``MAX_HEAD_BYTES``: 431, closed, and aiohttp never sees (or keeps) it."""
        assert self.transport is not None
        self._disarm()
        self._state = _CUT
        log.info(
            "request head over the size limit; closing the connection",
            extra={"limit": MAX_HEAD_BYTES},
        )
        self.transport.write(
            raw_error(
                431,
                "Request Header Fields Too Large",
                "head_too_large",
                f"the request line and headers are over {MAX_HEAD_BYTES} bytes",
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Read and drop the rest for a moment: closing with unread data would reset the connection
        # and could lose the answer.
        self._timer = self._loop.call_later(min(CLOSE_GRACE_SECONDS, self.limits.header_timeout), self._close)

    def _refuse(self) -> None:
        assert self.transport is not None
        limits = self.limits
        metrics.CONNECTIONS_REFUSED.labels(limits.listener).inc()
        limits.refusing += 1
        if limits.refusing > limits.max_connections:
            # A flood: even a polite refusal costs a socket for a moment; drop this one outright.
            self.transport.abort()
            return
        self.transport.write(
            raw_error(
                503,
                "Service Unavailable",
                "too_many_connections",
                "the ingress is at its connection limit; retry later",
                {"Retry-After": str(limits.retry_after)},
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Keep reading (and dropping) what the client already sent until it closes or the grace
        # ends: closing with unread data would reset the connection and could lose the 503.
        limits._closing.add(self)
        self._timer = self._loop.call_later(min(CLOSE_GRACE_SECONDS, limits.header_timeout), self._close)

    def _close(self) -> None:
        if self.transport is None:
            return
        self.limits._closing.add(self)
        self.transport.close()
        # A client that reads nothing would keep a closing socket (and a TLS shutdown) alive.
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._abort_timer = self._loop.call_later(CLOSE_GRACE_SECONDS, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._abort_timer = None


_Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
_Factory = Callable[..., BaseRequest]


def _connection_of(transport: asyncio.BaseTransport | None) -> GuardedConnection | None:
    return GuardedConnection.live.get(transport) if transport is not None else None


def _marks_heads(factory: _Factory) -> _Factory:
    """``request_factory`` that tells the connection its head is complete, as aiohttp hands it on."""

    def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> BaseRequest:
        conn = _connection_of(protocol.transport)
        if conn is not None:
            conn.request_started(payload)
        return factory(message, payload, protocol, writer, task)

    make_request.guarded = True  # type: ignore[attr-defined]
    return make_request


def _bounds_bodies(handler: _Handler) -> _Handler:
    """``request_handler`` with the body deadline, and the connection back to idle once answered."""

    async def handle(request: BaseRequest) -> web.StreamResponse:
        conn = _connection_of(request.transport)
        if conn is None:  # a site of the same runner that is not guarded
            return await handler(request)
        body_timeout = conn.limits.body_timeout
        payload = request.content

        def expire() -> None:
            if not payload.is_eof():
                payload.set_exception(BodyTimeout())

        timer = asyncio.get_running_loop().call_later(body_timeout, expire)
        try:
            return await handler(request)
        except BodyTimeout:
            metrics.TIMEOUTS.labels("body").inc()
            log.info(
                "request body not received in time; closing the connection",
                extra={"peer": request.remote, "timeout_s": body_timeout, "path": request.path},
            )
            response = error_response(
                408,
                "request_timeout",
                f"the request body did not arrive within {body_timeout:g} s",
                request_id_of(request.headers),
            )
            response.force_close()
            return response
        finally:
            timer.cancel()
            conn.request_finished(body_read=payload.is_eof())

    handle.guarded = True  # type: ignore[attr-defined]
    return handle


#: The fixed answers of ``OwnAnswers``: (error code, detail) by status.
_FIXED_ANSWERS = {
    400: ("bad_request", "the request line or headers are malformed"),
    500: ("internal_error", "the request could not be handled"),
    504: ("timeout", "the request could not be handled in time"),
}


class OwnAnswers(RequestHandler):
    """aiohttp's per-connection protocol, with the answers aiohttp gives by itself made ours.

    ``handle_error`` is what aiohttp calls for a request its parser refused (400) and for an
    exception that escaped every handler (500, 504): the answer is our JSON problem with a fixed
    detail, the connection is closed, and the log line carries the error's type (and for a 500 the
    code location), never the exception's text, which for a parser error quotes the raw bytes.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error_type = type(exc).__name__ if exc is not None else None
        if status >= 500:
            where = traceback.extract_tb(exc.__traceback__)[-1:] if exc is not None else []
            log.error(
                "unhandled error in a request handler",
                extra={
                    "status": status,
                    "error_type": error_type,
                    "where": [f"{f.filename}:{f.lineno} in {f.name}" for f in where],
                    "path": request.path if request.method != "UNKNOWN" else None,
                },
            )
        else:
            log.info(
                "malformed request refused",
                extra={"peer": request.remote, "status": status, "error_type": error_type},
            )
        if request.writer.output_size > 0:
            # Part of an answer is out: another one cannot follow (aiohttp drops the connection).
            raise ConnectionError("an answer was already being sent")
        error, detail = _FIXED_ANSWERS.get(status, ("error", HTTPStatus(status).phrase.lower()))
        response = error_response(status, error, detail, request_id_of(request.headers))
        response.force_close()
        return response


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` whose connections go through ``GuardedConnection``."""

    __slots__ = ("_bound_port", "_host", "_limits", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: ConnectionLimits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        # aiohttp's 128 overflows under a burst of new connections: the kernel then drops the
        # handshake's last ACK and those clients hang unanswered for seconds (measured: 42 of a
        # 300-connection burst). The kernel caps this at net.core.somaxconn.
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._limits = limits

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "runner.setup() first"
        # Every request any app of this runner serves goes through the guard's two hooks (public
        # attributes of aiohttp's low-level Server, read by each new connection's protocol).
        if not getattr(server.request_factory, "guarded", False):
            server.request_factory = _marks_heads(server.request_factory)
        if not getattr(server.request_handler, "guarded", False):
            server.request_handler = _bounds_bodies(server.request_handler)
        limits = self._limits
        loop = asyncio.get_running_loop()
        # aiohttp builds its protocol as RequestHandler(server, loop=..., **kwargs) (web.Server's
        # __call__); OwnAnswers is built the same way, with the same keyword arguments (the
        # runner's and the app's handler_args), so only the error answer differs.
        options: dict[str, Any] = dict(server._kwargs)

        def protocol() -> OwnAnswers:
            return OwnAnswers(server, loop=loop, **options)

        self._server = await loop.create_server(
            lambda: GuardedConnection(limits, protocol),
            self._host,
            self._port,
            ssl=self._ssl_context,
            # The TLS handshake happens before any byte of HTTP: bound it like a request head.
            ssl_handshake_timeout=limits.header_timeout if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        self._limits.close_all()
