"""Consumer lag of a consumer group, exported as ``relay_consumer_lag{group,topic,partition}``.

Who exports it: every consuming process (worker, each sink) runs a ``LagMonitor`` for its *own*
group. Lag is read from the group's committed offsets and the topics' end offsets — the broker's
view, the same figure ``kafka-consumer-groups --describe`` prints — not from one member's fetch
positions. So it covers every partition of the group whichever member owns it, and it stays
correct when partitions move in a rebalance: there is no per-member series left behind, and a
partition between owners still shows its lag. Every replica of a component exports the same
series; dashboards and alerts take ``max by (group, topic, partition)``.

A partition the group never committed counts from the log start (``auto_offset_reset=earliest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

from audience_relay import kafka
from audience_relay.settings import Settings

log = logging.getLogger("audience_relay.lag")

LAG = Gauge(
    "relay_consumer_lag",
    "Records of a topic-partition not yet committed by the consumer group",
    ["group", "topic", "partition"],
)
UPDATED = Gauge(
    "relay_consumer_lag_updated_timestamp_seconds",
    "Unix time of the last successful reading of the group's lag",
    ["group"],
)


def partition_lag(
    ends: Mapping[TopicPartition, int],
    starts: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, int],
) -> dict[TopicPartition, int]:
    """Lag of every partition in ``ends``: end offset minus the committed (or log start) offset.

    A committed offset below the log start (records deleted by retention) counts from the start:
    those records can no longer be consumed, so they are not work left to do.
    """
    lag: dict[TopicPartition, int] = {}
    for tp, end in ends.items():
        start = starts.get(tp, 0)
        done = committed.get(tp, -1)
        lag[tp] = max(0, end - max(done, start))
    return lag


class LagMonitor:
    """Reads ``group``'s lag on ``topics`` every ``interval`` seconds into ``relay_consumer_lag``."""

    def __init__(self, settings: Settings, group: str, topics: list[str], interval: float = 15.0) -> None:
        self.settings = settings
        self.group = group
        self.topics = topics
        self.interval = interval
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._exported: set[TopicPartition] = set()

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._consumer is None:
            admin = kafka.admin(self.settings, client_id="audience-relay-lag")
            consumer = kafka.consumer(self.settings, client_id="audience-relay-lag")
            try:
                await admin.start()
                await consumer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await admin.close()
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise
            self._admin, self._consumer = admin, consumer
        return self._admin, self._consumer

    async def poll_once(self) -> dict[TopicPartition, int]:
        """Read the lag once, update the gauges and return it."""
        admin, consumer = await self._clients()
        described = await admin.describe_topics(self.topics)
        parts = [
            TopicPartition(d["topic"], p["partition"])
            for d in described
            if not d["error_code"]
            for p in d["partitions"]
        ]
        offsets = await admin.list_consumer_group_offsets(self.group)
        committed = {tp: meta.offset for tp, meta in offsets.items() if meta is not None}
        ends = await consumer.end_offsets(parts) if parts else {}
        starts = await consumer.beginning_offsets(parts) if parts else {}
        lag = partition_lag(ends, starts, committed)
        for tp, value in lag.items():
            LAG.labels(self.group, tp.topic, str(tp.partition)).set(value)
        # A topic deleted or re-created smaller must not leave its old partitions reporting.
        for tp in self._exported - set(lag):
            with contextlib.suppress(KeyError):
                LAG.remove(self.group, tp.topic, str(tp.partition))
        self._exported = set(lag)
        UPDATED.labels(self.group).set(time.time())
        return lag

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll until ``stop`` is set (or the task is cancelled); broker trouble is logged, not fatal."""
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    await self.poll_once()
                except (KafkaError, OSError) as exc:
                    # The staleness shows in relay_consumer_lag_updated_timestamp_seconds.
                    log.warning(
                        "could not read consumer lag",
                        extra={"group": self.group, "error": repr(exc)},
                    )
                    await self.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the Kafka clients (they are opened again on the next poll)."""
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()
