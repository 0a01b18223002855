"""The broker-outage guard of aiokafka clients (audience_relay/kafkaguard.py), without a broker.

Two kinds of test: what the guard does, and the fence — the aiokafka 0.14 behaviour it relies on and
repairs. A fence test failing after an aiokafka upgrade means: read the new code, then adapt or drop
the guard (see the module docstring).
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import NotLeaderForPartitionError
from aiokafka.structs import TopicPartition

from audience_relay import kafka
from audience_relay.kafkaguard import (
    RETRY_BACKOFF_MS,
    BackoffClient,
    MetadataBackoff,
    guard,
    guard_client,
)

NOWHERE = "127.0.0.1:1"  # nothing is ever asked of it: the clients are never started


def test_backoff_spaces_the_same_request_and_doubles_after_failures() -> None:
    b = MetadataBackoff(min_interval=0.25, cap=2.0)
    topics = frozenset({"a"})
    assert b.delay(topics, 0.0) == 0.0  # nothing asked yet
    b.record(topics, True, 10.0)
    assert b.delay(topics, 10.1) == pytest.approx(0.15)  # the same request again: spaced
    assert b.delay(frozenset({"a", "b"}), 10.1) == 0.0  # new topics are asked for at once
    assert b.delay(topics, 11.0) == 0.0
    waits = []
    for _ in range(6):
        b.record(topics, False, 20.0)
        waits.append(b.delay(frozenset({"other"}), 20.0))  # failing: whatever is asked waits
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    b.record(topics, True, 30.0)
    assert b.failures == 0 and b.delay(frozenset({"other"}), 30.0) == 0.0


async def _metadata_attempts(client: AIOKafkaClient, seconds: float) -> int:
    """How many metadata requests a sender/fetcher-like loop makes in ``seconds`` while they fail.

    A client never bootstrapped knows no broker, so every update fails at once — as when a broker
    refuses connections. The loop is aiokafka's own: its synchronizer task, woken by
    ``force_metadata_update`` (what the sender and fetcher call while a partition has no leader).
    """
    attempts = 0
    update = client._metadata_update

    async def counted(cluster: object, topics: object) -> bool:
        nonlocal attempts
        attempts += 1
        return bool(await update(cluster, topics))

    client._metadata_update = counted  # count only; the method itself still runs
    client._sync_task = asyncio.create_task(client._md_synchronizer())  # what bootstrap() starts
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert await client.force_metadata_update() is False
    finally:
        await client.close()
    return attempts


async def test_fence_aiokafka_spins_on_failing_metadata_updates() -> None:
    """Unguarded, a failing update is retried as fast as the loop turns (issue 15)."""
    assert await _metadata_attempts(AIOKafkaClient(bootstrap_servers=NOWHERE), 0.5) > 200


async def test_guarded_client_backs_off_between_failing_updates() -> None:
    client = guard_client(AIOKafkaClient(bootstrap_servers=NOWHERE), min_interval=0.05, cap=0.2)
    # 0, .05, .15, .35, .55, .75, .95: one more every cap once the doubling reaches it.
    assert 4 <= await _metadata_attempts(client, 1.0) <= 8


async def test_factory_clients_are_guarded_with_the_retry_backoff() -> None:
    producer = kafka.producer(NOWHERE)
    consumer = kafka.consumer(NOWHERE)
    admin = kafka.admin(NOWHERE)
    assert type(producer.client) is BackoffClient
    assert type(consumer._client) is BackoffClient
    assert type(admin._client) is BackoffClient
    assert producer.client._retry_backoff == consumer._client._retry_backoff == RETRY_BACKOFF_MS / 1000
    assert guard(producer) is producer and type(producer.client) is BackoffClient  # idempotent
    with pytest.raises(TypeError):
        guard_client(object())  # type: ignore[arg-type]


async def _expire_one(producer: AIOKafkaProducer) -> tuple[int, asyncio.Future[object]]:
    """Queue one record on a partition with no leader and let its batch outlive its time to live.

    Returns the partition's next sequence number afterwards and the record's delivery future.
    """
    tp = TopicPartition("t", 0)
    producer._txn_manager.set_pid_and_epoch(1, 0)  # as after InitProducerId
    accumulator = producer._message_accumulator
    delivery = await accumulator.add_message(tp, None, b"v", timeout=1)
    await asyncio.sleep(0.01)  # past request_timeout_ms=1
    accumulator.drain_by_nodes(ignore_nodes=set())  # the sender's step; the cluster knows no leader
    return producer._txn_manager.sequence_number(tp), delivery


async def test_fence_aiokafka_numbers_expired_batches() -> None:
    """Unguarded, an idempotent producer drops a leaderless batch after ``request_timeout_ms`` and
    still counts its sequence number: the broker then refuses the next batch as out of order."""
    producer = AIOKafkaProducer(bootstrap_servers=NOWHERE, enable_idempotence=True, request_timeout_ms=1)
    assert producer._message_accumulator._batch_ttl == pytest.approx(0.001)
    sequence, delivery = await _expire_one(producer)
    assert delivery.done() and isinstance(delivery.exception(), NotLeaderForPartitionError)
    assert sequence == 1  # numbered although never sent


async def test_guarded_producer_keeps_a_leaderless_batch() -> None:
    producer = guard(
        AIOKafkaProducer(bootstrap_servers=NOWHERE, enable_idempotence=True, request_timeout_ms=1)
    )
    assert producer._message_accumulator._batch_ttl == math.inf
    sequence, delivery = await _expire_one(producer)
    assert not delivery.done() and sequence == 0  # still queued, waiting for a leader
    delivery.cancel()


async def test_faust_transport_guards_its_clients() -> None:
    from audience_relay import faustguard

    settings = kafka.faust_broker_settings(kafka.as_settings(NOWHERE))
    assert settings["broker"] == [f"{faustguard.SCHEME}://{NOWHERE}"]
    assert faustguard.Transport.Producer is faustguard.Producer
    assert faustguard.Transport.Consumer is faustguard.Consumer
    # The hooks override faust's own factory methods (renamed upstream: this fails).
    from faust.transport.drivers import aiokafka as driver

    assert callable(driver.Producer._new_producer) and callable(driver.Producer._settings_extra)
    assert callable(driver.AIOKafkaConsumerThread._create_consumer)
    assert callable(driver.Consumer._new_consumer_thread)
    assert isinstance(guard(AIOKafkaConsumer(bootstrap_servers=NOWHERE))._client, BackoffClient)
