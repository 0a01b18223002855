"""Who may call what: every route needs credentials unless it is on the public allowlist.

The check is a middleware, so a route added later is protected without anyone remembering to. A
request is authenticated for the source its path names (``/v1/lytics/{source}``), else for the
default source (global keys and OAuth clients, plus ``RELAY_SOURCES["default"]`` if configured).
Every refusal is the same 401, whatever was wrong (missing, unknown, truncated, expired, forged,
meant for another source), and closes the connection. An authenticated source that sends faster
than its token bucket allows gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_request import Request

from audience_relay.auth import DEFAULT_SOURCE, Authenticator, Principal
from ingress import metrics
from ingress.errors import error_response, request_id_of
from ingress.ratelimit import RateLimiter

log = logging.getLogger("ingress")

#: Routes anyone may call. ``/oauth/token`` checks the client's own credentials itself (RFC 6749).
PUBLIC_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/oauth/token"})

#: Where the handler finds who the request was authenticated as.
PRINCIPAL = web.RequestKey("principal", Principal)

UNAUTHORIZED_DETAIL = "missing or invalid credentials"


def route_label(request: Request) -> str:
    """The matched route's template (never the raw path, which the client chooses), for metrics."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def is_public(request: Request) -> bool:
    # A path that matched no route (404/405) is not public: unknown paths need credentials too.
    if request.match_info.http_exception is not None:
        return False
    return route_label(request) in PUBLIC_ROUTES


def unauthorized(request_id: str) -> web.Response:
    """The one 401 answer: identical body and headers whatever part of the credential was wrong."""
    response = error_response(
        401, "unauthorized", UNAUTHORIZED_DETAIL, request_id, {"WWW-Authenticate": "Bearer"}
    )
    # A client that cannot authenticate gets no kept-alive connection to sit on.
    response.force_close()
    return response


def access_middleware(
    auth: Authenticator, limiter: RateLimiter
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Authenticate (unless public), then apply the source's rate limit, then call the handler."""

    @web.middleware
    async def access(
        request: Request, handler: Callable[[Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if is_public(request):
            return await handler(request)
        source = request.match_info.get("source", DEFAULT_SOURCE)
        known = auth.knows_source(source)
        principal = auth.authenticate(source, request.headers, request.query)
        if principal is None:
            request_id = request_id_of(request.headers)
            log.info(
                "unauthenticated request",
                extra={
                    "request_id": request_id,
                    "route": route_label(request),
                    "source": source if known else None,
                    "peer": request.remote,
                },
            )
            metrics.REQUESTS.labels(route_label(request), "401", source if known else "unknown").inc()
            return unauthorized(request_id)
        # Unknown sources are not limited (they get a cheap 404): their names must not grow the buckets.
        wait = limiter.check(principal.source) if known else 0
        if wait:
            metrics.RATE_LIMITED.labels(principal.source).inc()
            metrics.REQUESTS.labels(route_label(request), "429", principal.source).inc()
            return error_response(
                429,
                "rate_limited",
                f"more than {limiter.rate:g} requests per second for source {principal.source!r}; "
                f"retry after {wait} s",
                request_id_of(request.headers),
                {"Retry-After": str(wait)},
            )
        request[PRINCIPAL] = principal
        routing = request.match_info.http_exception
        if routing is not None:
            # No route for this path or method: say so in the JSON every other error answer uses.
            allow = routing.headers.get("Allow")
            return error_response(
                routing.status,
                "not_found" if routing.status == 404 else "method_not_allowed",
                routing.reason,
                request_id_of(request.headers),
                {"Allow": allow} if allow is not None else None,
            )
        return await handler(request)

    return access
