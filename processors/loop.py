"""A plain per-partition consumer loop: fetch, hand each partition's records to its own task, pause.

One aiokafka consumer fetches for every partition it holds. Each partition's records go to that
partition's inbox and are handled by one task at a time, in offset order, in batches (the handler
processes a batch, waits for its outputs and commits after it). Partitions run concurrently, so one
partition's wait for the broker overlaps another's work. The inboxes together hold at most about
``max_buffered_bytes``: a partition holding more than its share is paused (aiokafka's public
``pause``) until its task catches up, so memory follows the setting, not the backlog.

Nothing here goes through faust's consumer: records are never dropped or re-marked by a flow
control, and an offset is committed only by the handler, after the batch's outputs were
acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

log = logging.getLogger("processors.loop")

Handler = Callable[[TopicPartition, list[ConsumerRecord[Any, Any]]], Awaitable[None]]


def _size(record: ConsumerRecord[Any, Any]) -> int:
    return len(record.value or b"") + len(record.key or b"")


class PartitionedLoop:
    """Runs ``handler`` over each partition's records, in order, one batch at a time per partition."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        handler: Handler,
        *,
        name: str,
        batch_records: int,
        batch_bytes: int = 8 * 1024 * 1024,
        max_buffered_bytes: int = 32 * 1024 * 1024,
        poll_ms: int = 200,
    ) -> None:
        self.consumer = consumer
        self.handler = handler
        self.name = name
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.poll_ms = poll_ms
        self._inbox: dict[TopicPartition, deque[ConsumerRecord[Any, Any]]] = {}
        self._buffered: dict[TopicPartition, int] = {}
        self._tasks: dict[TopicPartition, asyncio.Task[None]] = {}
        self._paused: set[TopicPartition] = set()
        self._releasing: set[TopicPartition] = set()
        self._failure: BaseException | None = None
        self._wake = asyncio.Event()

    # --- the fetch loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and dispatch until ``stop`` is set or a handler fails (then its error is raised)."""
        while not stop.is_set():
            self._raise_failure()
            if not self.consumer.assignment():
                # Nothing assigned (yet): wait for an assignment without spinning.
                self._wake.clear()
                await _wait_any(stop.wait(), self._wake.wait(), timeout=self.poll_ms / 1000)
                continue
            fetched = await self.consumer.getmany(timeout_ms=self.poll_ms)
            assigned = self.consumer.assignment()
            for tp, records in fetched.items():
                if not records or tp not in assigned or tp in self._releasing:
                    continue
                self._inbox.setdefault(tp, deque()).extend(records)
                self._buffered[tp] = self._buffered.get(tp, 0) + sum(map(_size, records))
                self._start(tp)
            self._flow_control(assigned)
        self._raise_failure()

    def wake(self) -> None:
        """Tell the loop its assignment changed."""
        self._wake.set()

    def _start(self, tp: TopicPartition) -> None:
        task = self._tasks.get(tp)
        if task is None or task.done():
            self._tasks[tp] = asyncio.create_task(
                self._drain(tp), name=f"{self.name}-{tp.topic}-{tp.partition}"
            )

    async def _drain(self, tp: TopicPartition) -> None:
        inbox = self._inbox.get(tp)
        try:
            while inbox and tp not in self._releasing:
                batch: list[ConsumerRecord[Any, Any]] = []
                size = 0
                while inbox and len(batch) < self.batch_records and (not batch or size < self.batch_bytes):
                    record = inbox.popleft()
                    batch.append(record)
                    size += _size(record)
                self._buffered[tp] = max(0, self._buffered.get(tp, 0) - size)
                await self.handler(tp, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the fetch loop raises it: the stage stops, nothing more is committed
            if self._failure is None:
                self._failure = exc
            self._wake.set()

    def _flow_control(self, assigned: Iterable[TopicPartition]) -> None:
        tps = list(assigned)
        share = self.max_buffered_bytes // max(1, len(tps))
        for tp in tps:
            buffered = self._buffered.get(tp, 0)
            if buffered >= share and tp not in self._paused:
                self.consumer.pause(tp)
                self._paused.add(tp)
            elif buffered < share // 2 and tp in self._paused:
                self.consumer.resume(tp)
                self._paused.discard(tp)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # --- holding, opening and releasing partitions -------------------------------------------

    def hold(self, tps: Iterable[TopicPartition]) -> None:
        """Assign ``tps`` to the consumer once, all paused; ``open`` and ``release`` then start and
        stop work on them with pause, resume and seeks, never by changing the assignment.

        A manual assignment that changes while aiokafka 0.14 works is not safe: its group
        coordinator asserts on an assignment that changed while it looked up the coordinator (the
        consumer then fails for good: "Unexpected error during coordination"), and its fetch routine
        swallows a ``stop()``'s cancellation that lands while it settles an unassignment (the stop
        then waits forever). An assignment made once, before any fetch, meets neither.
        """
        tps = list(tps)
        self.consumer.assign(tps)
        self.consumer.pause(*tps)  # before the fetch routine runs again: nothing is fetched for them

    def open(self, tps: Iterable[TopicPartition]) -> None:
        """Start fetching held partitions from where the caller sought them."""
        tps = list(tps)
        if tps:
            self.consumer.resume(*tps)
        self.wake()

    async def release(self, tps: Iterable[TopicPartition], timeout: float) -> None:
        """Stop work on ``tps``: no more is fetched (they are paused while assigned, and aiokafka
        drops what it had buffered for them), the batch in progress finishes (bounded by
        ``timeout``), the rest is dropped. A held partition stays paused until ``open``.

        Dropped records were not committed: whoever holds the partition next reads them again.
        """
        tps = set(tps)
        assigned = self.consumer.assignment()
        paused = [tp for tp in tps if tp in assigned]
        if paused:
            self.consumer.pause(*paused)
        self._releasing |= tps
        tasks = [t for tp, t in self._tasks.items() if tp in tps and not t.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                log.warning(
                    "a batch did not finish before its partition was released",
                    extra={"task": task.get_name()},
                )
                task.cancel()
            if late:
                await asyncio.wait(late)
        for tp in tps:
            self._tasks.pop(tp, None)
            self._inbox.pop(tp, None)
            self._buffered.pop(tp, None)
            self._paused.discard(tp)  # paused above, whatever flow control had decided
        self._releasing -= tps

    async def close(self, timeout: float) -> None:
        """Let every partition's batch in progress finish (bounded), drop the rest."""
        await self.release(list(self._tasks), timeout)


async def _wait_any(*aws: Awaitable[Any], timeout: float) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
