"""The ingress: Lytics webhook bodies in, Kafka records out, 200 only once the broker acknowledged.

Route → handler → ``Publisher.send``. The handler reads no more of a request than it must: it
authenticates from the headers, refuses an oversized body from its Content-Length before reading it,
checks that the body is a JSON object or array of objects, and produces the *unchanged* bytes to
``<prefix>.webhooks.raw`` with the receipt metadata in Kafka headers.

Memory is bounded by the settings, not by the clients: a body is read only into bytes reserved
beforehand from the in-flight budget (``RELAY_MAX_INFLIGHT_BYTES``) — all of a declared
Content-Length before the first byte is read, or chunk by chunk for a chunked body — and a request
that does not fit is answered 429 at once, without reading the rest. The unauthenticated token
endpoint reads at most ``TOKEN_BODY_LIMIT`` bytes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from audience_relay.auth import DEFAULT_SOURCE, Authenticator
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from ingress import metrics
from ingress.access import PRINCIPAL, access_middleware
from ingress.errors import error_response, request_id_of
from ingress.publisher import BrokerUnavailable, Headers, Publisher
from ingress.ratelimit import RateLimiter
from ingress.validation import body_problem

log = logging.getLogger("ingress")

SETTINGS = web.AppKey("settings", Settings)
TOPICS = web.AppKey("topics", TopicNames)
AUTH = web.AppKey("auth", Authenticator)
PUBLISHER = web.AppKey("publisher", Publisher)

#: The OpenAPI document of every route below (tests keep the two in step).
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")


#: The most the token endpoint reads: a client-credentials request is a few hundred bytes.
TOKEN_BODY_LIMIT = 4096


class InflightBudget:
    """Caps the bytes read from clients but not yet acknowledged by Kafka (backpressure → 429).

    A hard cap: bytes are reserved *before* they are read, and ``used`` never exceeds ``limit``
    (``build_app`` refuses a ``RELAY_MAX_BODY_BYTES`` over it, so every body can fit alone).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: The most ever reserved at once (never above ``limit``).
        self.peak = 0

    def try_acquire(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        metrics.INFLIGHT_BYTES.set(self.used)
        return True

    def release(self, n: int) -> None:
        self.used -= n
        metrics.INFLIGHT_BYTES.set(self.used)


class _Refused(Exception):
    """A body that cannot be read within the limits: answered ``status`` (429 or 413)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


BUDGET = web.AppKey("budget", InflightBudget)
OPENAPI = web.AppKey("openapi", bytes)


def _error(
    status: int, error: str, detail: str, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    return error_response(status, error, detail, request_id, headers)


def _request_id(request: web.Request) -> str:
    return request_id_of(request.headers)


def record_headers(
    *, source: str, request_id: str, content_type: str, received_at: datetime, auth_method: str
) -> Headers:
    """Kafka headers carried with every raw (and ingress dead-letter) record."""
    return [
        ("received-at", received_at.isoformat(timespec="microseconds").replace("+00:00", "Z").encode()),
        ("source", source.encode()),
        ("content-type", content_type.encode()),
        ("request-id", request_id.encode()),
        ("auth", auth_method.encode()),
    ]


async def receive_webhook(request: web.Request) -> web.Response:
    """``POST /v1/lytics[/{source}]``: store one Lytics webhook body in Kafka."""
    started = time.perf_counter()
    source = request.match_info.get("source", DEFAULT_SOURCE)
    response = await _receive(request, source)
    route = "/v1/lytics/{source}" if "source" in request.match_info else "/v1/lytics"
    # The path names the source: an unknown one must not become a label of its own.
    label = source if request.app[AUTH].knows_source(source) else "unknown"
    metrics.REQUESTS.labels(route, str(response.status), label).inc()
    metrics.LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


async def _receive(request: web.Request, source: str) -> web.Response:
    app = request.app
    settings, auth, publisher, topics = app[SETTINGS], app[AUTH], app[PUBLISHER], app[TOPICS]
    request_id = _request_id(request)
    retry_after = {"Retry-After": str(settings.retry_after_seconds)}

    if not auth.knows_source(source):
        return _error(404, "unknown_source", f"no Lytics source named {source!r} is configured", request_id)
    # The access middleware authenticated the request for this source before the handler ran.
    principal = request[PRINCIPAL]
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return _error(
            415, "unsupported_encoding", "send the body uncompressed (no Content-Encoding)", request_id
        )

    declared = request.content_length
    if declared is not None and declared > settings.max_body_bytes:
        log.warning(
            "body over the size limit",
            extra={
                "request_id": request_id,
                "source": source,
                "bytes": declared,
                "limit": settings.max_body_bytes,
            },
        )
        return _error(
            413,
            "body_too_large",
            f"{declared} bytes is over the limit of {settings.max_body_bytes}",
            request_id,
        )

    budget = app[BUDGET]
    reservation = _Reservation(budget)
    try:
        try:
            body = await _read_reserved(request, reservation, settings.max_body_bytes)
        except _Refused as refused:
            # A 429 is backpressure (counted by relay_ingress_requests_total); a 413 is worth a look.
            log.log(
                logging.INFO if refused.status == 429 else logging.WARNING,
                "body refused",
                extra={
                    "request_id": request_id,
                    "source": source,
                    "status": refused.status,
                    "bytes_read": reservation.held,
                    "limit": settings.max_body_bytes,
                    "inflight_limit": budget.limit,
                },
            )
            if refused.status == 429:
                return _error(429, "busy", refused.detail, request_id, retry_after)
            return _error(413, "body_too_large", refused.detail, request_id)

        received_at = datetime.now(UTC)
        content_type = request.headers.get("Content-Type", "")
        headers = record_headers(
            source=source,
            request_id=request_id,
            content_type=content_type,
            received_at=received_at,
            auth_method=principal.method,
        )
        problem = body_problem(body)
        topic = topics.dead_letter if problem else topics.raw
        if problem:
            headers += [("reason", problem.encode()), ("stage", b"ingress")]
        try:
            await publisher.send(topic, body, headers)
        except BrokerUnavailable as exc:
            metrics.PRODUCER_ERRORS.labels(topic).inc()
            log.warning(
                "kafka did not acknowledge; answering 503",
                extra={"request_id": request_id, "source": source, "topic": topic, "error": str(exc)},
            )
            return _error(
                503, "unavailable", "the event log is unavailable; retry later", request_id, retry_after
            )
        if problem:
            log.info(
                "bad body dead-lettered",
                extra={"request_id": request_id, "source": source, "reason": problem},
            )
            return _error(400, "bad_body", problem, request_id)
        metrics.BODY_BYTES.observe(len(body))
        log.debug("webhook stored", extra={"request_id": request_id, "source": source, "bytes": len(body)})
        return web.Response(
            body=orjson.dumps({"status": "stored", "request_id": request_id}),
            content_type="application/json",
            headers={"X-Request-Id": request_id},
        )
    finally:
        reservation.release()


class _Reservation:
    """The bytes one request holds in the in-flight budget, released once when it is answered."""

    def __init__(self, budget: InflightBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> bool:
        if not self.budget.try_acquire(n):
            return False
        self.held += n
        return True

    def release(self) -> None:
        self.budget.release(self.held)
        self.held = 0


async def _read_reserved(request: web.Request, reservation: _Reservation, max_bytes: int) -> bytes:
    """The whole body, every byte of it reserved before it was read; ``_Refused`` when it cannot be.

    With a Content-Length the whole length is reserved up front (429 at once when it does not fit,
    nothing read); a chunked body reserves each piece as it arrives and is refused at the first
    piece that does not fit, or that takes it over ``max_bytes``. What aiohttp buffers per
    connection before we read it is bounded by its read buffer (README "Memory").
    """
    declared = request.content_length
    if declared is not None and not reservation.take(declared):
        raise _Refused(429, "too many bytes in flight; retry later")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > max_bytes:
            raise _Refused(413, f"the body is over the limit of {max_bytes}")
        if declared is None and not reservation.take(len(chunk)):
            raise _Refused(429, "too many bytes in flight; retry later")
        chunks.append(chunk)
    return b"".join(chunks)


async def issue_token(request: web.Request) -> web.Response:
    """``POST /oauth/token``: OAuth 2.0 client-credentials grant (RFC 6749 §4.4)."""
    auth = request.app[AUTH]
    try:
        form = await _token_form(request)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": "invalid_request"}, status=413, dumps=_dumps)
    except ValueError:  # a form aiohttp cannot parse (e.g. multipart without a boundary)
        return web.json_response({"error": "invalid_request"}, status=400, dumps=_dumps)
    client_id, client_secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
    basic = request.headers.get("Authorization", "")
    if basic.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(basic[6:].strip(), validate=True).decode()
            cid, _, secret = decoded.partition(":")
            client_id, client_secret = unquote(cid), unquote(secret)
        except (binascii.Error, UnicodeDecodeError):
            pass
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400, dumps=_dumps)
    token = auth.issue_token(client_id, client_secret)
    if token is None:
        response = web.json_response(
            {"error": "invalid_client"}, status=401, headers={"WWW-Authenticate": "Basic"}, dumps=_dumps
        )
        response.force_close()  # a client that cannot authenticate gets no kept-alive connection
        return response
    return web.json_response(
        {"access_token": token.access_token, "token_type": "Bearer", "expires_in": token.expires_in},
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        dumps=_dumps,
    )


async def _token_form(request: web.Request) -> dict[str, Any]:
    """The token request's fields, from a JSON object or a form body (empty when neither).

    Reads at most ``TOKEN_BODY_LIMIT`` bytes (413 from the Content-Length, or as soon as a chunked
    body passes it): this route needs no credentials, so what it reads must not be the client's
    choice. Raises ``web.HTTPRequestEntityTooLarge`` over the limit and ``ValueError`` for a body
    that is neither JSON nor a URL-encoded form.
    """
    declared = request.content_length
    if declared is not None and declared > TOKEN_BODY_LIMIT:
        raise web.HTTPRequestEntityTooLarge(max_size=TOKEN_BODY_LIMIT, actual_size=declared)
    body = b""
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > TOKEN_BODY_LIMIT:
            raise web.HTTPRequestEntityTooLarge(max_size=TOKEN_BODY_LIMIT, actual_size=len(body))
    if request.content_type == "application/json":
        try:
            loaded = orjson.loads(body)
        except orjson.JSONDecodeError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    if request.content_type.startswith("multipart/"):
        raise ValueError("send the token request as a URL-encoded form or JSON")
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True))
    except UnicodeDecodeError:
        raise ValueError("the form is not UTF-8") from None


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "alive"}, dumps=_dumps)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the producer is connected and the broker answers with the raw topic known."""
    app = request.app
    ok = await app[PUBLISHER].ready(app[TOPICS].raw)
    return web.json_response(
        {"status": "ready" if ok else "not_ready"}, status=200 if ok else 503, dumps=_dumps
    )


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_document(request: web.Request) -> web.Response:
    """``GET /openapi.yaml``: the OpenAPI document (the access middleware asked for credentials)."""
    return web.Response(body=request.app[OPENAPI], content_type="application/yaml")


async def _publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.stop()


def build_app(
    settings: Settings, publisher: Publisher | None = None, *, insecure: bool = False
) -> web.Application:
    """The ingress application; its Kafka producer lives as long as the app (``cleanup_ctx``).

    Every route but the public ones (``ingress.access.PUBLIC_ROUTES``) requires credentials.
    ``/metrics`` is served here only when ``RELAY_INGRESS_METRICS_PORT`` equals the ingress port;
    otherwise it lives on the operations app (``build_ops_app``).
    """
    if settings.max_body_bytes > settings.max_inflight_bytes:
        raise ValueError(
            f"RELAY_MAX_BODY_BYTES ({settings.max_body_bytes}) is over RELAY_MAX_INFLIGHT_BYTES "
            f"({settings.max_inflight_bytes}): a body that size could never be admitted; raise the budget "
            "or lower the body limit"
        )
    auth = Authenticator(settings, allow_anonymous=insecure)
    limiter = RateLimiter(settings.ingress_rate_limit_per_second, settings.ingress_rate_limit_burst)
    # auto_decompress off: aiohttp would otherwise inflate a gzip/deflate body as it arrives (a
    # gzip bomb costs memory before the handler can refuse it) and answer an undecodable encoding
    # (br without Brotli) with a plain-text 400 of its own. The handler answers every encoding 415.
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        handler_args={"auto_decompress": False},
        # The head and body deadlines are the listener's (ingress.guard.GuardedSite), for every app.
        middlewares=[access_middleware(auth, limiter)],
    )
    app[SETTINGS] = settings
    app[TOPICS] = TopicNames.from_settings(settings)
    app[AUTH] = auth
    app[PUBLISHER] = publisher or Publisher(settings)
    app[BUDGET] = InflightBudget(settings.max_inflight_bytes)
    app.cleanup_ctx.append(_publisher_ctx)
    app.router.add_post("/v1/lytics", receive_webhook)
    app.router.add_post("/v1/lytics/{source}", receive_webhook)
    app.router.add_post("/oauth/token", issue_token)
    # No implicit HEAD routes: the routes are exactly those of ingress/openapi.yaml.
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    if settings.ingress_metrics_port == settings.ingress_port:
        app.router.add_get("/metrics", metrics_view, allow_head=False)
    app[OPENAPI] = OPENAPI_PATH.read_bytes()
    app.router.add_get("/openapi.yaml", openapi_document, allow_head=False)
    if auth.ephemeral_signing_key and auth.credentials.clients:
        log.warning("RELAY_OAUTH_SIGNING_KEY is not set: OAuth tokens are valid only for this process")
    return app


def build_ops_app(main: web.Application) -> web.Application:
    """``/metrics``, ``/healthz`` and ``/readyz`` for the operations port (no credentials, no body)."""

    async def ready(request: web.Request) -> web.Response:
        ok = await main[PUBLISHER].ready(main[TOPICS].raw)
        return web.json_response(
            {"status": "ready" if ok else "not_ready"}, status=200 if ok else 503, dumps=_dumps
        )

    ops = web.Application(client_max_size=1024)
    ops.router.add_get("/metrics", metrics_view, allow_head=False)
    ops.router.add_get("/healthz", healthz, allow_head=False)
    ops.router.add_get("/readyz", ready, allow_head=False)
    return ops


def run(settings: Settings, *, insecure: bool = False) -> None:
    """Serve the ingress until SIGINT/SIGTERM (see ``ingress.server``)."""
    from ingress.server import run_server

    run_server(settings, insecure=insecure)
