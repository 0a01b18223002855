"""The Kafka topics of the design, their names under ``RELAY_TOPIC_PREFIX`` and their configs."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from audience_relay.settings import Settings

log = logging.getLogger(__name__)
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class TopicNames:
    """Every topic name, derived from the prefix once."""

    raw: str
    segment_events: str
    dead_letter: str
    membership_changes: str
    membership: str
    analytics: str
    #: Field-change events (FieldChange v1, keyed by identifier), for the analytics sink.
    field_changes: str
    #: Last delivery outcome per identifier, audience and destination (compacted; sinks/deliver.py).
    deliveries: str
    #: The membership table's changelog (faust names it ``<app id>-<table>-changelog``).
    changelog: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TopicNames:
        p = settings.topic_prefix
        return cls(
            raw=f"{p}.webhooks.raw",
            segment_events=f"{p}.segment-events",
            dead_letter=f"{p}.dead-letter",
            membership_changes=f"{p}.membership-changes",
            membership=f"{p}.membership",
            analytics=settings.analytics_topic or f"{p}.analytics",
            field_changes=f"{p}.field-changes",
            deliveries=f"{p}.deliveries",
            changelog=f"{p}-processors-membership-changelog",
        )


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partition count and topic-level configs."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics of the design with ``RELAY_PARTITIONS`` partitions and their configs."""
    names = TopicNames.from_settings(settings)
    n = settings.partitions
    # Raw bodies may be as large as the ingress accepts; leave room for headers and batch overhead.
    big = str(settings.max_body_bytes + 1024 * 1024)
    return [
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
        # Current state: one record per (identifier, audience); compaction keeps the newest.
        TopicSpec(names.membership, n, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
        TopicSpec(names.analytics, n, {"cleanup.policy": "delete"}),
        TopicSpec(names.field_changes, n, {"cleanup.policy": "delete"}),
        # One record per (identifier, audience, destination): compaction keeps the last outcome.
        TopicSpec(names.deliveries, n, {"cleanup.policy": "compact"}),
        # Created here, not left to the worker's faust: a changelog it creates at start can still be
        # described with no partitions when the first batch writes the table, and faust then stops
        # the agent with PartitionsMismatch (seen on a freshly started broker).
        TopicSpec(names.changelog, n, {"cleanup.policy": "compact"}),
    ]


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
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers, client_id="audience-relay-admin"
    )
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
        for r in results:
            if not r.created and r.partitions != settings.partitions:
                log.warning(
                    "topic has a different partition count than RELAY_PARTITIONS",
                    extra={"topic": r.name, "partitions": r.partitions, "wanted": settings.partitions},
                )
        return results
    finally:
        await admin.close()
