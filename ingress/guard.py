"""Slow and abusive clients: a connection cap, a request-head deadline and a request-body deadline.

aiohttp's server has a keep-alive timeout but no deadline for receiving a request head or body, so a
client that sends its headers (or body) a byte at a time can hold a connection, a handler and buffers
for as long as it likes (slowloris). Two small pieces close that gap:

- ``GuardedConnection`` wraps aiohttp's per-connection protocol (``RequestHandler``) at the asyncio
  level. It counts the listener's open connections and refuses one over ``max_connections`` with a
  canned 503 + Retry-After before any aiohttp code runs. It starts a deadline when a connection opens
  and whenever the first byte of a new request arrives on an idle keep-alive connection; if the
  request's handler has not started (i.e. the head is incomplete) when it fires, the client gets a
  408 and the connection is closed.
- ``deadline_middleware`` tells the connection when a request's handler starts and ends (which is
  how the wrapper knows the head was complete without parsing HTTP itself), and gives the body its
  own deadline: if the body has not fully arrived in time, the pending read fails, the handler's
  clean-up runs (releasing its in-flight reservation) and the client gets a 408 on a closed
  connection.

``GuardedSite`` is aiohttp's ``TCPSite`` with the wrapper in the protocol factory (and the TLS
handshake bounded by the same head deadline).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.web_request import Request

from ingress import metrics
from ingress.errors import error_response, raw_error, request_id_of

log = logging.getLogger("ingress")

#: How long a refused or timed-out connection may take to close cleanly before it is aborted.
CLOSE_GRACE_SECONDS = 1.0


@dataclass
class ConnectionLimits:
    """What one listener allows, and how many connections it holds now."""

    max_connections: int
    header_timeout: float
    retry_after: int
    listener: str = "main"
    open: int = 0
    refusing: int = 0
    _closing: set[GuardedConnection] = field(default_factory=set)

    def close_all(self) -> None:
        """At shutdown: drop the connections still being refused or cut."""
        for conn in list(self._closing):
            conn.abort()


class BodyTimeout(TimeoutError):
    """The request body did not arrive within the body deadline.

    A ``TimeoutError`` so that aiohttp's own post-handler drain of an unread body stops on it quietly.
    """


# idle: kept alive between requests (aiohttp's keep-alive timeout applies); head: a request head is
# arriving (head deadline); busy: a handler runs; drain: the handler answered without reading the
# whole body and aiohttp reads the rest (bounded by the head deadline, closed silently).
_IDLE, _HEAD, _BUSY, _DRAIN = "idle", "head", "busy", "drain"


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
        self._got_bytes = False
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
        if self.inner is None:
            return  # being refused: read and drop, so closing does not reset the connection
        if self._state == _IDLE:
            # The first byte of the next request on a kept-alive connection starts its head deadline.
            self._state = _HEAD
            self._arm(self.limits.header_timeout)
        self._got_bytes = self._got_bytes or bool(data)
        self.inner.data_received(data)

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

    # --- called by the middleware ---------------------------------------------------------------

    def request_started(self) -> None:
        """The head is complete and a handler runs: the head deadline no longer applies."""
        self._state = _BUSY
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_finished(self, body_read: bool) -> None:
        """Back to idle keep-alive (aiohttp's keep-alive timeout governs), until the next byte.

        If the body was not read to its end, the bytes still coming are that body, not a new head:
        they must not earn a 408 after the answer was sent, but they get no more time than a head.
        """
        self._got_bytes = False
        if body_read:
            self._state = _IDLE
        else:
            self._state = _DRAIN
            self._arm(self.limits.header_timeout)

    # --- internals ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(seconds, self._head_deadline)

    def _head_deadline(self) -> None:
        self._timer = None
        if self._state == _BUSY or self.transport is None or self.transport.is_closing():
            return
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


def deadline_middleware(body_timeout: float) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Marks a guarded connection busy while a handler runs, and bounds the time to receive a body."""

    @web.middleware
    async def deadlines(
        request: Request, handler: Callable[[Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        transport = request.transport
        conn = GuardedConnection.live.get(transport) if transport is not None else None
        if conn is not None:
            conn.request_started()
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
            if conn is not None:
                conn.request_finished(body_read=payload.is_eof())

    return deadlines


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
        limits = self._limits
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GuardedConnection(limits, server),
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
