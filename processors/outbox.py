"""Producing many records at once: one batch per topic-partition, one acknowledgement to wait for.

aiokafka's ``send()`` costs about ten times more CPU per record than appending to a batch (it
partitions each key in pure Python, queues each record and makes a future per record; measured
here: 23.6 µs vs 2.4 µs per record). The stages know every record's partition already (an output
goes to the partition of its input), so they append to per-partition batches (aiokafka's public
``create_batch`` / ``send_batch``) and wait once per batch.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

Headers = Sequence[tuple[str, bytes]]


class OutputError(RuntimeError):
    """The broker refused or never acknowledged an output record: nothing may be committed past it."""


class Outbox:
    """Records collected per (topic, partition), sent as few batches as possible by ``flush``."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._records: dict[tuple[str, int], list[tuple[bytes | None, bytes | None, Headers]]] = defaultdict(
            list
        )

    def add(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: Headers = ()
    ) -> None:
        """Queue one record (sent by the next ``flush``)."""
        self._records[(topic, partition)].append((key, value, headers))

    def __len__(self) -> int:
        return sum(len(records) for records in self._records.values())

    async def flush(self) -> dict[tuple[str, int], int]:
        """Send everything queued, wait for the broker; the last record's offset per (topic, partition).

        Raises ``OutputError`` when any batch failed after the producer's own retries.
        """
        queued, self._records = self._records, defaultdict(list)
        pending: list[tuple[tuple[str, int], int, asyncio.Future[Any]]] = []
        for (topic, partition), records in queued.items():
            batch = self._producer.create_batch()
            count = 0
            for key, value, headers in records:
                if batch.append(key=key, value=value, timestamp=None, headers=list(headers)) is None:
                    pending.append(((topic, partition), count, await self._send(batch, topic, partition)))
                    batch, count = self._producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None, headers=list(headers)) is None:
                        raise OutputError(f"a record for {topic}[{partition}] does not fit in a batch")
                count += 1
            if count:
                pending.append(((topic, partition), count, await self._send(batch, topic, partition)))
        last: dict[tuple[str, int], int] = {}
        results = await asyncio.gather(*(future for _, _, future in pending), return_exceptions=True)
        for (tp, count, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                raise OutputError(
                    f"Kafka did not accept a batch for {tp[0]}[{tp[1]}]: {result!r}"
                ) from result
            last[tp] = max(last.get(tp, -1), result.offset + count - 1)
        return last

    async def _send(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        try:
            future: asyncio.Future[Any] = await self._producer.send_batch(batch, topic, partition=partition)
        except Exception as exc:  # e.g. the accumulator timed out waiting for a slot
            raise OutputError(f"Kafka did not take a batch for {topic}[{partition}]: {exc!r}") from exc
        return future
