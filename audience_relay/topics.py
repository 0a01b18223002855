"""The Kafka topics of the design and their configs (names: ``audience_relay.names``).

Replication: every topic gets ``RELAY_REPLICATION_FACTOR`` replicas and, when
``RELAY_MIN_INSYNC_REPLICAS`` is above 1, that ``min.insync.replicas``; at 1 the broker's own
default applies (so a cluster-wide stricter default is not lowered). Every producer of the relay
writes with acks=all, so a write is acknowledged only once that many replicas hold it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from audience_relay import kafka
from audience_relay.names import TopicNames
from audience_relay.settings import Settings

__all__ = ["TopicNames", "TopicResult", "TopicSpec", "create_topics", "replica_configs", "topic_specs"]

log = logging.getLogger(__name__)
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partition count and topic-level configs."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    #: False for a topic whose partition count is its readers' business once created (the analytics
    #: output, which ``partitions apply`` leaves as it is): a different count is no problem.
    follows_partitions: bool = True


def replica_configs(settings: Settings) -> dict[str, str]:
    """Topic configs for ``RELAY_MIN_INSYNC_REPLICAS`` (none at 1: the broker's default stands)."""
    if settings.min_insync_replicas > 1:
        return {"min.insync.replicas": str(settings.min_insync_replicas)}
    return {}


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics of the design with ``RELAY_PARTITIONS`` partitions and their configs."""
    names = TopicNames.from_settings(settings)
    n = settings.partitions
    # Raw bodies may be as large as the ingress accepts; leave room for headers and batch overhead.
    big = str(settings.max_body_bytes + 1024 * 1024)
    replicas = replica_configs(settings)
    specs = [
        TopicSpec(
            names.raw,
            n,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.raw_retention_hours * HOUR_MS),
                "max.message.bytes": big,
            },
        ),
        TopicSpec(names.segment_events, n, {"cleanup.policy": "delete"}),
        TopicSpec(
            names.dead_letter,
            n,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.dead_letter_retention_hours * HOUR_MS),
                "max.message.bytes": big,
            },
        ),
        TopicSpec(names.membership_changes, n, {"cleanup.policy": "delete"}),
        # Current state: one record per (identifier, audience); compaction keeps the newest. It is
        # also the membership table's changelog (recovery and standby copies read it).
        TopicSpec(names.membership, n, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
        TopicSpec(names.field_changes, n, {"cleanup.policy": "delete"}),
        TopicSpec(names.analytics, n, {"cleanup.policy": "delete"}, follows_partitions=False),
        # One record per (identifier, audience, destination): compaction keeps the last outcome.
        # Partitioned by the identifier, so a worker holds the outcomes of the users it holds.
        TopicSpec(names.deliveries, n, {"cleanup.policy": "compact"}),
    ]
    return [TopicSpec(s.name, s.partitions, {**s.config, **replicas}, s.follows_partitions) for s in specs]


@dataclass(frozen=True)
class TopicResult:
    name: str
    partitions: int
    created: bool


async def _described_counts(
    admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30.0
) -> dict[str, int]:
    """Partition count per topic, once the broker's metadata shows every one of ``names``.

    A topic just created can be described with no partitions (or an error) for a moment, until
    the controller's metadata reaches the broker that answers.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        described = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in described if not d["error_code"]}
        if all(counts.get(n, 0) > 0 for n in names) or asyncio.get_running_loop().time() > deadline:
            return counts
        await asyncio.sleep(0.1)


async def create_topics(settings: Settings) -> list[TopicResult]:
    """Create every missing topic; report existing ones with their partition count."""
    admin = kafka.admin(settings, client_id="audience-relay-admin")
    await admin.start()
    try:
        specs = topic_specs(settings)
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created: set[str] = set()
        if missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name=s.name,
                            num_partitions=s.partitions,
                            replication_factor=settings.replication_factor,
                            topic_configs=s.config,
                        )
                        for s in missing
                    ]
                )
                created = {s.name for s in missing}
            except TopicAlreadyExistsError:
                # Another process created some of them between our list and create: fine.
                created = set()
        counts = await _described_counts(admin, [s.name for s in specs])
        results = [TopicResult(s.name, counts.get(s.name, 0), s.name in created) for s in specs]
        follows = {s.name for s in specs if s.follows_partitions}
        for r in results:
            if not r.created and r.name in follows and r.partitions != settings.partitions:
                log.warning(
                    "topic has a different partition count than RELAY_PARTITIONS",
                    extra={"topic": r.name, "partitions": r.partitions, "wanted": settings.partitions},
                )
        return results
    finally:
        await admin.close()
