"""Small read-side helpers over a topic: record counts and reading a whole topic (demo, tools, tests).

Each takes the settings (``Settings``) or, for tests and benchmarks against the local plaintext
broker, just its bootstrap address (``str``); clients come from ``audience_relay.kafka``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from audience_relay import kafka
from audience_relay.settings import Settings

Target = Settings | str


@asynccontextmanager
async def _consumer(target: Target) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = kafka.consumer(target, max_partition_fetch_bytes=64 << 20)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def partition_count(target: Target, topic: str) -> int:
    """The partition count of ``topic`` (0 when it does not exist)."""
    admin = kafka.admin(target)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sum(len(d["partitions"]) for d in described if d["topic"] == topic and not d["error_code"])


async def _partitions(target: Target, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(await partition_count(target, topic))]


async def topic_size(target: Target, topic: str) -> int:
    """Records currently held by ``topic`` (end minus start offsets, summed over partitions)."""
    async with _consumer(target) as consumer:
        parts = await _partitions(target, topic)
        if not parts:
            return 0
        ends = await consumer.end_offsets(parts)
        starts = await consumer.beginning_offsets(parts)
        return sum(ends[tp] - starts[tp] for tp in parts)


async def end_offsets(target: Target, topic: str) -> dict[int, int]:
    """Partition → end offset of ``topic``."""
    async with _consumer(target) as consumer:
        parts = await _partitions(target, topic)
        ends = await consumer.end_offsets(parts) if parts else {}
        return {tp.partition: off for tp, off in ends.items()}


async def read_topic(
    target: Target, topic: str, since: dict[int, int] | None = None
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from ``since`` (partition → offset, default the start) to its current end."""
    async with _consumer(target) as consumer:
        parts = await _partitions(target, topic)
        if not parts:
            return []
        ends = await consumer.end_offsets(parts)
        consumer.assign(parts)
        starts = await consumer.beginning_offsets(parts)
        for tp in parts:
            consumer.seek(tp, max((since or {}).get(tp.partition, 0), starts[tp]))
        out: list[ConsumerRecord[bytes, bytes]] = []
        pending = {tp for tp in parts if await consumer.position(tp) < ends[tp]}
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in batches.items():
                out.extend(r for r in records if r.offset < ends[tp])
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        return out


async def committed_offsets(target: Target, group: str) -> dict[TopicPartition, int]:
    """The offsets ``group`` has committed, by partition (partitions it never committed are absent)."""
    admin = kafka.admin(target)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}


async def group_lag(target: Target, group: str, topics: list[str]) -> int:
    """Records of ``topics`` not yet committed by ``group`` (a partition never committed counts whole)."""
    committed = await committed_offsets(target, group)
    lag = 0
    for topic in topics:
        async with _consumer(target) as consumer:
            parts = await _partitions(target, topic)
            if not parts:
                continue
            ends = await consumer.end_offsets(parts)
            starts = await consumer.beginning_offsets(parts)
        for tp in parts:
            done = committed.get(tp, starts[tp])
            lag += max(0, ends[tp] - done)
    return lag


async def produce_all(
    target: Target,
    topic: str,
    records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
    partitions: list[int] | None = None,
) -> None:
    """Produce ``(key, value, headers)`` records with an idempotent producer and wait for every ack.

    ``partitions``, when given, places each record (else the key's default partitioner does).
    """
    producer = kafka.producer(target, linger_ms=5, max_batch_size=1 << 20, max_request_size=64 << 20)
    await producer.start()
    try:
        places = partitions if partitions is not None else [None] * len(records)
        futures = [
            await producer.send(topic, value=v, key=k, headers=h, partition=p)
            for (k, v, h), p in zip(records, places, strict=True)
        ]
        await producer.flush()
        for fut in futures:
            await fut
    finally:
        await producer.stop()
