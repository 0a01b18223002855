"""The current membership state as the compacted ``<prefix>.membership`` topic holds it.

Key ``identifier`` + ``\\x1f`` + ``audience_id``, value a ``MembershipState`` JSON (``member``,
``entered_at``, ``exited_at``, ``updated_at``, ``event_id``), or a tombstone. The sinks read it to
tell whether a dead-lettered change was superseded by a newer one, and to resync a destination.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition

from audience_relay import kafka
from audience_relay.kafkautil import Target, partition_count

State = dict[str, Any]


def membership_key(identifier: str, audience_id: str) -> bytes:
    """The key of one (identifier, audience) in the membership topic."""
    return f"{identifier}\x1f{audience_id}".encode()


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def superseded(change: dict[str, Any], state: State | None) -> bool:
    """True when a newer change of the same identifier and audience made ``change`` out of date.

    - the state says the opposite membership: a later flip happened (it is delivered or pending on
      its own, and it is the destination's right last word);
    - the state agrees, but an event of the opposite kind newer than the change was seen (for an
      enter: ``exited_at`` after it; for an exit: ``entered_at`` after it): the user left and came
      back (or the reverse) since, so this change is an older word than the newest one.

    Without a state (never written, or removed by a partition move) nothing says it is out of date:
    it is not superseded.
    """
    if state is None:
        return False
    member = bool(change.get("member", change.get("change") == "entered"))
    if bool(state.get("member")) != member:
        return True
    at = _time(change.get("event_time"))
    opposite = _time(state.get("exited_at") if member else state.get("entered_at"))
    return at is not None and opposite is not None and opposite > at


async def scan(
    target: Target,
    topic: str,
    partitions: Iterable[int] | None = None,
    starts: dict[int, int] | None = None,
    ends: dict[int, int] | None = None,
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` (or of ``partitions``) from ``starts`` (default: the log start) to
    ``ends`` (default: the end offsets when the scan begins), partition by partition interleaved."""
    count = await partition_count(target, topic)
    wanted = list(range(count)) if partitions is None else [p for p in partitions if p < count]
    if not wanted:
        return
    consumer = kafka.consumer(target, max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in wanted]
        consumer.assign(parts)
        begin = await consumer.beginning_offsets(parts)
        end_offsets = await consumer.end_offsets(parts)
        stop = {tp: (ends or {}).get(tp.partition, end_offsets[tp]) for tp in parts}
        for tp in parts:
            consumer.seek(tp, max(begin[tp], (starts or {}).get(tp.partition, 0)))
        pending = {tp for tp in parts if await consumer.position(tp) < stop[tp]}
        while pending:
            fetched = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in fetched.items():
                for record in records:
                    if record.offset < stop[tp]:
                        yield record
            pending = {tp for tp in pending if await consumer.position(tp) < stop[tp]}
    finally:
        await consumer.stop()


async def read_states(target: Target, topic: str, wanted: set[bytes]) -> dict[bytes, State | None]:
    """The newest state of each key in ``wanted`` (``None`` for a tombstone); absent keys are missing."""
    out: dict[bytes, State | None] = {}
    if not wanted:
        return out
    async for record in scan(target, topic):
        if record.key in wanted:
            out[record.key] = orjson.loads(record.value) if record.value is not None else None
    return out
