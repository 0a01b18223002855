"""The processors' plumbing without a broker: the per-partition loop and the batch producer.

The consumer and producer here are small stand-ins with aiokafka's interface; what goes through a
real broker is shown by the processors' end-to-end tests. These pin down the order, concurrency and
failure rules those tests rely on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition

from audience_relay.outbox import BatchProducer, Outbox, OutputError
from processors.loop import PartitionedLoop

TOPIC = "t"


@dataclass
class Record:
    partition: int
    offset: int
    value: bytes = b"x" * 10
    key: bytes | None = None
    topic: str = TOPIC


@dataclass
class FakeConsumer:
    """``getmany`` hands out queued records once; ``pause``/``resume`` are remembered."""

    queued: dict[TopicPartition, list[Record]]
    paused: set[TopicPartition] = field(default_factory=set)
    pauses: int = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self.queued)

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Record]]:
        out = {tp: recs for tp, recs in self.queued.items() if recs and tp not in self.paused}
        for tp in out:
            self.queued[tp] = []
        await asyncio.sleep(0.001)
        return out

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)
        self.pauses += 1

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)


def _consumer(partitions: int, records: int) -> FakeConsumer:
    return FakeConsumer(
        {TopicPartition(TOPIC, p): [Record(p, o) for o in range(records)] for p in range(partitions)}
    )


async def _run_until(loop: PartitionedLoop, done: asyncio.Event) -> None:
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    await asyncio.wait_for(done.wait(), 10)
    stop.set()
    await asyncio.wait_for(runner, 10)


async def test_each_partition_is_handled_in_order_one_batch_at_a_time_partitions_together() -> None:
    consumer = _consumer(partitions=3, records=50)
    seen: dict[int, list[int]] = {}
    busy: set[int] = set()
    overlap = 0
    done = asyncio.Event()

    async def handle(tp: TopicPartition, batch: list[Any]) -> None:
        nonlocal overlap
        assert tp.partition not in busy  # never two batches of one partition at once
        busy.add(tp.partition)
        overlap = max(overlap, len(busy))
        await asyncio.sleep(0.005)
        seen.setdefault(tp.partition, []).extend(r.offset for r in batch)
        busy.discard(tp.partition)
        if sum(map(len, seen.values())) == 150:
            done.set()

    loop = PartitionedLoop(consumer, handle, name="t", batch_records=7)  # type: ignore[arg-type]
    await _run_until(loop, done)
    assert seen == {p: list(range(50)) for p in range(3)}
    assert overlap > 1  # one partition's wait overlaps another's work


async def test_a_failed_batch_stops_the_loop_with_its_error_and_nothing_after_it_runs() -> None:
    consumer = _consumer(partitions=1, records=30)
    handled: list[int] = []

    async def handle(tp: TopicPartition, batch: list[Any]) -> None:
        if batch[0].offset >= 10:
            raise RuntimeError("boom")
        handled.extend(r.offset for r in batch)

    loop = PartitionedLoop(consumer, handle, name="t", batch_records=10)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(loop.run(asyncio.Event()), 10)
    assert handled == list(range(10))


async def test_a_partition_over_its_share_of_the_buffer_is_paused_then_resumed() -> None:
    consumer = _consumer(partitions=2, records=100)
    release = asyncio.Event()
    done = asyncio.Event()
    count = 0

    async def handle(tp: TopicPartition, batch: list[Any]) -> None:
        nonlocal count
        await release.wait()
        count += len(batch)
        if count == 200:
            done.set()

    # 100 records of 10 bytes per partition; a 400-byte buffer is a 200-byte share each.
    loop = PartitionedLoop(consumer, handle, name="t", batch_records=5, max_buffered_bytes=400)  # type: ignore[arg-type]
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    await asyncio.sleep(0.05)
    assert consumer.paused == set(consumer.queued)  # both held back while their tasks wait
    release.set()
    await asyncio.wait_for(done.wait(), 10)
    stop.set()
    await asyncio.wait_for(runner, 10)
    assert consumer.paused == set() and consumer.pauses >= 2


async def test_release_finishes_the_batch_in_progress_and_drops_the_rest() -> None:
    consumer = _consumer(partitions=1, records=40)
    started, finish = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def handle(tp: TopicPartition, batch: list[Any]) -> None:
        started.set()
        await finish.wait()
        handled.extend(r.offset for r in batch)

    loop = PartitionedLoop(consumer, handle, name="t", batch_records=10)  # type: ignore[arg-type]
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    await asyncio.wait_for(started.wait(), 10)
    releasing = asyncio.create_task(loop.release([TopicPartition(TOPIC, 0)], timeout=10))
    await asyncio.sleep(0.01)
    assert not releasing.done()  # waits for the batch in progress
    finish.set()
    await asyncio.wait_for(releasing, 10)
    stop.set()
    await asyncio.wait_for(runner, 10)
    assert handled == list(range(10))  # the rest is for the partition's next owner


# --- the batch producer ---------------------------------------------------------------------------


@dataclass
class FakeBatch:
    capacity: int
    records: list[bytes | None] = field(default_factory=list)

    def append(self, *, key: Any, value: Any, timestamp: Any, headers: Any) -> object | None:
        if len(self.records) >= self.capacity:
            return None
        self.records.append(value)
        return object()


@dataclass
class FakeMetadata:
    offset: int


class FakeProducer:
    """Batches of ``capacity`` records; each partition's log assigns offsets in send order."""

    def __init__(self, capacity: int, fail_on: bytes | None = None) -> None:
        self.capacity = capacity
        self.fail_on = fail_on
        self.logs: dict[tuple[str, int], list[bytes | None]] = {}
        self.sends = 0

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        await asyncio.sleep(0)
        self.sends += 1
        log = self.logs.setdefault((topic, partition), [])
        base = len(log)
        log.extend(batch.records)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail_on is not None and self.fail_on in batch.records:
            future.set_exception(RuntimeError("MessageSizeTooLarge"))
        else:
            future.set_result(FakeMetadata(base))
        return future


async def test_submissions_for_a_partition_merge_into_batches_in_order_with_their_last_offsets() -> None:
    producer = FakeProducer(capacity=4)
    batches = BatchProducer(producer)  # type: ignore[arg-type]
    outboxes = []
    for n in range(5):  # five tasks, each with three records for the same partition
        box = Outbox(batches)
        for i in range(3):
            box.add(TOPIC, 0, None, f"{n}-{i}".encode())
        outboxes.append(box)
    results = await asyncio.gather(*(box.flush() for box in outboxes))
    log = producer.logs[(TOPIC, 0)]
    assert log == [f"{n}-{i}".encode() for n in range(5) for i in range(3)]  # submission order
    assert [r[(TOPIC, 0)] for r in results] == [2, 5, 8, 11, 14]  # each one's own last record
    assert producer.sends == 4  # 15 records in batches of 4, not 5 separate sends


async def test_a_refused_batch_fails_every_submission_in_it() -> None:
    producer = FakeProducer(capacity=10, fail_on=b"bad")
    batches = BatchProducer(producer)  # type: ignore[arg-type]
    good, bad = Outbox(batches), Outbox(batches)
    good.add(TOPIC, 1, None, b"ok")
    bad.add(TOPIC, 1, None, b"bad")
    results = await asyncio.gather(good.flush(), bad.flush(), return_exceptions=True)
    assert all(isinstance(r, OutputError) for r in results)  # they shared the refused batch
