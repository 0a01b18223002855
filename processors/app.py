"""The faust application: topics, the membership table and the two agents.

    <prefix>.webhooks.raw ─▶ split ─▶ <prefix>.segment-events ─▶ membership ─▶ <prefix>.membership-changes
                              └─▶ <prefix>.dead-letter         (table)   └─▶ <prefix>.membership

Both agents run with ``concurrency=1`` (faust #606: with more, an offset can be committed past a
message still in flight) and get their speed from partitions and from batches (``take_events``).

Crash safety (at-least-once + re-emission): for each batch the membership agent first sends every
change and waits for the broker's acknowledgement, and only then writes the table. Faust flushes the
producer before it commits offsets. So after a crash, either a key's table write survived — and then
its change was acknowledged before it — or it did not, and replaying the uncommitted events computes
the same flip again and emits it with the same deterministic change id. Changes are never lost; a
crash can only repeat one, with the same id, which receivers drop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
from faust.streams import _current_event  # no public way to name a table write's event
from faust.types import EventT, StreamT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from audience_relay import faustguard, kafka
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, replica_configs
from processors import flow, metrics, offsets, operations
from processors.membership import apply_event
from processors.queries import advertised_url, register_queries
from processors.split import Context, Rejected, Split, split_body

log = logging.getLogger("processors")


def _headers(event: EventT[bytes]) -> dict[str, bytes]:
    raw = event.message.headers
    items = raw.items() if isinstance(raw, Mapping) else (raw or [])
    return {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in items}


def _received_at(headers: Mapping[str, bytes], fallback_ms: float | None) -> datetime:
    text = headers.get("received-at", b"").decode(errors="replace")
    if text:
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
    return datetime.fromtimestamp((fallback_ms or time.time() * 1000) / 1000, UTC)


def _table_context(event: EventT[bytes]) -> None:
    """Tell the table which event (so which partition) the next read or write belongs to.

    A faust table finds the partition through the ``current_event`` context variable, which a
    batch from ``take_events`` leaves on the last event. Only the context variable is set: the
    stream's own ``current_event`` attribute is what its take buffer reads, and changing it
    there swaps events in the next batch.
    """
    _current_event.set(weakref.ref(event))


def _fatal_if_failed(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.critical(
            "kafka refused an output record; stopping before any offset moves past it",
            extra={"error": repr(future.exception())},
        )
        os._exit(70)


def _rocksdb_options(settings: Settings) -> dict[str, int]:
    per_partition = max(2, settings.table_memory_mb // max(1, settings.partitions)) * 1024 * 1024
    return {
        "write_buffer_size": per_partition // 4,
        "max_write_buffer_number": 2,
        "block_cache_size": per_partition // 2,
        "block_cache_compressed_size": 0,
        "max_open_files": 512,
    }


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


def app_id(settings: Settings) -> str:
    """The faust app id: also the consumer group and the prefix of the changelog topic."""
    return GroupNames.from_settings(settings).processors


def create_app(settings: Settings) -> faust.App:
    """The processors' faust app for ``settings`` (one per worker process)."""
    names = TopicNames.from_settings(settings)
    # Either transport guards its Kafka clients against broker outages (audience_relay/faustguard.py).
    scheme = offsets.SCHEME if settings.offset_guard else faustguard.SCHEME
    app = flow.App(
        app_id(settings),
        # relaykafka:// is faust's aiokafka transport with the offset guard (processors/offsets.py);
        # the brokers and their credentials (SASL/TLS) come from the one client factory.
        **kafka.faust_broker_settings(settings, scheme=scheme),
        store="rocksdb://" if settings.table_store == "rocksdb" else "memory://",
        # Tables live under the app id: a worker data dir shared by two prefixes must not mix them.
        datadir=str(settings.worker_data_dir / app_id(settings)),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=settings.standby_replicas,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.worker_session_timeout_seconds / 3),
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        # A raw record is a whole webhook body: prefetching thousands of them (faust's defaults)
        # costs hundreds of MiB on a backlog. The broker still returns a record larger than this.
        consumer_max_fetch_size=1024 * 1024,
        stream_buffer_maxsize=max(256, settings.processor_batch),
        producer_max_request_size=settings.max_body_bytes + 1024 * 1024,
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port,
        web_bind=settings.worker_web_host,
        web_in_thread=False,
        canonical_url=advertised_url(settings),
        # faust's /table and /router pages would show table contents without authentication.
        web_tables_enabled=False,
        web_router_enabled=False,
    )
    raw_topic = app.topic(
        names.raw, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    segments = app.topic(
        names.segment_events, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    table = app.Table(
        "membership",
        default=None,
        schema=faust.Schema(key_type=str, key_serializer="raw", value_serializer="json"),
        partitions=settings.partitions,
        help="identifier -> {audience id -> membership state}",
        # faust's RocksDB defaults (64 MiB x 3 memtables and a 2 GiB block cache, per partition)
        # let memory grow with the table; bound them so RSS follows RELAY_TABLE_MEMORY_MB.
        options=_rocksdb_options(settings),
        # Only used should faust create the changelog itself (topics create normally has).
        extra_topic_configs=replica_configs(settings),
    )
    batch, within = settings.processor_batch, settings.processor_batch_ms / 1000

    producer = app.producer
    max_outstanding = 20_000

    class Outbox:
        """Sends through faust's producer without waiting per record; awaited in bulk.

        Faust flushes the producer before it commits offsets. A send that still fails after the
        producer's own retries would let that commit pass over an input whose output is lost, so
        any failed send ends the process at once: the restart replays from the last commit.
        """

        def __init__(self) -> None:
            self.pending: list[Awaitable[Any]] = []

        async def send(
            self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None
        ) -> None:
            future = await producer.send(topic, key, value, None, None, headers)
            if isinstance(future, asyncio.Future):
                future.add_done_callback(_fatal_if_failed)
            self.pending.append(future)
            if len(self.pending) >= max_outstanding:
                await self.acknowledged()

        async def acknowledged(self) -> None:
            """Wait until the broker acknowledged everything sent so far."""
            pending, self.pending = self.pending, []
            if pending:
                await asyncio.gather(*pending)

    @app.agent(raw_topic, name="split", concurrency=1)
    async def split(stream: StreamT[bytes]) -> None:
        # A raw record is a whole webhook body (up to hundreds of users): per-record iteration
        # costs little. (A take_events batch here failed the kill test: changes never arrived
        # after the restart; per record, faust's plain ack path, it passes.)
        outbox = Outbox()
        async for event in stream.events():
            await _split_one(event, outbox)

    async def _split_one(event: EventT[bytes], outbox: Outbox) -> None:
        headers = _headers(event)
        message = event.message
        ctx = Context(
            source=headers.get("source", b"unknown").decode(errors="replace"),
            request_id=headers.get("request-id", b"").decode(errors="replace")
            or f"{message.topic}:{message.partition}:{message.offset}",
            received_at=_received_at(headers, message.timestamp * 1000 if message.timestamp else None),
            match_field=settings.match_field,
        )
        body = event.value if isinstance(event.value, bytes) else bytes(event.value or b"")
        try:
            result = split_body(body, ctx)
        except Exception as exc:  # a bug must cost one record (kept), never the agent
            log.exception("split failed", extra={"request_id": ctx.request_id})
            failure = Rejected("internal_error", f"the split agent failed: {exc!r}", None, body)
            result = Split(rejected=[failure])
        metrics.EVENTS_IN.labels("split").inc()
        log.debug(
            "webhook split",
            extra={
                "request_id": ctx.request_id,
                "source": ctx.source,
                "events": len(result.events),
                "rejected": len(result.rejected),
                "partition": message.partition,
                "offset": message.offset,
            },
        )
        for seg in result.events:
            await outbox.send(names.segment_events, seg["identifier"].encode(), _json(seg))
        metrics.EVENTS_OUT.inc(len(result.events))
        for rej in result.rejected:
            dl_headers = [
                ("reason-code", rej.code.encode()),
                ("reason", rej.reason.encode()),
                ("stage", b"split"),
                ("source", ctx.source.encode()),
                ("request-id", ctx.request_id.encode()),
                ("raw-topic", message.topic.encode()),
                ("raw-partition", str(message.partition).encode()),
                ("raw-offset", str(message.offset).encode()),
            ]
            if rej.index is not None:
                dl_headers.append(("element-index", str(rej.index).encode()))
            await outbox.send(names.dead_letter, None, rej.record, dl_headers)
            metrics.DEAD_LETTERED.labels(rej.code).inc()
            log.info(
                "record dead-lettered",
                extra={"reason_code": rej.code, "reason": rej.reason, "request_id": ctx.request_id},
            )

    @app.agent(segments, name="membership", concurrency=1)
    async def membership(stream: StreamT[bytes]) -> None:
        outbox = Outbox()
        async for events in stream.take_events(batch, within=within):  # type: ignore[attr-defined]
            staged: dict[str, tuple[Any, EventT[bytes]]] = {}
            for event in events:
                metrics.EVENTS_IN.labels("membership").inc()
                try:
                    seg = orjson.loads(event.value)
                    identifier = seg["identifier"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    await outbox.send(
                        names.dead_letter,
                        None,
                        event.value,
                        [
                            ("reason-code", b"bad_segment_event"),
                            ("reason", str(exc).encode()),
                            ("stage", b"membership"),
                        ],
                    )
                    metrics.DEAD_LETTERED.labels("bad_segment_event").inc()
                    continue
                if identifier in staged:
                    value = staged[identifier][0]
                else:
                    _table_context(event)
                    value = table.get(identifier)
                new_value, emitted = apply_event(value, seg)
                if new_value is not None:
                    staged[identifier] = (new_value, event)
                for record in emitted:
                    key = record["identifier"].encode()
                    if "change_id" in record:
                        await outbox.send(
                            names.membership_changes,
                            key,
                            _json(record),
                            [("change-id", record["change_id"].encode())],
                        )
                        metrics.CHANGES.labels(record["change"]).inc()
                    else:
                        await outbox.send(
                            names.membership, key + b"\x1f" + record["audience_id"].encode(), _json(record)
                        )
            # Changes acknowledged first, the table written after (see the module docstring).
            await outbox.acknowledged()
            for identifier, (value, event) in staged.items():
                _table_context(event)
                table[identifier] = value
            now = time.time()
            for event in events:
                ts = event.message.timestamp
                if ts:
                    metrics.LATENCY.observe(max(0.0, now - ts))

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    # /healthz, /readyz, the table-keys metric and the group's consumer lag.
    operations.install(app, settings, table)
    register_queries(app, table, settings)
    app.conf.relay_topics = names  # for tools that need the names from the app
    return app
