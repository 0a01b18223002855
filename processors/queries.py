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

Counts. Every worker keeps, for each table partition it actively owns, a counter of members per
audience. It is derived from the table: built by scanning a partition once that partition is
recovered and before its stream resumes, then kept exact by a hook on the table's writes (the old
value is read back in the same synchronous step as the write, so counter and table never disagree)
and on changelog records faust applies to a counted partition.
Nothing about it is persisted, so there is nothing to get out of step: a kill -9 rebuilds the table
from its changelog and the counters from the table; a partition-count change (changelog rebuilt by
the partitions tool) needs no migration. A partition that stays with a worker across a rebalance keeps
its counter; one that was away for even one generation is scanned again. A count request fans out to
the owners of all partitions (one request per worker) and is the exact sum, or 503 if any partition
has no settled owner.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from faust.types import TP
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram
from yarl import URL

from audience_relay import signals
from audience_relay.auth import DEFAULT_SOURCE, Authenticator
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from processors.membership import ENTER_US, MEMBER, SLUG, T_US, Value, from_us
from processors.split import normalize_identifier

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


def current_audiences(value: Value | None) -> list[str]:
    """Audience ids the stored value says the user is a member of now."""
    audiences: Mapping[str, list[Any]] = (value or {}).get("a") or {}
    return [audience for audience, entry in audiences.items() if entry[MEMBER]]


def member_view(identifier: str, match_field: str, value: Value) -> dict[str, Any]:
    """The answer of ``GET /v1/members/{identifier}`` for a stored value."""
    audiences: Mapping[str, list[Any]] = value.get("a") or {}
    current = [
        {
            "audience_id": audience,
            "audience_slug": entry[SLUG],
            "entered_at": from_us(entry[ENTER_US]),
            "updated_at": from_us(entry[T_US]),
        }
        for audience, entry in sorted(audiences.items())
        if entry[MEMBER]
    ]
    return {"identifier": identifier, "match_field": match_field, "audiences": current}


class PartitionCounts:
    """Members per audience for each table partition this worker actively owns (pure, in memory)."""

    def __init__(self) -> None:
        self._counts: dict[int, Counter[str]] = {}

    def rebuild(self, partition: int, values: Iterable[Value | None]) -> None:
        """Count a partition from scratch from all its stored values."""
        counts: Counter[str] = Counter()
        for value in values:
            counts.update(current_audiences(value))
        self._counts[partition] = counts

    def apply(self, partition: int, old: Value | None, new: Value | None) -> None:
        """Account for one table write; ignored for a partition that is not counted (yet)."""
        counts = self._counts.get(partition)
        if counts is None:
            return
        before, after = set(current_audiences(old)), set(current_audiences(new))
        for audience in after - before:
            counts[audience] += 1
        for audience in before - after:
            counts[audience] -= 1
            if counts[audience] <= 0:
                del counts[audience]

    def keep_only(self, partitions: set[int]) -> None:
        """Forget every partition not in ``partitions`` (it may be written elsewhere meanwhile)."""
        for partition in set(self._counts) - partitions:
            del self._counts[partition]

    def counted(self) -> set[int]:
        return set(self._counts)

    def is_counted(self, partition: int) -> bool:
        return partition in self._counts

    def count(self, partition: int, audience: str) -> int | None:
        """Members of ``audience`` in ``partition``; None when the partition is not counted here."""
        counts = self._counts.get(partition)
        return None if counts is None else counts.get(audience, 0)


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


# --- the table and faust's view of ownership ---------------------------------------------------


class TableReader:
    """Reads one partition of the faust membership table, RocksDB or in-memory.

    Reads go straight to the partition's store: a faust table read without an event context
    searches every local partition, standbys included, which may lag the active owner.
    """

    def __init__(self, table: Any, partitions: int) -> None:
        self.table = table
        self.partitions = partitions

    @property
    def _store(self) -> Any:
        return self.table.data

    def _rocksdb(self) -> bool:
        return hasattr(self._store, "_db_for_partition")

    def get(self, partition: int, identifier: str) -> Value | None:
        store = self._store
        if self._rocksdb():
            # The store's key encoding (the table's key serializer: JSON text), not the raw bytes.
            raw = store._db_for_partition(partition).get(store._encode_key(identifier))
            return None if raw is None else orjson.loads(raw)
        value: Value | None = store.data.get(identifier)
        return value

    def key_of(self, event: Any) -> str:
        """The table key of a changelog event."""
        if self._rocksdb():
            key: str = self._store._decode_key(event.message.key)
            return key
        return str(self.table._to_key(event.key))

    def values(self, partition: int) -> Iterator[Value | None]:
        store = self._store
        if self._rocksdb():
            for _key, raw in store._visible_items(store._db_for_partition(partition)):
                yield orjson.loads(raw)
            return
        for key, value in list(store.data.items()):
            if partition_for(key, self.partitions) == partition:
                yield value


@dataclass
class Ownership:
    """What this worker may answer for, from faust's rebalance and recovery state."""

    app: Any
    changelog_topic: str
    counts: PartitionCounts

    def active_partitions(self) -> set[int]:
        return {
            tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == self.changelog_topic
        }

    def settled(self) -> bool:
        """No rebalance or recovery under way (faust clears ``rebalancing`` once recovery is done)."""
        return not self.app.rebalancing and not self.app.in_recovery

    def serves(self, partition: int) -> bool:
        """True when this worker's table holds the current state of ``partition``."""
        return (
            self.settled()
            and TP(self.changelog_topic, partition) in self.app.assignor.assigned_actives()
            and self.counts.is_counted(partition)
        )

    def owners(self) -> dict[int, str]:
        """Partition -> URL of its active owner, from the last assignment (may be stale)."""
        out: dict[int, str] = {}
        for url, topics in self.app.assignor.tables_metadata().items():
            for partition in topics.get(self.changelog_topic, []):
                out[partition] = str(url).rstrip("/")
        return out


# --- HTTP ---------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The answer cannot be given correctly right now: 503 with Retry-After."""


class QueryService:
    """The query routes of one worker."""

    def __init__(self, app: Any, table: Any, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)
        self.counts = PartitionCounts()
        self.reader = TableReader(table, settings.partitions)
        self.ownership = Ownership(app, table.changelog_topic.get_topic_name(), self.counts)
        self.self_url = advertised_url(settings)
        self.timeout = aiohttp.ClientTimeout(total=settings.query_timeout_seconds)
        self._http: aiohttp.ClientSession | None = None
        self._hook_writes(table)
        self._hook_changelog(table)
        table.on_recover(self._on_recover)
        app.on_partitions_assigned.connect(self._on_assigned)

    # -- keeping the counters ---------------------------------------------------------------

    def _hook_writes(self, table: Any) -> None:
        """Count every table write: read the old value back, then let faust write and log it."""
        from faust.streams import current_event

        original = table.on_key_set
        counts, reader = self.counts, self.reader

        def on_key_set(key: str, value: Any) -> None:
            event = current_event()
            partition = event.message.partition if event is not None else None
            if partition is not None and counts.is_counted(partition):
                counts.apply(partition, reader.get(partition, key), value)
            original(key, value)

        table.on_key_set = on_key_set

    def _hook_changelog(self, table: Any) -> None:
        """Count changelog records applied to a counted partition (recovery after missed writes).

        Normally nothing: recovery and standby updates touch partitions that are not counted (they
        are scanned once recovered). But a worker that dropped out of the group unnoticed and got
        its partitions back recovers the other workers' writes into a partition it still counts.
        """
        original = table.apply_changelog_batch
        counts, reader = self.counts, self.reader

        def apply_changelog_batch(batch: Iterable[Any]) -> None:
            events = list(batch)
            counted = counts.counted()
            touched = {
                (e.message.partition, reader.key_of(e)) for e in events if e.message.partition in counted
            }
            before = {pk: reader.get(*pk) for pk in touched}
            original(events)
            for (partition, key), old in before.items():
                counts.apply(partition, old, reader.get(partition, key))

        table.apply_changelog_batch = apply_changelog_batch

    async def _on_assigned(self, sender: Any, assigned: Any = None, **_: Any) -> None:
        # Every generation passes here: a partition not ours in it may be written by another
        # worker meanwhile, so its counter is no longer trustworthy.
        self.counts.keep_only(self.ownership.active_partitions())

    async def _on_recover(self) -> None:
        # Called by faust once the active partitions are recovered, before their streams resume.
        started = time.monotonic()
        built = 0
        for partition in sorted(self.ownership.active_partitions() - self.counts.counted()):
            # One partition at a time, without awaiting inside: no write can fall between the
            # scan and the counter becoming live (writes to uncounted partitions are not tracked).
            self.counts.rebuild(partition, self.reader.values(partition))
            built += 1
            await asyncio.sleep(0)
        self.counts.keep_only(self.ownership.active_partitions())
        log.info(
            "audience counters ready: %d partition(s) rebuilt in %.3f s, counting %s",
            built,
            time.monotonic() - started,
            sorted(self.counts.counted()),
            extra={
                "rebuilt_partitions": built,
                "counted_partitions": sorted(self.counts.counted()),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

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
            value = self.reader.get(partition, identifier)
            if value is None:
                return self._error(
                    404,
                    "unknown_identifier",
                    f"no event for {self.settings.match_field} {identifier!r} has been processed",
                    request_id,
                )
            return self._json(member_view(identifier, self.settings.match_field, value))

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
            n = self.counts.count(partition, audience) if self.ownership.serves(partition) else None
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


def register_queries(app: Any, table: Any, settings: Settings) -> QueryService:
    """Serve the query routes on the worker's web server and keep the audience counters."""
    service = QueryService(app, table, settings)
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
