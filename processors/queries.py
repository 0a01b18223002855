"""Membership queries served by the workers from the membership table.

    GET /v1/members/{identifier}          the audiences a user is in now (404 when never seen)
    GET /v1/audiences/{audience_id}/count the current members of an audience, over all partitions
    GET /openapi.yaml                     this API (processors/openapi.yaml)
    GET /internal/v1/partition-counts/{audience_id}?partitions=0,3
                                          one worker's exact counts for partitions it owns (fan-out)

Routing. An identifier lives in table partition ``murmur2(identifier) % partitions`` (the key's
partition in ``segment-events``, which is the partition of its changelog record). Any worker takes a
request; it answers from its own table when it is the settled, recovered active owner of that
partition, otherwise it forwards the request once (``X-Relay-Forwarded``) to the owner named by the
group's last assignment (faust's ``tables_metadata``, the map ``app.table_route`` uses). The owner
checks ownership again itself, so a stale map can cost a 503, never a wrong answer. A forwarded
request is never forwarded again. Unknown owner, a rebalance or table recovery under way, or an owner
that does not answer: 503 with ``Retry-After``. faust's own ``table_route`` is not used: it hashes
the key as the changelog serializes it (JSON text, ``"user@x"`` with quotes), not as the records are
partitioned, so it picks the wrong worker for ~7 keys in 8 here; and it answers locally without
checking that recovery is done, drops ``Retry-After``, has no timeout and can bounce between two
workers whose maps disagree. The limit that remains: a worker cut off from the group without knowing
it (e.g. a long pause) keeps answering from its table until its session times out.

Counts. The membership stage keeps, for each table partition it processes, an exact counter of
members per audience (processors/stages.py ``AudienceCounts``): built by scanning the partition when
the stage starts it, then kept by the stage's own writes, dropped when it stops. A count request fans
out to the owners of all partitions (one request per worker) and is the exact sum, or 503 if any
partition has no settled owner.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram
from yarl import URL

from audience_relay import signals
from audience_relay.auth import DEFAULT_SOURCE, Authenticator
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from processors.membership import identifier_prefix
from processors.split import normalize_identifier

if TYPE_CHECKING:
    from processors.app import Processors

log = logging.getLogger("processors.queries")

OPENAPI = Path(__file__).with_name("openapi.yaml")
FORWARDED = "X-Relay-Forwarded"
SERVED_BY = "X-Relay-Served-By"
_PASS_HEADERS = ("Authorization", "X-API-KEY", "X-Request-Id")

QUERIES = PromCounter("relay_queries_total", "Membership query answers", ["route", "status"])
QUERY_SECONDS = Histogram(
    "relay_query_seconds",
    "Time to answer a membership query (including a forward)",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


# --- pure pieces ------------------------------------------------------------------------------


#: What ``GET /v1/members/{identifier}`` shows of a destination's last outcome.
DELIVERY_FIELDS = ("outcome", "change", "change_id", "at", "status", "attempts")


def member_view(
    identifier: str,
    match_field: str,
    states: list[dict[str, Any]],
    deliveries: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The answer of ``GET /v1/members/{identifier}`` for the stored states of one identifier and
    the sinks' last outcomes for it (``DeliveryOutcome`` records), shown beside each membership."""
    outcomes: dict[str, dict[str, dict[str, Any]]] = {}
    for outcome in deliveries or ():
        shown = {k: outcome.get(k) for k in DELIVERY_FIELDS}
        outcomes.setdefault(outcome["audience_id"], {})[outcome["destination"]] = shown
    current = [
        {
            "audience_id": state["audience_id"],
            "audience_slug": state["audience_slug"],
            "entered_at": state["entered_at"],
            "updated_at": state["updated_at"],
            "deliveries": dict(sorted(outcomes.get(state["audience_id"], {}).items())),
        }
        for state in sorted(states, key=lambda st: st["audience_id"])
        if state["member"]
    ]
    return {"identifier": identifier, "match_field": match_field, "audiences": current}


def parse_partitions(text: str, partitions: int) -> list[int] | None:
    """``"0,3"`` -> [0, 3]; None when malformed or out of range."""
    try:
        found = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        return None
    if not found or found[0] < 0 or found[-1] >= partitions:
        return None
    return found


def advertised_url(settings: Settings) -> str:
    """The URL other workers use to reach this worker's web server (faust's ``canonical_url``)."""
    if settings.worker_advertised_url:
        return settings.worker_advertised_url.rstrip("/")
    host = settings.worker_web_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()  # a wildcard bind address is no address to call
    return f"http://{host}:{settings.worker_web_port}"


# --- faust's view of ownership ------------------------------------------------------------------


@dataclass
class Ownership:
    """What this worker may answer for: the partitions its membership stage processes right now."""

    processors: Processors

    def settled(self) -> bool:
        """No rebalance or recovery under way (faust clears ``rebalancing`` once recovery is done)."""
        app = self.processors.app
        return not app.rebalancing and not app.in_recovery

    def serves(self, partition: int) -> bool:
        """True when this worker's table holds the current state of ``partition``."""
        membership = self.processors.membership
        return self.settled() and membership is not None and partition in membership.active

    def owners(self) -> dict[int, str]:
        """Partition -> URL of its active owner, from the last assignment (may be stale)."""
        out: dict[int, str] = {}
        topic = self.processors.changelog_topic
        for url, topics in self.processors.app.assignor.tables_metadata().items():
            for partition in topics.get(topic, []):
                out[partition] = str(url).rstrip("/")
        return out


# --- HTTP ---------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The answer cannot be given correctly right now: 503 with Retry-After."""


class QueryService:
    """The query routes of one worker."""

    def __init__(self, processors: Processors, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)
        self.processors = processors
        self.ownership = Ownership(processors)
        self.self_url = advertised_url(settings)
        self.timeout = aiohttp.ClientTimeout(total=settings.query_timeout_seconds)
        self._http: aiohttp.ClientSession | None = None

    # -- routes -------------------------------------------------------------------------------

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Any]]]:
        """(method, path, handler) of every query route."""
        return [
            ("GET", "/v1/members/{identifier:.+}", self.member),
            ("GET", "/v1/audiences/{audience_id}/count", self.audience_count),
            ("GET", "/internal/v1/partition-counts/{audience_id}", self.partition_counts),
            ("GET", "/openapi.yaml", self.openapi),
        ]

    def _error(
        self, status: int, error: str, detail: str, request_id: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            status=status,
            body=orjson.dumps({"error": error, "detail": detail, "request_id": request_id}),
            content_type="application/json",
            headers=headers,
        )

    def _unavailable(self, detail: str, request_id: str) -> web.Response:
        return self._error(
            503, "unavailable", detail, request_id, {"Retry-After": str(self.settings.retry_after_seconds)}
        )

    def _json(self, body: Any) -> web.Response:
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _authorized(self, request: web.Request) -> bool:
        return self.auth.authenticate(DEFAULT_SOURCE, request.headers, request.query) is not None

    async def _guard(
        self, route: str, request: web.Request, handler: Callable[[str], Any]
    ) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id", "")[:128] or f"q-{time.monotonic_ns():x}"
        started = time.perf_counter()
        if not self._authorized(request):
            response: web.StreamResponse = self._error(
                401,
                "unauthorized",
                "missing or invalid credentials",
                request_id,
                {"WWW-Authenticate": "Bearer"},
            )
        else:
            try:
                response = await handler(request_id)
            except Unavailable as exc:
                response = self._unavailable(str(exc), request_id)
        response.headers.setdefault(SERVED_BY, self.self_url)
        QUERIES.labels(route, str(response.status)).inc()
        QUERY_SECONDS.labels(route).observe(time.perf_counter() - started)
        return response

    async def member(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/members/{identifier}."""

        async def answer(request_id: str) -> web.StreamResponse:
            identifier = normalize_identifier(request.match_info["identifier"], self.settings.match_field)
            if not identifier:
                return self._error(400, "bad_identifier", "the identifier is empty", request_id)
            partition = partition_for(identifier, self.settings.partitions)
            if not self.ownership.serves(partition):
                return await self._forward(request, partition, request_id)
            states = [
                orjson.loads(value)
                for _, value in self.processors.store.items(partition, identifier_prefix(identifier))
            ]
            if not states:
                return self._error(
                    404,
                    "unknown_identifier",
                    f"no event for {self.settings.match_field} {identifier!r} has been processed",
                    request_id,
                )
            prefix = identifier_prefix(identifier)
            deliveries = [
                orjson.loads(value) for _, value in self.processors.deliveries_store.items(partition, prefix)
            ]
            return self._json(member_view(identifier, self.settings.match_field, states, deliveries))

        return await self._guard("member", request, answer)

    async def audience_count(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/audiences/{audience_id}/count: the sum over every partition's owner."""

        async def answer(request_id: str) -> web.StreamResponse:
            audience = request.match_info["audience_id"]
            owners = self.ownership.owners()
            missing = set(range(self.settings.partitions)) - set(owners)
            if missing:
                raise Unavailable(f"no known owner for partition(s) {sorted(missing)}")
            by_owner: dict[str, list[int]] = {}
            for partition, url in owners.items():
                if partition < self.settings.partitions:
                    by_owner.setdefault(url, []).append(partition)
            parts = await asyncio.gather(
                *(self._counts_from(url, audience, sorted(ps), request) for url, ps in by_owner.items())
            )
            return self._json(
                {
                    "audience_id": audience,
                    "members": sum(sum(p.values()) for p in parts),
                    "partitions": self.settings.partitions,
                }
            )

        return await self._guard("count", request, answer)

    async def partition_counts(self, request: web.Request) -> web.StreamResponse:
        """GET /internal/v1/partition-counts/{audience_id}?partitions=…: counts this worker owns."""

        async def answer(request_id: str) -> web.StreamResponse:
            wanted = parse_partitions(request.query.get("partitions", ""), self.settings.partitions)
            if wanted is None:
                return self._error(
                    400, "bad_partitions", "partitions must list partition numbers, e.g. 0,3", request_id
                )
            return self._json(
                {
                    "audience_id": request.match_info["audience_id"],
                    "partitions": {str(p): n for p, n in self._local_counts(request, wanted).items()},
                }
            )

        return await self._guard("partition-counts", request, answer)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        """GET /openapi.yaml."""

        async def answer(request_id: str) -> web.StreamResponse:
            return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")

        return await self._guard("openapi", request, answer)

    # -- local answers and forwarding ----------------------------------------------------------

    def _local_counts(self, request: web.Request, partitions: list[int]) -> dict[int, int]:
        audience = request.match_info["audience_id"]
        out: dict[int, int] = {}
        for partition in partitions:
            membership = self.processors.membership
            n = (
                membership.counts.count(partition, audience)
                if membership is not None and self.ownership.serves(partition)
                else None
            )
            if n is None:
                raise Unavailable(f"partition {partition} is not settled on this worker")
            out[partition] = n
        return out

    async def _counts_from(
        self, url: str, audience: str, partitions: list[int], request: web.Request
    ) -> dict[int, int]:
        if url == self.self_url:
            return self._local_counts(request, partitions)
        query = {**request.query, "partitions": ",".join(map(str, partitions))}
        target = f"{url}/internal/v1/partition-counts/{_quote(audience)}"
        status, body, _headers = await self._call(target, query, request)
        if status != 200:
            raise Unavailable(f"the owner of partitions {partitions} answered {status}")
        got = {int(p): int(n) for p, n in orjson.loads(body)["partitions"].items()}
        if sorted(got) != partitions:
            raise Unavailable(f"the owner of partitions {partitions} answered for {sorted(got)}")
        return got

    async def _forward(self, request: web.Request, partition: int, request_id: str) -> web.StreamResponse:
        if request.headers.get(FORWARDED):
            raise Unavailable(f"partition {partition} is not settled on this worker")
        url = self.ownership.owners().get(partition)
        if url is None or url == self.self_url:
            raise Unavailable(f"partition {partition} has no settled owner yet")
        # The raw path: an identifier may hold characters that decoding would change (e.g. %2F).
        target = URL(url + request.rel_url.raw_path, encoded=True)
        status, body, headers = await self._call(target, request.query, request)
        response = web.Response(status=status, body=body, content_type="application/json")
        for name in ("Retry-After", "WWW-Authenticate", SERVED_BY):
            if name in headers:
                response.headers[name] = headers[name]
        return response

    async def _call(
        self, url: str | URL, query: Mapping[str, str], request: web.Request
    ) -> tuple[int, bytes, Mapping[str, str]]:
        headers = {name: request.headers[name] for name in _PASS_HEADERS if name in request.headers}
        headers[FORWARDED] = self.self_url
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._http.get(url, params=query, headers=headers, allow_redirects=False) as resp:
                return resp.status, await resp.read(), dict(resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"the owning worker did not answer ({type(exc).__name__})") from None

    async def close(self, _app: web.Application | None = None) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def register_queries(app: Any, processors: Processors, settings: Settings) -> QueryService:
    """Serve the query routes on the worker's web server."""
    service = QueryService(processors, settings)
    web_app: web.Application = app.web.web_app
    for method, path, handler in service.routes():
        web_app.router.add_route(method, path, handler)
    web_app.on_cleanup.append(service.close)

    async def reload_on_hangup(_: web.Application) -> None:
        # SIGHUP re-reads RELAY_INGRESS_KEYS_FILE, like the ingress (README "Signals").
        signals.install(asyncio.get_running_loop(), "worker", reload=service.auth.try_reload)

    web_app.on_startup.append(reload_on_hangup)
    if settings.oauth_clients and settings.oauth_signing_key is None:
        log.warning(
            "RELAY_OAUTH_SIGNING_KEY is not set: bearer tokens from the ingress are not accepted by "
            "the query routes (set the same key on every ingress and worker)"
        )
    return service
