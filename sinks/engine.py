"""The delivery engine: one consumer group per destination, batches per topic-partition.

- records are kept per partition in a ``sinks.batching.Window``; a batch is formed when it reaches
  the batch size or its oldest record the flush interval; batches of one partition never share an
  identifier while open (two changes of one identifier are never in flight at once: an exit never
  overtakes its enter), and several batches of a partition may be in flight, so a destination's
  concurrency is reached whatever the partition count (at most ``concurrency`` requests overall);
- before a batch is sent, the partition's commit (offset + metadata describing every open batch) is
  written, so after a crash or a rebalance the same batches are re-formed and sent with the same
  ``Idempotency-Key``: a change's key never depends on timing (with a batch size of 1 the key is the
  change's own and nothing needs writing first);
- delivering a batch (retries, Retry-After, splitting refused batches, dead letters, the delivery
  log) is ``sinks.deliver``; while a partition's batches wait, its buffer fills and its consumption
  is *paused*;
- the offset of a partition only moves past records that were delivered, dead-lettered or filtered.

The fetch loop never sleeps on the broker: one ``getmany`` runs in the background while the loop
waits for whichever comes first — records, a finished batch, a batch falling due, or the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from audience_relay import kafka
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from sinks import metrics
from sinks.batching import Batch, Window, decode
from sinks.deliver import Deliverer, Entry
from sinks.destinations import SinkSpec
from sinks.pacing import backoff, correlation, retry_delay

__all__ = ["SinkEngine", "backoff", "correlation", "group_id", "retry_delay"]

log = logging.getLogger("sinks")
Record: TypeAlias = ConsumerRecord

#: How long one background fetch waits for records (it does not hold the loop back).
FETCH_WAIT_MS = 1000
#: Commits that no batch is waiting for (offsets moving after deliveries) are gathered this long.
LAZY_COMMIT_SECONDS = 0.2
#: Fewest records a partition may buffer before its consumption is paused.
MIN_BUFFER = 100


def group_id(settings: Settings, destination: str) -> str:
    """The consumer group of the sink ``destination``."""
    return GroupNames.from_settings(settings).sink(destination)


def buffer_limit(batch_size: int, concurrency: int, partitions: int) -> int:
    """Records a partition buffers before it is paused: enough to fill its share of the concurrency."""
    share = math.ceil(concurrency / max(1, partitions))
    return max(MIN_BUFFER, batch_size * (share + 1))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: SinkEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.engine.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.engine.adopt(assigned)


class SinkEngine:
    """Runs one destination: consume ``membership-changes``, deliver, commit."""

    def __init__(
        self,
        settings: Settings,
        spec: SinkSpec,
        secrets: list[str] | None = None,
        per_partition: int | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.name = spec.destination.name
        self.batch_size = spec.batch_size
        self.flush_seconds = spec.flush_seconds
        self.concurrency = spec.concurrency
        #: Open batches per partition. A batch holds a request slot only while its request is in flight;
        #: it stays open a little longer (its dead letters and log records are acknowledged), so by
        #: default twice as many as requests may be in flight overall.
        self.per_partition = max(1, per_partition or 2 * spec.concurrency)
        self.topics = TopicNames.from_settings(settings)
        self.group = group_id(settings, self.name)
        self.deliverer = Deliverer(settings, spec, secrets or [])
        # With one change per batch the key is the change's own: no commit has to precede a send.
        self._durable_boundaries = spec.batch_size > 1
        self._windows: dict[TopicPartition, Window] = {}
        #: Records fetched for a partition whose window is still being built (assignment callback).
        self._limbo: dict[TopicPartition, list[Record]] = defaultdict(list)
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = defaultdict(set)
        self._failures: list[BaseException] = []
        self._paused_at: dict[TopicPartition, float] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._wake = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._commit_urgent = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._committed = asyncio.Condition()
        #: True while the consumer is connected and consuming (the sink's readiness).
        self.running = False

    @property
    def delivered(self) -> int:
        """Changes the destination accepted since the start."""
        return self.deliverer.delivered

    # --- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then finish in-flight batches and commit them."""
        s = self.settings
        self._consumer = kafka.consumer(
            s,
            group_id=self.group,
            client_id=f"audience-relay-sink-{self.name}",
            auto_offset_reset="earliest",
            max_poll_records=max(500, self.batch_size),
        )
        self._admin = kafka.admin(s, client_id=f"audience-relay-sink-{self.name}")
        await self.deliverer.start()
        await self._admin.start()
        await self._consumer.start()
        self._consumer.subscribe(list(self.spec.topics), listener=_Rebalance(self))
        log.info("sink started", extra={"sink": self.name, "group": self.group})
        self.running = True
        committer = asyncio.create_task(self._commit_loop(), name=f"commit-{self.name}")
        stopping = asyncio.create_task(stop.wait())
        fetch: asyncio.Task[dict[TopicPartition, list[Record]]] | None = None
        try:
            while not stop.is_set():
                if self._failures:
                    raise self._failures[0]  # a bug in delivery must surface, not be swallowed
                if fetch is None:
                    fetch = asyncio.create_task(self._consumer.getmany(timeout_ms=FETCH_WAIT_MS))
                now = time.monotonic()
                wake_at = self._dispatch(now)
                self._flow_control(now)
                woken = asyncio.create_task(self._wake.wait())
                timeout = None if wake_at is None else max(0.0, wake_at - now)
                await asyncio.wait({fetch, woken, stopping}, timeout=timeout, return_when="FIRST_COMPLETED")
                woken.cancel()
                self._wake.clear()
                if fetch.done():
                    fetched = fetch.result()
                    fetch = None
                    self._take(fetched, time.monotonic())
        finally:
            self.running = False
            stopping.cancel()
            if fetch is not None:
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, KafkaError):
                    await fetch
            await self._drain()
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            # Bounded: a stop while the broker is away must not hang (the next owner re-forms the
            # open batches from the last commit that got through).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit_now(), self.settings.sink_timeout_seconds)
            await kafka.stop_clients([self._consumer], self.settings.sink_timeout_seconds)
            await self._admin.close()
            await self.deliverer.stop()

    def _take(self, fetched: dict[TopicPartition, list[Record]], now: float) -> None:
        assert self._consumer is not None
        for tp, records in fetched.items():
            window = self._windows.get(tp)
            if window is not None:
                window.add(records, now)
            elif tp in self._consumer.assignment():
                self._limbo[tp].extend(records)  # its window is being built: keep them for it

    def _dispatch(self, now: float) -> float | None:
        """Start every batch that can go; returns when a batch that is not due yet will be."""
        wake_at: float | None = None
        for tp, window in self._windows.items():
            batches = window.ready_recovered()
            formed, due = window.form(self.batch_size, self.per_partition, self.flush_seconds, now)
            batches += formed
            if due is not None:
                wake_at = due if wake_at is None else min(wake_at, due)
            for batch in batches:
                task = asyncio.create_task(
                    self._run_batch(tp, window, batch, window.version), name=f"deliver-{tp}"
                )
                self._tasks[tp].add(task)
                task.add_done_callback(self._on_task_done(tp))
        return wake_at

    def _on_task_done(self, tp: TopicPartition) -> Any:
        def done(task: asyncio.Task[None]) -> None:
            self._tasks[tp].discard(task)
            if not task.cancelled() and task.exception() is not None:
                self._failures.append(task.exception())  # type: ignore[arg-type]
            self._wake.set()

        return done

    def _flow_control(self, now: float) -> None:
        """Pause a partition whose buffer is full (its destination is slow or failing); resume it later."""
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        limit = buffer_limit(self.batch_size, self.concurrency, len(self._windows))
        for tp, window in self._windows.items():
            if tp not in assigned:
                continue
            buffered = window.records_pending()
            if buffered >= limit and tp not in self._paused_at:
                self._consumer.pause(tp)
                self._paused_at[tp] = now
            elif buffered < limit // 2 and tp in self._paused_at:
                self._consumer.resume(tp)
                metrics.PAUSED_SECONDS.labels(self.name).inc(now - self._paused_at.pop(tp))
        metrics.PAUSED_PARTITIONS.labels(self.name).set(len(self._paused_at))

    # --- one batch ---------------------------------------------------------------------------

    async def _run_batch(self, tp: TopicPartition, window: Window, batch: Batch, version: int) -> None:
        if batch.records and self._durable_boundaries:
            await self._until_committed(window, version)
        if batch.records:
            field_change = tp.topic == self.topics.field_changes
            tally, acks = await self.deliverer.send([Entry.of(r, field_change) for r in batch.records])
            window.release(batch)
            self._wake.set()  # its identifiers' later changes may go now
            await acks.wait()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "batch done",
                    extra={
                        "sink": self.name,
                        "partition": tp.partition,
                        "delivered": tally.delivered,
                        "dead_lettered": tally.dead_lettered,
                        "filtered": tally.filtered,
                        "unknown_identifier": tally.unknown_identifier,
                    },
                )
        window.finish(batch)
        self._commit_wanted.set()

    # --- commits -----------------------------------------------------------------------------

    async def _until_committed(self, window: Window, version: int) -> None:
        """Until the commit describing a batch (window ``version`` or later) is written."""
        self._commit_urgent.set()
        self._commit_wanted.set()
        async with self._committed:
            await self._committed.wait_for(lambda: window.committed_version >= version)

    async def _commit_loop(self) -> None:
        pause = 0.0
        while True:
            await self._commit_wanted.wait()
            if not self._commit_urgent.is_set():
                # Nobody waits for this one: let a few finished batches share it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._commit_urgent.wait(), LAZY_COMMIT_SECONDS)
            self._commit_wanted.clear()
            self._commit_urgent.clear()
            if await self._commit_now():
                pause = 0.0
            else:
                pause = min(2.0, pause * 2 or 0.1)
                await asyncio.sleep(pause)  # the coordinator is away or moving: try again shortly
                self._commit_wanted.set()

    async def _commit_now(self, only: set[TopicPartition] | None = None) -> bool:
        """Commit every window whose position changed since its last commit; False when that failed."""
        assert self._consumer is not None
        async with self._commit_lock:
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            versions: dict[TopicPartition, tuple[Window, int]] = {}
            for tp, window in self._windows.items():
                if (only is not None and tp not in only) or window.committed_version >= window.version:
                    continue
                position = window.position()
                if position is None:
                    continue
                offsets[tp] = OffsetAndMetadata(position[0], position[1])
                versions[tp] = (window, window.version)
            if not offsets:
                return True
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError, KafkaError) as exc:
                # The partition may have moved to another member: it re-forms the open batches from the
                # last commit that got through and sends them again with the same idempotency keys.
                log.warning(
                    "commit failed; open batches may be sent again (same idempotency keys)",
                    extra={"sink": self.name, "error": type(exc).__name__},
                )
                return False
        async with self._committed:
            for window, version in versions.values():
                window.committed_version = max(window.committed_version, version)
            self._committed.notify_all()
        return True

    # --- rebalances --------------------------------------------------------------------------

    async def adopt(self, assigned: list[TopicPartition]) -> None:
        """On assignment: build each partition's window from its committed offset and metadata."""
        fresh = [tp for tp in assigned if tp not in self._windows]
        if not fresh:
            return
        committed = await self._committed_positions(fresh)
        now = time.monotonic()
        for tp in fresh:
            offset, metadata = committed.get(tp, (None, ""))
            described = decode(metadata, offset) if offset is not None else None
            window = Window(offset, described)
            window.committed_version = window.version  # what it starts from is what is committed
            self._windows[tp] = window
            if described is not None and described.open:
                log.info(
                    "re-forming the batches that were open at the last commit",
                    extra={"sink": self.name, "partition": tp.partition, "batches": len(described.open)},
                )
            early = self._limbo.pop(tp, [])
            if early:
                window.add(early, now)
        self._wake.set()

    async def _committed_positions(self, tps: list[TopicPartition]) -> dict[TopicPartition, tuple[int, str]]:
        assert self._admin is not None
        for attempt in range(8):
            try:
                answer = await self._admin.list_consumer_group_offsets(self.group, partitions=tps)
                return {
                    tp: (meta.offset, meta.metadata or "") for tp, meta in answer.items() if meta.offset >= 0
                }
            except KafkaError as exc:
                log.warning(
                    "could not read the committed batch boundaries; retrying",
                    extra={"sink": self.name, "error": type(exc).__name__, "attempt": attempt + 1},
                )
                await asyncio.sleep(0.25 * 2**attempt)  # the coordinator is moving
        # Without the metadata the partition restarts from the committed offset with nothing open.
        assert self._consumer is not None
        out = {}
        for tp in tps:
            offset = await self._consumer.committed(tp)
            if offset is not None:
                out[tp] = (offset, "")
        return out

    async def forget(self, revoked: list[TopicPartition]) -> None:
        """On revocation: stop work on those partitions and commit what finished; the rest (same
        batches, same keys) is the new owner's."""
        gone = set(revoked)
        tasks = [t for tp in gone for t in self._tasks.get(tp, set()) if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._commit_now(only=gone & set(self._windows))
        for tp in gone:
            self._windows.pop(tp, None)
            self._limbo.pop(tp, None)
            self._tasks.pop(tp, None)
            paused_at = self._paused_at.pop(tp, None)
            if paused_at is not None:
                metrics.PAUSED_SECONDS.labels(self.name).inc(time.monotonic() - paused_at)
        metrics.PAUSED_PARTITIONS.labels(self.name).set(len(self._paused_at))

    async def _drain(self) -> None:
        """On shutdown: let in-flight batches finish (bounded), so their offsets are committed."""
        tasks = [t for ts in self._tasks.values() for t in ts if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.sink_timeout_seconds * 2)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
