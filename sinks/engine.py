"""The delivery engine: one consumer group per destination, batches per topic-partition.

- a batch is formed per partition when it reaches the batch size or its oldest record the flush
  interval; one batch per partition is in flight at a time (so one identifier's changes arrive in
  order) and at most ``concurrency`` batches are in flight overall;
- ``RetryAfter`` → the same batch again after an exponential backoff with full jitter, or after the
  destination's Retry-After — which holds back every partition's next attempt, since it speaks for
  the whole destination; meanwhile the partition's buffer fills and its consumption is *paused*;
- ``GiveUp`` → each record goes to the dead-letter topic with the reason, status and response excerpt;
- the offset after a batch is committed only once it was delivered or dead-lettered. A crash or a
  rebalance redelivers what was not committed, with the same idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
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

from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from sinks import metrics
from sinks.base import Delivered, Destination, GiveUp, RetryAfter
from sinks.scrub import excerpt, scrub

log = logging.getLogger("sinks")
Record: TypeAlias = ConsumerRecord


def backoff(attempt: int, cap: float, base: float = 0.2, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return (rng or random).uniform(0, min(cap, base * 2 ** min(attempt, 30)))


def retry_delay(
    attempt: int, told: float | None, floor: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds before retry ``attempt`` of a batch: the longest of the floor, the destination's own
    Retry-After (capped at ten backoff caps) and the jittered backoff.

    The floor holds for every wait: a ``Retry-After: 0`` or a date in the past must not make a
    client hammer the destination, and the backoff keeps growing under a destination that keeps
    saying "now".
    """
    told_capped = min(told, cap * 10) if told is not None else 0.0
    return max(floor, told_capped, backoff(attempt, cap, rng=rng))


def group_id(settings: Settings, destination: str) -> str:
    """The consumer group of the sink ``destination``."""
    return f"{settings.topic_prefix}.sink.{destination}"


def correlation(changes: list[dict[str, Any]], limit: int = 20) -> dict[str, Any]:
    """Log fields naming the changes of a batch: their change ids and the ingress request ids.

    At most ``limit`` of each, so a 300-change batch stays one readable line; ``records`` gives
    the full count.
    """
    change_ids = [str(c.get("change_id", "")) for c in changes[:limit]]
    request_ids = list(dict.fromkeys(str(c.get("request_id", "")) for c in changes if c.get("request_id")))
    return {"records": len(changes), "change_ids": change_ids, "request_ids": request_ids[:limit]}


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: SinkEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.engine.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None


class SinkEngine:
    """Runs one destination: consume ``membership-changes``, deliver, commit."""

    def __init__(
        self,
        settings: Settings,
        destination: Destination,
        batch_size: int,
        flush_seconds: float,
        concurrency: int,
        secrets: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.destination = destination
        self.name = destination.name
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.topics = TopicNames.from_settings(settings)
        self._slots = asyncio.Semaphore(concurrency)
        self._secrets = [s for s in (secrets or []) if s]
        self._buffers: dict[TopicPartition, list[Record]] = defaultdict(list)
        self._oldest: dict[TopicPartition, float] = {}
        self._inflight: dict[TopicPartition, asyncio.Task[None]] = {}
        self._paused_at: dict[TopicPartition, float] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letters: AIOKafkaProducer | None = None
        self.delivered = 0
        #: True while the consumer is connected and consuming (the sink's readiness).
        self.running = False
        # A Retry-After is about the destination, not one partition: no batch goes before this time.
        self._not_before = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then finish in-flight batches and commit them."""
        s = self.settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=group_id(s, self.name),
            client_id=f"audience-relay-sink-{self.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max(500, self.batch_size),
        )
        self._dead_letters = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers, enable_idempotence=True
        )
        await self.destination.start()
        await self._dead_letters.start()
        await self._consumer.start()
        self._consumer.subscribe([self.topics.membership_changes], listener=_Revocations(self))
        log.info("sink started", extra={"sink": self.name, "group": group_id(s, self.name)})
        self.running = True
        try:
            while not stop.is_set():
                fetched = await self._consumer.getmany(timeout_ms=100)
                now = time.monotonic()
                for tp, records in fetched.items():
                    if records:
                        self._buffers[tp].extend(records)
                        self._oldest.setdefault(tp, now)
                self._dispatch(now)
                self._flow_control(now)
        finally:
            self.running = False
            await self._drain()
            await self._consumer.stop()
            await self._dead_letters.stop()
            await self.destination.stop()

    def _dispatch(self, now: float) -> None:
        for tp, buffer in self._buffers.items():
            task = self._inflight.get(tp)
            if task is not None:
                if not task.done():
                    continue
                del self._inflight[tp]
                task.result()  # a bug in delivery must surface, not be swallowed
            if not buffer:
                continue
            if len(buffer) < self.batch_size and now - self._oldest.get(tp, now) < self.flush_seconds:
                continue
            batch = buffer[: self.batch_size]
            del buffer[: self.batch_size]
            if buffer:
                self._oldest[tp] = now
            else:
                self._oldest.pop(tp, None)
            self._inflight[tp] = asyncio.create_task(self._deliver(tp, batch), name=f"deliver-{tp}")

    def _flow_control(self, now: float) -> None:
        """Pause a partition whose buffer is full (its destination is slow or failing); resume it later."""
        assert self._consumer is not None
        for tp, buffer in self._buffers.items():
            if tp not in self._consumer.assignment():
                continue
            if len(buffer) >= 2 * self.batch_size and tp not in self._paused_at:
                self._consumer.pause(tp)
                self._paused_at[tp] = now
            elif len(buffer) < self.batch_size and tp in self._paused_at:
                self._consumer.resume(tp)
                metrics.PAUSED_SECONDS.labels(self.name).inc(now - self._paused_at.pop(tp))
        metrics.PAUSED_PARTITIONS.labels(self.name).set(len(self._paused_at))

    async def _deliver(self, tp: TopicPartition, records: list[Record]) -> None:
        started = time.monotonic()
        changes: list[dict[str, Any]] = []
        unreadable: list[Record] = []
        for record in records:
            try:
                changes.append(orjson.loads(record.value))
            except orjson.JSONDecodeError:
                unreadable.append(record)
        for record in unreadable:
            await self._dead_letter(record, "the change record is not JSON", None, "")
        attempt = 0
        while changes:
            wait = self._not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the destination asked for this pause (Retry-After)
            async with self._slots:
                result = await self.destination.write(changes)
            if isinstance(result, Delivered):
                metrics.DELIVERIES.labels(self.name, "delivered").inc()
                metrics.RECORDS.labels(self.name, "delivered").inc(len(changes))
                metrics.BATCH_SIZE.labels(self.name).observe(len(changes))
                self.delivered += len(changes)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "batch delivered",
                        extra={"sink": self.name, "partition": tp.partition, **correlation(changes)},
                    )
                break
            if isinstance(result, GiveUp):
                metrics.DELIVERIES.labels(self.name, "dead_lettered").inc()
                metrics.RECORDS.labels(self.name, "dead_lettered").inc(len(changes))
                log.warning(
                    "batch given up",
                    extra={
                        "sink": self.name,
                        "status": result.status,
                        "reason": result.reason,
                        **correlation(changes),
                    },
                )
                for record in records:
                    if record not in unreadable:
                        await self._dead_letter(record, result.reason, result.status, result.response_text)
                break
            assert isinstance(result, RetryAfter)
            attempt += 1
            metrics.RETRIES.labels(self.name).inc()
            cap = self.settings.sink_max_backoff_seconds
            delay = retry_delay(attempt, result.seconds, self.settings.sink_min_retry_seconds, cap)
            if result.seconds:
                told = min(result.seconds, cap * 10)
                self._not_before = max(self._not_before, time.monotonic() + told)
            log.info(
                "delivery will be retried",
                extra={
                    "sink": self.name,
                    "reason": result.reason,
                    "attempt": attempt,
                    "retry_in_s": round(delay, 3),
                    **correlation(changes),
                },
            )
            await asyncio.sleep(delay)  # the backoff itself, not a wait on a condition
        metrics.LATENCY.labels(self.name).observe(time.monotonic() - started)
        await self._commit(tp, records[-1].offset + 1)

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.commit({tp: offset})
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The partition moved to another worker: it will deliver these again (same idempotency key).
            log.warning(
                "commit failed; the batch may be delivered again",
                extra={"sink": self.name, "partition": tp.partition, "error": type(exc).__name__},
            )

    async def _dead_letter(self, record: Record, reason: str, status: int | None, response_text: str) -> None:
        assert self._dead_letters is not None
        headers = [
            ("stage", b"sink"),
            ("sink", self.name.encode()),
            ("reason-code", b"destination_refused" if status is not None else b"undeliverable"),
            ("reason", scrub(reason, self._secrets).encode()),
            ("response-status", str(status or "").encode()),
            ("response-excerpt", excerpt(response_text, self._secrets).encode()),
            ("source-topic", record.topic.encode()),
            ("source-partition", str(record.partition).encode()),
            ("source-offset", str(record.offset).encode()),
        ]
        change_id = dict(record.headers or ()).get("change-id")
        if change_id:
            headers.append(("change-id", change_id))
        await self._dead_letters.send_and_wait(
            self.topics.dead_letter, value=record.value, key=record.key, headers=headers
        )

    async def forget(self, revoked: list[TopicPartition]) -> None:
        """On revocation: stop work on those partitions; their uncommitted records go to the new owner."""
        for tp in revoked:
            task = self._inflight.pop(tp, None)
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._buffers.pop(tp, None)
            self._oldest.pop(tp, None)
            paused_at = self._paused_at.pop(tp, None)
            if paused_at is not None:
                metrics.PAUSED_SECONDS.labels(self.name).inc(time.monotonic() - paused_at)
        metrics.PAUSED_PARTITIONS.labels(self.name).set(len(self._paused_at))

    async def _drain(self) -> None:
        """On shutdown: let in-flight batches finish (bounded), so their offsets are committed."""
        tasks = [t for t in self._inflight.values() if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.sink_timeout_seconds * 2)
            for task in pending:
                task.cancel()
