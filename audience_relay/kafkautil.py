"""Small read-side helpers over a topic: record counts and reading a whole topic (demo, tools, tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


@asynccontextmanager
async def _consumer(bootstrap: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=64 << 20
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def partition_count(bootstrap: str, topic: str) -> int:
    """The partition count of ``topic`` (0 when it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sum(len(d["partitions"]) for d in described if d["topic"] == topic and not d["error_code"])


async def _partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(await partition_count(bootstrap, topic))]


async def topic_size(bootstrap: str, topic: str) -> int:
    """Records currently held by ``topic`` (end minus start offsets, summed over partitions)."""
    async with _consumer(bootstrap) as consumer:
        parts = await _partitions(bootstrap, topic)
        if not parts:
            return 0
        ends = await consumer.end_offsets(parts)
        starts = await consumer.beginning_offsets(parts)
        return sum(ends[tp] - starts[tp] for tp in parts)


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition → end offset of ``topic``."""
    async with _consumer(bootstrap) as consumer:
        parts = await _partitions(bootstrap, topic)
        ends = await consumer.end_offsets(parts) if parts else {}
        return {tp.partition: off for tp, off in ends.items()}


async def read_topic(
    bootstrap: str, topic: str, since: dict[int, int] | None = None
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from ``since`` (partition → offset, default the start) to its current end."""
    async with _consumer(bootstrap) as consumer:
        parts = await _partitions(bootstrap, topic)
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
