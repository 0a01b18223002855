"""Delivering a batch to one destination: retries, isolating refused records, dead letters, the log.

``Deliverer.process(entries)`` is what the engine, the dead-letter replay and the resync share:

1. each record is read (not JSON → dead-lettered) and put to the destination's policy
   (``sinks.policy``): a filtered change is only logged; one without the identifier the destination
   is sent is dead-lettered (``reason-code: unknown_identifier``, the reason names the Lytics Export
   Field to add);
2. the rest goes as one request under an ``Idempotency-Key`` derived from its change ids. A
   ``RetryAfter`` answer is retried (same request, same key) after the longest of
   ``RELAY_SINK_MIN_RETRY_SECONDS``, the destination's Retry-After and a jittered backoff; a
   Retry-After also holds back every other request of this destination. A do-not-retry answer
   (``GiveUp``) for several records is split in two halves, sent one after the other (so order
   holds), recursively, until the records the destination refuses are found one by one: only those
   are dead-lettered, each with the excerpt of the answer that refused it alone;
3. every outcome goes to the compacted ``<prefix>.deliveries`` topic (``schemas.records.
   DeliveryOutcome``: one record per change and destination), and the call returns only once the
   broker acknowledged the dead letters and log records — the caller may then commit.

At most ``concurrency`` requests of one deliverer are in flight at once, whatever calls it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord

from audience_relay import kafka
from audience_relay.outbox import BatchProducer, Outbox
from audience_relay.partitioner import identifier_partition
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from schemas.records import DeliveryOutcome
from sinks import metrics
from sinks.base import Delivered, GiveUp, Item, Result, RetryAfter, idempotency_key
from sinks.destinations import SinkSpec
from sinks.pacing import correlation, retry_delay
from sinks.policy import Send, decide
from sinks.scrub import excerpt, scrub

log = logging.getLogger("sinks")

Origin = Literal["stream", "replay", "resync"]


class DestinationFailing(Exception):
    """The destination kept failing (not refusing) for ``max_attempts`` attempts."""


@dataclass(slots=True)
class Entry:
    """One record to deliver: its bytes as read (dead-lettered as is) and where it came from."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int
    headers: tuple[tuple[str, bytes], ...] = ()
    field_change: bool = False
    #: A change already decoded (a resync builds them), instead of ``value``.
    change: dict[str, Any] | None = None

    @classmethod
    def of(cls, record: ConsumerRecord[bytes, bytes], field_change: bool = False) -> Entry:
        return cls(
            record.value,
            record.key,
            record.topic,
            record.partition,
            record.offset,
            tuple(record.headers or ()),
            field_change,
        )


@dataclass
class Tally:
    """Changes by outcome."""

    delivered: int = 0
    dead_lettered: int = 0
    filtered: int = 0
    unknown_identifier: int = 0

    def add(self, other: Tally) -> None:
        self.delivered += other.delivered
        self.dead_lettered += other.dead_lettered
        self.filtered += other.filtered
        self.unknown_identifier += other.unknown_identifier


@dataclass
class _Pending:
    entry: Entry
    item: Item
    attempts: int = 0


@dataclass
class _Verdict:
    pending: _Pending
    result: Result
    key: str


@dataclass
class Acks:
    """Broker acknowledgements to wait for before a batch counts as done (and may be committed).

    The batch's delivery-log records are collected in ``log`` and handed to the producer together
    (``hand_over``): one record per change, so per-record ``send()`` would cost the sink ten times
    the CPU (audience_relay/outbox.py).
    """

    log: Outbox
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    #: The log records' ``at`` (ISO 8601, UTC): one batch's outcomes are decided together.
    at: str = ""

    def stamp(self) -> None:
        """Take the current time as the ``at`` of the outcomes logged from now on."""
        self.at = datetime.now(UTC).isoformat().replace("+00:00", "Z")

    def hand_over(self) -> None:
        """Give the collected log records to the producer (in order per partition); no waiting."""
        self.futures.extend(self.log.submit().values())

    async def wait(self) -> None:
        self.hand_over()
        for future in self.futures:
            await future


def _decode(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        change = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(change, dict) or not isinstance(change.get("change_id"), str):
        return None
    return change


def _kind(change: dict[str, Any], field_change: bool) -> str:
    return "fields_changed" if field_change else str(change.get("change", ""))


class Deliverer:
    """Delivers batches to the destination of ``spec``; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        spec: SinkSpec,
        secrets: list[str],
        origin: Origin = "stream",
        *,
        key_namespace: str = "",
        max_attempts: int | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.destination = spec.destination
        self.name = spec.destination.name
        self.origin: Origin = origin
        self.topics = TopicNames.from_settings(settings)
        self._secrets = [s for s in secrets if s]
        self._namespace = key_namespace
        self._max_attempts = max_attempts
        self._slots = asyncio.Semaphore(spec.concurrency)
        self._producer: AIOKafkaProducer | None = None
        self._batches: BatchProducer | None = None
        # A Retry-After is about the destination, not one batch: no request goes before this time.
        self._not_before = 0.0
        self.delivered = 0

    async def start(self) -> None:
        self._producer = kafka.producer(
            self.settings, linger_ms=5, client_id=f"audience-relay-sink-{self.name}-log"
        )
        await self._producer.start()
        self._batches = BatchProducer(self._producer)
        await self.destination.start()

    async def stop(self) -> None:
        await self.destination.stop()
        if self._producer is not None:
            await self._producer.stop()

    # --- one batch ---------------------------------------------------------------------------

    async def process(self, entries: list[Entry]) -> Tally:
        """Deliver ``entries`` as one batch (split only to isolate refusals), and wait until the broker
        acknowledged their dead letters and log records; see the module docstring."""
        tally, acks = await self.send(entries)
        await acks.wait()
        return tally

    async def send(self, entries: list[Entry]) -> tuple[Tally, Acks]:
        """Like ``process``, but returns as soon as the dead letters and log records are handed to the
        producer (which keeps their order per key); ``Acks.wait`` waits for the broker."""
        started = time.monotonic()
        tally = Tally()
        acks = self._acks()
        sendable: list[_Pending] = []
        for entry in entries:
            change = entry.change if entry.change is not None else _decode(entry.value)
            if change is None:
                await self._dead_letter(acks, entry, "undeliverable", "the record is not a change (JSON)")
                tally.dead_lettered += 1
                continue
            decision = decide(self.spec.policy, change, entry.field_change)
            if isinstance(decision, Send):
                sendable.append(_Pending(entry, Item(change, decision.identifier, entry.field_change)))
                continue
            if decision.outcome == "filtered":
                tally.filtered += 1
            else:
                tally.unknown_identifier += 1
                await self._dead_letter(acks, entry, "unknown_identifier", decision.reason)
            self._log(acks, change, entry.field_change, decision.outcome, reason=decision.reason)
        if sendable:
            verdicts = await self._isolate(sendable)
            acks.stamp()
            for verdict in verdicts:
                await self._conclude(acks, verdict, tally)
        for outcome in ("delivered", "dead_lettered", "filtered", "unknown_identifier"):
            count = getattr(tally, outcome)
            if count:
                metrics.RECORDS.labels(self.name, outcome).inc(count)
        metrics.LATENCY.labels(self.name).observe(time.monotonic() - started)
        acks.hand_over()
        return tally, acks

    def _acks(self) -> Acks:
        assert self._batches is not None, "start() first"
        acks = Acks(Outbox(self._batches))
        acks.stamp()
        return acks

    async def _isolate(self, batch: list[_Pending]) -> list[_Verdict]:
        """Send ``batch``; when it is refused, find the refused records by halving it."""
        result, key = await self._send(batch)
        if isinstance(result, GiveUp):
            changes = [p.item.change for p in batch]
            if len(batch) > 1:
                metrics.DELIVERIES.labels(self.name, "split").inc()
                log.info(
                    "batch refused; splitting it to find the refused records",
                    extra={"sink": self.name, "status": result.status, **correlation(changes)},
                )
                half = len(batch) // 2
                return await self._isolate(batch[:half]) + await self._isolate(batch[half:])
            metrics.DELIVERIES.labels(self.name, "dead_lettered").inc()
            log.warning(
                "batch given up",
                extra={
                    "sink": self.name,
                    "status": result.status,
                    "reason": scrub(result.reason, self._secrets),
                    **correlation(changes),
                },
            )
        return [_Verdict(p, result, key) for p in batch]

    async def _send(self, batch: list[_Pending]) -> tuple[Result, str]:
        items = [p.item for p in batch]
        key = idempotency_key([i.change for i in items], self._namespace)
        attempt = 0
        while True:
            result = await self._write_when_allowed(items, key)
            for p in batch:
                p.attempts += 1
            if isinstance(result, Delivered):
                metrics.DELIVERIES.labels(self.name, "delivered").inc()
                metrics.BATCH_SIZE.labels(self.name).observe(len(items))
            if not isinstance(result, RetryAfter):
                return result, key
            attempt += 1
            metrics.RETRIES.labels(self.name).inc()
            cap = self.settings.sink_max_backoff_seconds
            delay = retry_delay(attempt, result.seconds, self.settings.sink_min_retry_seconds, cap)
            if result.seconds:
                self._not_before = max(self._not_before, time.monotonic() + min(result.seconds, cap * 10))
            log.info(
                "delivery will be retried",
                extra={
                    "sink": self.name,
                    "reason": scrub(result.reason, self._secrets),
                    "attempt": attempt,
                    "retry_in_s": round(delay, 3),
                    **correlation([i.change for i in items]),
                },
            )
            if self._max_attempts is not None and attempt >= self._max_attempts:
                raise DestinationFailing(scrub(result.reason, self._secrets))
            await asyncio.sleep(delay)  # the backoff itself, not a wait on a condition

    async def _write_when_allowed(self, items: list[Item], key: str) -> Result:
        """One attempt, in a concurrency slot, once no Retry-After holds the destination back.

        The hold is checked again once the slot is ours: a Retry-After may have come in while this
        request waited for a slot.
        """
        while True:
            wait = self._not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the destination asked for this pause (Retry-After)
                continue
            async with self._slots:
                if self._not_before > time.monotonic():
                    continue
                metrics.INFLIGHT.labels(self.name).inc()
                try:
                    return await self.destination.write(items, key)
                finally:
                    metrics.INFLIGHT.labels(self.name).dec()

    async def _conclude(self, acks: Acks, verdict: _Verdict, tally: Tally) -> None:
        pending, result = verdict.pending, verdict.result
        change = pending.item.change
        if isinstance(result, Delivered):
            tally.delivered += 1
            self.delivered += 1
            self._log(
                acks,
                change,
                pending.entry.field_change,
                "delivered",
                status=result.status,
                attempts=pending.attempts,
                key=verdict.key,
            )
            return
        assert isinstance(result, GiveUp)
        tally.dead_lettered += 1
        shown = excerpt(result.response_text, self._secrets)
        await self._dead_letter(
            acks, pending.entry, "destination_refused", result.reason, result.status, result.response_text
        )
        self._log(
            acks,
            change,
            pending.entry.field_change,
            "dead_lettered",
            status=result.status,
            attempts=pending.attempts,
            key=verdict.key,
            reason=scrub(result.reason, self._secrets),
            response_excerpt=shown,
        )

    # --- what goes to Kafka beside the destination --------------------------------------------

    async def _dead_letter(
        self,
        acks: Acks,
        entry: Entry,
        code: str,
        reason: str,
        status: int | None = None,
        response_text: str = "",
    ) -> None:
        assert self._producer is not None
        value = entry.value if entry.value is not None else orjson.dumps(entry.change)
        before = dict(entry.headers)
        headers = [
            ("stage", b"sink"),
            ("sink", self.name.encode()),
            ("origin", self.origin.encode()),
            ("reason-code", code.encode()),
            ("reason", scrub(reason, self._secrets).encode()),
            ("response-status", str(status or "").encode()),
            ("response-excerpt", excerpt(response_text, self._secrets).encode()),
            # A record refused again in a replay keeps naming where it first came from.
            ("source-topic", before.get("source-topic", entry.topic.encode())),
            ("source-partition", before.get("source-partition", str(entry.partition).encode())),
            ("source-offset", before.get("source-offset", str(entry.offset).encode())),
        ]
        if self.origin == "replay":
            attempts = int(before.get("replay-attempts", b"0") or 0) + 1
            headers.append(("replay-attempts", str(attempts).encode()))
        if entry.field_change:
            headers.append(("field-change", b"1"))
        change_id = before.get("change-id")
        if change_id is None and entry.change is not None:
            change_id = str(entry.change.get("change_id", "")).encode()
        if change_id:
            headers.append(("change-id", change_id))
        acks.futures.append(
            await self._producer.send(self.topics.dead_letter, value=value, key=entry.key, headers=headers)
        )

    def _log(
        self,
        acks: Acks,
        change: dict[str, Any],
        field_change: bool,
        outcome: str,
        *,
        status: int | None = None,
        attempts: int = 0,
        key: str | None = None,
        reason: str | None = None,
        response_excerpt: str | None = None,
    ) -> None:
        """One DeliveryOutcome record (built as a dict: a test checks it against the model)."""
        assert self._producer is not None
        identifier = str(change.get("identifier", ""))
        audience_id = "" if field_change else str(change.get("audience_id", ""))
        record = {
            "schema_version": 1,
            "destination": self.name,
            "identifier": identifier,
            "audience_id": audience_id,
            "audience_slug": None if field_change else change.get("audience_slug"),
            "change_id": change.get("change_id"),
            "change": _kind(change, field_change),
            "event_time": change.get("event_time"),
            "outcome": outcome,
            "origin": self.origin,
            "at": acks.at,
            "status": status,
            "attempts": attempts,
            "idempotency_key": key,
            "reason": reason,
            "response_excerpt": response_excerpt,
        }
        # The identifier's partition (not the whole key's): the worker holding a user's memberships
        # holds their delivery outcomes too (GET /v1/members/{identifier}).
        acks.log.add(
            self.topics.deliveries,
            identifier_partition(identifier, self.settings.partitions),
            DeliveryOutcome.key(identifier, audience_id, self.name),
            orjson.dumps(record),
        )

    async def log_superseded(self, entry: Entry, change: dict[str, Any], reason: str) -> None:
        """A replay skipped ``change``: log it (the log's last word for that user says so)."""
        acks = self._acks()
        self._log(acks, change, entry.field_change, "superseded", reason=reason)
        await acks.wait()
