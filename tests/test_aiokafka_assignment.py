"""What aiokafka 0.14 does when a manual assignment changes while it works, and the two ways the
worker stays clear of it: partitions held once and paused/resumed (``PartitionedLoop.hold``), and a
bounded stop (``kafka.stop_clients``). The worker's SIGTERM once waited forever, and a worker whose
table partitions moved during its start once failed for good."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from audience_relay import kafka
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from processors.loop import PartitionedLoop


async def _assigned(settings: Settings, topics: TopicNames) -> AIOKafkaConsumer:
    consumer = kafka.consumer(settings)
    await consumer.start()
    consumer.assign([TopicPartition(topics.raw, 0)])
    await consumer.getmany(timeout_ms=300)  # the fetch routine is running on that assignment
    return consumer


class Recorder:
    stopped = False

    async def stop(self) -> None:
        self.stopped = True


async def test_upstream_a_consumer_stop_right_after_unassign_hangs(
    kafka_settings: Settings, topics: TopicNames
) -> None:
    # The aiokafka behaviour stop_clients guards against. When this fails, aiokafka no longer
    # swallows that cancellation: the stop-without-unassign paths and the bound can be dropped.
    consumer = await _assigned(kafka_settings, topics)
    consumer.assign([])
    stopping = asyncio.ensure_future(consumer.stop())
    done, _ = await asyncio.wait([stopping], timeout=3)
    assert not done, "aiokafka's consumer.stop() after assign([]) finished: re-check kafka.stop_clients"
    await kafka.stop_clients([consumer], timeout=3)  # a second cancellation lets it go
    await asyncio.wait_for(stopping, 10)


@pytest.mark.timeout(60)
async def test_stop_clients_stops_a_consumer_unassigned_just_before(
    kafka_settings: Settings, topics: TopicNames
) -> None:
    consumer, other = await _assigned(kafka_settings, topics), Recorder()
    consumer.assign([])
    await kafka.stop_clients([consumer, other], timeout=2)
    assert other.stopped  # the client after it was stopped too


async def test_upstream_a_manual_assignment_changed_during_the_coordinator_lookup_breaks_the_consumer(
    kafka_settings: Settings, topics: TopicNames
) -> None:
    # Why the stages hold their partitions instead of re-assigning them. When this fails, aiokafka
    # handles it: PartitionedLoop.hold is then a choice, no longer a necessity.
    consumer = kafka.consumer(kafka_settings, group_id=f"assign-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topics.raw, 0)])
        await asyncio.sleep(0)  # the coordination routine is now looking up the group's coordinator
        consumer.assign([TopicPartition(topics.raw, 1)])
        with pytest.raises(KafkaError, match="Unexpected error during coordination"):
            for _ in range(20):
                await consumer.getmany(timeout_ms=250)
    finally:
        await kafka.stop_clients([consumer], timeout=3)


@pytest.mark.timeout(60)
async def test_held_partitions_open_and_release_without_touching_the_assignment(
    kafka_settings: Settings, topics: TopicNames
) -> None:
    tps = [TopicPartition(topics.raw, p) for p in range(kafka_settings.partitions)]
    producer = kafka.producer(kafka_settings)
    await producer.start()
    for tp in tps:
        await producer.send_and_wait(topics.raw, f"p{tp.partition}".encode(), partition=tp.partition)
    await producer.stop()
    consumer = kafka.consumer(
        kafka_settings, group_id=f"hold-{uuid.uuid4().hex}", auto_offset_reset="earliest"
    )
    seen: list[tuple[int, bytes]] = []
    got = asyncio.Event()

    async def handle(tp: TopicPartition, batch: list[object]) -> None:
        seen.extend((tp.partition, r.value) for r in batch)  # type: ignore[attr-defined]
        got.set()

    loop = PartitionedLoop(consumer, handle, name="held", batch_records=10)
    await consumer.start()
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    try:
        loop.hold(tps)
        await asyncio.sleep(0)  # as above: the coordinator lookup is under way, and nothing breaks
        first, second = tps[0], tps[1]
        await consumer.seek_to_beginning(first)
        loop.open([first])
        await asyncio.wait_for(got.wait(), 30)
        assert seen == [(0, b"p0")]  # only the opened partition was fetched
        await loop.release([first], timeout=5)
        got.clear()
        await consumer.seek_to_beginning(second)
        loop.open([second])
        await asyncio.wait_for(got.wait(), 30)
        assert seen == [(0, b"p0"), (1, b"p1")]
        assert consumer.assignment() == set(tps)
        assert consumer.paused() == set(tps) - {second}
    finally:
        stop.set()
        await running
        await kafka.stop_clients([consumer], timeout=5)
