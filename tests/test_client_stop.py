"""Stopping Kafka clients: an aiokafka consumer stopped right after an unassignment must not hang the
process (the worker's SIGTERM once waited forever on it, see ``kafka.stop_clients``)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from audience_relay import kafka
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames


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
