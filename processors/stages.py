"""The two processing stages of a worker: split and membership.

    <prefix>.webhooks.raw ─▶ split ─▶ <prefix>.segment-events ─▶ membership ─▶ <prefix>.membership-changes
                     │                                    (table) │
                     ├─▶ <prefix>.field-changes                   └─▶ <prefix>.membership (the changelog)
                     └─▶ <prefix>.dead-letter

Both are plain per-partition loops (processors/loop.py) over aiokafka consumers, producing through
per-partition batches (audience_relay/outbox.py):

- **split** is a regular consumer group (``GroupNames.split``) on the raw topic. For each batch of raw
  bodies it produces one ``SegmentEvents`` record per (body, target partition), the field changes
  and the dead letters, waits for the broker, then commits. It holds no state.
- **membership** reads the segment-events partitions whose table partition this worker owns as
  *active* in faust's assignment (faust: group ``GroupNames.tables``, table recovery, standby copies).
  It starts a partition only when faust says recovery is done *and* the local store holds the whole
  changelog partition, and it stops every partition when faust revokes (before the group moves
  anything). Its offsets are committed to ``GroupNames.membership``, a group without members.

Crash safety of a membership batch (at-least-once with re-emission): (1) every change is produced
and acknowledged; (2) the new states are produced to the changelog and acknowledged; (3) the same
records are applied to the local store; (4) the input offset is committed. A crash before (2) leaves
the state as it was: the replay computes the same flips and emits the same change ids again. A crash
after (2) finds the states written: no flip, nothing emitted — and their changes were acknowledged in
(1). A failed write raises: nothing is committed past it and the worker stops (exit code 70).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias

import orjson
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from audience_relay.outbox import BatchProducer, Outbox
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from processors import metrics
from processors.loop import PartitionedLoop
from processors.membership import decide, state_key
from processors.split import Context, Rejected, Split, split_body
from processors.state import StateStore

log = logging.getLogger("processors")

Record: TypeAlias = ConsumerRecord[bytes, bytes]
#: A state record's marker of current membership; states hold no other boolean ``member`` field.
MEMBER_MARK = b'"member":true'
#: A SegmentEvents record stays well under Kafka's default record limit (1 MiB, ``max.message.bytes``):
#: a body putting one user in thousands of audiences still splits into records any topic accepts.
MAX_SEGMENT_RECORD_BYTES = 512 * 1024
#: Headers of a SegmentEvents record: the raw body its events came from.
_GROUP_HEADERS = ("request-id", "raw-topic", "raw-partition", "raw-offset")


def _headers(record: Record) -> dict[str, bytes]:
    return {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in (record.headers or ())}


def _received_at(headers: Mapping[str, bytes], fallback_ms: int | None) -> datetime:
    text = headers.get("received-at", b"").decode(errors="replace")
    if text:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.fromtimestamp((fallback_ms or time.time() * 1000) / 1000, UTC)


def segment_records(
    events: list[dict[str, Any]], partitions: int, max_bytes: int = MAX_SEGMENT_RECORD_BYTES
) -> list[tuple[int, bytes]]:
    """One body's segment events as ``SegmentEvents`` records: per partition, in order, each record
    at most ``max_bytes`` (a group too large is halved until it fits; one event always fits)."""
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        by_partition.setdefault(partition_for(event["identifier"], partitions), []).append(event)
    out: list[tuple[int, bytes]] = []

    def add(partition: int, group: list[dict[str, Any]]) -> None:
        value = orjson.dumps({"schema_version": 2, "events": group})
        if len(value) <= max_bytes or len(group) == 1:
            out.append((partition, value))
            return
        half = len(group) // 2
        add(partition, group[:half])
        add(partition, group[half:])

    for partition, group in by_partition.items():
        add(partition, group)
    return out


def dead_letter_headers(
    code: str, reason: str, stage: str, origin: Mapping[str, str], index: int | None = None
) -> list[tuple[str, bytes]]:
    """The headers of a dead letter: why, from which stage, and where the original record was."""
    headers = [("reason-code", code.encode()), ("reason", reason.encode()), ("stage", stage.encode())]
    headers += [(k, v.encode()) for k, v in origin.items()]
    if index is not None:
        headers.append(("element-index", str(index).encode()))
    return headers


class SplitStage:
    """``webhooks.raw`` → ``segment-events`` (+ ``field-changes``, ``dead-letter``)."""

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        batches: BatchProducer,
        consumer: AIOKafkaConsumer,
    ) -> None:
        self.settings = settings
        self.names = TopicNames.from_settings(settings)
        self.producer = producer
        self.batches = batches
        self.consumer = consumer
        self.identifier_fields = settings.kept_identifier_fields()
        self.loop = PartitionedLoop(
            consumer,
            self.handle,
            name="split",
            batch_records=16,
            batch_bytes=1024 * 1024,
            max_buffered_bytes=16 * 1024 * 1024,
        )
        self.running = False

    async def run(self, stop: asyncio.Event) -> None:
        """Consume the raw topic until ``stop`` is set; commit what was done."""
        self.consumer.subscribe([self.names.raw], listener=_Release(self.loop, self.settings))
        self.running = True
        try:
            await self.loop.run(stop)
        finally:
            self.running = False
            await self.loop.close(timeout=self.settings.worker_session_timeout_seconds / 2)

    def _context(self, record: Record, headers: Mapping[str, bytes]) -> Context:
        return Context(
            source=headers.get("source", b"unknown").decode(errors="replace"),
            request_id=headers.get("request-id", b"").decode(errors="replace")
            or f"{record.topic}:{record.partition}:{record.offset}",
            received_at=_received_at(headers, record.timestamp),
            match_field=self.settings.match_field,
            identifier_fields=self.identifier_fields,
        )

    async def handle(self, tp: TopicPartition, records: list[Record]) -> None:
        """Split a batch of raw bodies, produce everything, wait for the broker, commit."""
        names, partitions = self.names, self.settings.partitions
        outbox = Outbox(self.batches)
        dead_letters: list[asyncio.Future[Any]] = []
        for record in records:
            headers = _headers(record)
            ctx = self._context(record, headers)
            body = record.value or b""
            try:
                result = split_body(body, ctx)
            except Exception as exc:  # a bug must cost one record (kept), never the stage
                log.exception("split failed", extra={"request_id": ctx.request_id})
                result = Split(
                    rejected=[Rejected("internal_error", f"the split failed: {exc!r}", None, body)]
                )
            origin = {
                "source": ctx.source,
                "request-id": ctx.request_id,
                "raw-topic": record.topic,
                "raw-partition": str(record.partition),
                "raw-offset": str(record.offset),
            }
            group_headers = [(k, origin[k].encode()) for k in _GROUP_HEADERS]
            for partition, value in segment_records(result.events, partitions):
                outbox.add(names.segment_events, partition, None, value, group_headers)
            for change in result.field_changes:
                ident = change["identifier"]
                outbox.add(
                    names.field_changes,
                    partition_for(ident, partitions),
                    ident.encode(),
                    orjson.dumps(change),
                    [("change-id", change["change_id"].encode())],
                )
            for rej in result.rejected:
                dead_letters.append(
                    await self.producer.send(
                        names.dead_letter,
                        rej.record,
                        headers=dead_letter_headers(rej.code, rej.reason, "split", origin, rej.index),
                    )
                )
                metrics.DEAD_LETTERED.labels(rej.code).inc()
                # A bad record is the sender's business (info); a split that failed is ours (error).
                log.log(
                    logging.ERROR if rej.exception is not None else logging.INFO,
                    "record dead-lettered",
                    extra={"reason_code": rej.code, "reason": rej.reason, "request_id": ctx.request_id},
                    exc_info=rej.exception,
                )
            metrics.EVENTS_OUT.inc(len(result.events))
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "webhook split",
                    extra={
                        "request_id": ctx.request_id,
                        "source": ctx.source,
                        "events": len(result.events),
                        "field_changes": len(result.field_changes),
                        "rejected": len(result.rejected),
                        "partition": record.partition,
                        "offset": record.offset,
                    },
                )
            await asyncio.sleep(0)  # one body's CPU at a time: probes and heartbeats stay answered
        await outbox.flush()
        if dead_letters:
            await asyncio.gather(*dead_letters)
        metrics.EVENTS_IN.labels("split").inc(len(records))
        await _commit(self.consumer, tp, records[-1].offset + 1, "split")


class _Release(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish (and commit) the batch in progress of a revoked raw partition before the group moves it."""

    def __init__(self, loop: PartitionedLoop, settings: Settings) -> None:
        self.loop = loop
        self.timeout = settings.worker_session_timeout_seconds / 2

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.loop.release(revoked, self.timeout)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.loop.wake()


async def _commit(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, stage: str) -> None:
    try:
        await consumer.commit({tp: offset})
    except (CommitFailedError, IllegalStateError) as exc:
        # The partition moved to another worker during the batch: it reads these records again
        # (a repeated segment event finds its state already applied and emits nothing).
        log.warning(
            "commit refused; the batch will be processed again", extra={"stage": stage, "error": repr(exc)}
        )


class AudienceCounts:
    """Members per audience of each table partition this worker processes (exact, in memory).

    Built by scanning a partition when the membership stage starts it, then kept by the stage's own
    writes; dropped when the partition stops. Nothing is persisted, so nothing can drift: a restart,
    a rebalance or a partition-count change simply scans again.
    """

    def __init__(self) -> None:
        self._counts: dict[int, dict[str, int]] = {}

    def rebuild(self, partition: int, items: Iterable[tuple[bytes, bytes]]) -> None:
        counts: dict[str, int] = {}
        for key, value in items:
            if MEMBER_MARK in value:
                audience = key.rsplit(b"\x1f", 1)[-1].decode()
                counts[audience] = counts.get(audience, 0) + 1
        self._counts[partition] = counts

    def update(self, partition: int, audience: str, before: bool, after: bool) -> None:
        counts = self._counts.get(partition)
        if counts is None or before == after:
            return
        counts[audience] = counts.get(audience, 0) + (1 if after else -1)
        if counts[audience] <= 0:
            del counts[audience]

    def drop(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._counts.pop(partition, None)

    def count(self, partition: int, audience: str) -> int | None:
        """Members of ``audience`` in ``partition``; None when the partition is not counted here."""
        counts = self._counts.get(partition)
        return None if counts is None else counts.get(audience, 0)


class MembershipStage:
    """``segment-events`` → ``membership-changes`` + ``membership`` for the table partitions held here."""

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        batches: BatchProducer,
        consumer: AIOKafkaConsumer,
        store: StateStore,
    ) -> None:
        self.settings = settings
        self.names = TopicNames.from_settings(settings)
        self.producer = producer
        self.batches = batches
        self.consumer = consumer
        self.store = store
        self.counts = AudienceCounts()
        self.loop = PartitionedLoop(
            consumer,
            self.handle,
            name="membership",
            batch_records=max(1, settings.processor_batch // 32),
            batch_bytes=4 * 1024 * 1024,
        )
        #: Partitions being processed: their table state is complete and current here.
        self.active: frozenset[int] = frozenset()
        self._lock = asyncio.Lock()

    # --- assignment, driven by faust's table assignment ------------------------------------------

    def hold(self) -> None:
        """Take every segment-events partition, paused (see ``PartitionedLoop.hold``); faust's
        assignment then decides which are worked on."""
        self.loop.hold(self._tps(range(self.settings.partitions)))

    def _tps(self, partitions: Iterable[int]) -> list[TopicPartition]:
        return [TopicPartition(self.names.segment_events, p) for p in sorted(partitions)]

    async def stop_partitions(self) -> None:
        """Stop every partition (faust is revoking): finish batches, flush, forget counters."""
        async with self._lock:
            stopped = self.active
            self.active = frozenset()
            await self.loop.release(
                self._tps(stopped), timeout=self.settings.worker_session_timeout_seconds / 2
            )
            # Nothing of ours may reach the changelog after the next owner has recovered from it.
            await self.producer.flush()
            self.counts.drop(stopped)
            if stopped:
                log.info("membership partitions stopped", extra={"partitions": sorted(stopped)})

    async def start_partitions(self, partitions: Iterable[int]) -> None:
        """Start the partitions whose local state is complete; the others wait for the next recovery."""
        async with self._lock:
            wanted = set(partitions)
            ready = await self._complete(wanted)
            if wanted - ready:
                log.info(
                    "table partitions not recovered yet; not processing them",
                    extra={"partitions": sorted(wanted - ready)},
                )
            started = time.monotonic()
            for p in sorted(ready):
                self.counts.rebuild(p, self.store.items(p))
                await asyncio.sleep(0)
            # From the group's committed offset, wherever this consumer was before: another worker
            # may have moved it since. A partition nobody committed starts at its beginning.
            tps = self._tps(ready)
            for tp in tps:
                committed = await self.consumer.committed(tp)
                if committed is None or committed < 0:
                    await self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
            self.active = frozenset(ready)
            self.loop.open(tps)
            log.info(
                "membership partitions started",
                extra={"partitions": sorted(ready), "count_seconds": round(time.monotonic() - started, 3)},
            )

    async def _complete(self, partitions: set[int]) -> set[int]:
        """The partitions whose local store holds every record of their changelog partition."""
        if not partitions or not self.store.tracks_offsets():
            return partitions  # the in-memory store (tests) keeps no offsets; faust's recovery is trusted
        tps = [TopicPartition(self.names.membership, p) for p in partitions]
        ends = await self.consumer.end_offsets(tps)
        complete = set()
        for tp in tps:
            persisted = self.store.persisted_offset(tp.partition)
            if ends[tp] == 0 or (persisted is not None and persisted + 1 >= ends[tp]):
                complete.add(tp.partition)
        return complete

    async def run(self, stop: asyncio.Event) -> None:
        """Process assigned partitions until ``stop`` is set (or a write fails: then raise)."""
        try:
            await self.loop.run(stop)
        finally:
            await self.stop_partitions()

    # --- one batch ---------------------------------------------------------------------------------

    async def handle(self, tp: TopicPartition, records: list[Record]) -> None:
        """Apply a batch of one partition's segment events; see the module docstring for the order."""
        partition = tp.partition
        if partition not in self.active:
            return  # stopped meanwhile: the next owner reads these again
        names = self.names
        dead = Outbox(self.batches)
        events: list[dict[str, Any]] = []
        for record in records:
            try:
                group = orjson.loads(record.value or b"")
                batch = group["events"]
                if not isinstance(batch, list):
                    raise TypeError("'events' is not an array")
                events.extend(batch)
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                self._reject(dead, record, "bad_segment_event", f"not a SegmentEvents record: {exc}")
        metrics.EVENTS_IN.labels("membership").inc(len(records))

        keys: list[bytes | None] = []
        for event in events:
            try:
                keys.append(state_key(event["identifier"], event["audience_id"]))
            except (KeyError, TypeError):
                keys.append(None)
        unique = list(dict.fromkeys(k for k in keys if k is not None))
        stored = dict(zip(unique, self.store.get_many(partition, unique), strict=True))
        states: dict[bytes, dict[str, Any] | None] = {}
        before: dict[bytes, bool] = {}
        dirty: dict[bytes, None] = {}
        changes = Outbox(self.batches)
        flips: dict[str, int] = {}
        for event, key in zip(events, keys, strict=True):
            if key is None:
                self._reject_event(
                    dead, event, "bad_segment_event", "a segment event without identifier/audience_id"
                )
                continue
            if key in states:
                state = states[key]
            else:
                raw = stored[key]
                state = orjson.loads(raw) if raw is not None else None
                states[key] = state
                before[key] = bool(state and state["member"])
            try:
                new, change = decide(state, event)
            except Exception as exc:  # one event costs only itself
                self._reject_event(dead, event, "bad_segment_event", f"the event cannot be applied: {exc!r}")
                continue
            if new is not None:
                states[key] = new
                dirty[key] = None
            if change is not None:
                changes.add(
                    names.membership_changes,
                    partition,
                    change["identifier"].encode(),
                    orjson.dumps(change),
                    [("change-id", change["change_id"].encode())],
                )
                flips[change["change"]] = flips.get(change["change"], 0) + 1
        if len(dead):
            await dead.flush()
        # (1) changes acknowledged before (2) the states that record them.
        if len(changes):
            await changes.flush()
        if dirty:
            writes = [(key, orjson.dumps(states[key])) for key in dirty]
            out = Outbox(self.batches)
            for key, value in writes:
                out.add(names.membership, partition, key, value)
            last = (await out.flush())[(names.membership, partition)]
            # (3) the local store follows the acknowledged changelog.
            self.store.apply(partition, writes, last)
            for key in dirty:
                written = states[key]
                assert written is not None  # only keys with a new state are dirty
                self.counts.update(partition, written["audience_id"], before[key], bool(written["member"]))
        for kind, count in flips.items():
            metrics.CHANGES.labels(kind).inc(count)
        now = time.time()
        for record in records:
            if record.timestamp:
                metrics.LATENCY.observe(max(0.0, now - record.timestamp / 1000))
        # (4) only now the input is done.
        await _commit(self.consumer, tp, records[-1].offset + 1, "membership")

    def _reject(self, dead: Outbox, record: Record, code: str, reason: str) -> None:
        headers = dead_letter_headers(
            code,
            reason,
            "membership",
            {
                "source-topic": record.topic,
                "source-partition": str(record.partition),
                "source-offset": str(record.offset),
            },
        )
        dead.add(
            self.names.dead_letter, record.partition % self.settings.partitions, None, record.value, headers
        )
        metrics.DEAD_LETTERED.labels(code).inc()
        log.warning("segment events dead-lettered", extra={"reason_code": code, "reason": reason})

    def _reject_event(self, dead: Outbox, event: Any, code: str, reason: str) -> None:
        try:
            value = orjson.dumps(event)
        except orjson.JSONEncodeError:
            value = repr(event).encode()[:65536]
        dead.add(
            self.names.dead_letter,
            0,
            None,
            value,
            dead_letter_headers(code, reason, "membership", {}),
        )
        metrics.DEAD_LETTERED.labels(code).inc()
        log.warning("segment event dead-lettered", extra={"reason_code": code, "reason": reason})


class DeliveriesFollower:
    """Keeps the ``deliveries`` table of the active partitions current with ``<prefix>.deliveries``.

    The sinks write that topic (the last outcome per identifier, audience and destination,
    partitioned by the identifier); it is the changelog of the worker's ``deliveries`` table, so
    faust recovers a partition when the worker takes it and keeps standby copies. faust does not read
    an active partition's changelog after recovery — it assumes it is the writer — so this loop
    follows each active partition from the store's persisted offset, applying records as recovery
    would. The membership queries read the table beside the memberships.
    """

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, store: StateStore) -> None:
        self.topic = TopicNames.from_settings(settings).deliveries
        self.consumer = consumer
        self.store = store
        self.timeout = settings.worker_session_timeout_seconds / 2
        self.loop = PartitionedLoop(consumer, self.handle, name="deliveries", batch_records=5000)
        self._followed: list[TopicPartition] = []

    def hold(self, partitions: int) -> None:
        """Take every partition of the topic, paused (see ``PartitionedLoop.hold``)."""
        self.loop.hold(TopicPartition(self.topic, p) for p in range(partitions))

    async def follow(self, partitions: Iterable[int]) -> None:
        """Start following ``partitions`` from what the local store holds."""
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        for tp in tps:
            persisted = self.store.persisted_offset(tp.partition)
            if persisted is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, persisted + 1)
        self._followed = tps
        self.loop.open(tps)

    async def stop_following(self) -> None:
        """Stop following every partition; they stay held, paused."""
        followed, self._followed = self._followed, []
        await self.loop.release(followed, self.timeout)

    async def handle(self, tp: TopicPartition, records: list[Record]) -> None:
        writes = [(r.key, r.value) for r in records if r.key is not None]
        if writes:
            self.store.apply(tp.partition, writes, records[-1].offset)


__all__ = [
    "AudienceCounts",
    "DeliveriesFollower",
    "KafkaError",
    "MembershipStage",
    "SplitStage",
    "dead_letter_headers",
]
