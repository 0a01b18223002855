"""Every name the relay gives things in Kafka, derived from ``RELAY_TOPIC_PREFIX`` in one place.

- ``SINKS``: the destinations a sink process can run (the CLI's choices, the consumer groups, ``up``);
- ``TopicNames``: every topic;
- ``GroupNames``: every consumer group (the workers' three, one per sink, one per replay, one per
  resync);
- ``Names``: both, from the settings.

Nothing here does I/O; the settings are imported for type hints only, so ``settings.py`` can use
the sink constants without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from audience_relay.settings import Settings

#: The destinations, in the order they are listed everywhere (CLI choices, ``up``, docs).
SINKS: Final[tuple[str, ...]] = ("pushly", "odp", "analytics")

#: Each sink's default web port (``/healthz``, ``/readyz``, ``/metrics``) when
#: ``RELAY_SINK_WEB_PORT`` is unset, so the three sinks can run side by side on one host.
SINK_WEB_PORTS: Final[dict[str, int]] = {"pushly": 9108, "odp": 9109, "analytics": 9110}


def processors_app_id(prefix: str) -> str:
    """The processors' faust app id: the table group's name and the folder of a worker's tables."""
    return f"{prefix}-processors-tables"


@dataclass(frozen=True)
class TopicNames:
    """Every topic name, derived from the prefix once."""

    raw: str
    segment_events: str
    dead_letter: str
    membership_changes: str
    membership: str
    analytics: str
    #: User-field change events (``FieldChange``), keyed by identifier.
    field_changes: str
    #: The compacted record of the last partition move (``audience-relay partitions apply``).
    partition_moves: str
    #: Last delivery outcome per identifier, audience and destination (compacted; sinks/deliver.py).
    deliveries: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TopicNames:
        """The topic names for ``settings`` (``RELAY_TOPIC_PREFIX``, ``RELAY_ANALYTICS_TOPIC``)."""
        p = settings.topic_prefix
        return cls(
            raw=f"{p}.webhooks.raw",
            segment_events=f"{p}.segment-events",
            dead_letter=f"{p}.dead-letter",
            membership_changes=f"{p}.membership-changes",
            membership=f"{p}.membership",
            analytics=settings.analytics_topic or f"{p}.analytics",
            field_changes=f"{p}.field-changes",
            partition_moves=f"{p}.partitions",
            deliveries=f"{p}.deliveries",
        )


@dataclass(frozen=True)
class GroupNames:
    """Every consumer group name, derived from the prefix once."""

    #: The split stage (``webhooks.raw``): a regular consumer group of the workers.
    split: str
    #: The membership table's faust app (its app id): assigns the table partitions, active and
    #: standby, to the workers; it commits no offsets.
    tables: str
    #: Offsets of ``segment-events`` committed by the membership stage. The group has no members:
    #: the table assignment decides which worker reads which partition.
    membership: str
    #: ``<prefix>.sink.<name>`` for each of ``SINKS``.
    sinks: dict[str, str]
    #: ``<prefix>.dead-letter-replay.<name>``: where ``dead-letter replay`` remembers its position.
    replays: dict[str, str]
    #: ``<prefix>.resync.<name>``: where ``sink resync`` keeps a run's progress.
    resyncs: dict[str, str]

    @classmethod
    def from_settings(cls, settings: Settings) -> GroupNames:
        """The group names for ``settings`` (``RELAY_TOPIC_PREFIX``)."""
        p = settings.topic_prefix
        return cls(
            split=f"{p}-processors",
            tables=processors_app_id(p),
            membership=f"{p}-processors-membership",
            sinks={name: f"{p}.sink.{name}" for name in SINKS},
            replays={name: f"{p}.dead-letter-replay.{name}" for name in SINKS},
            resyncs={name: f"{p}.resync.{name}" for name in SINKS},
        )

    def sink(self, name: str) -> str:
        """The consumer group of the sink ``name`` (one of ``SINKS``)."""
        return self.sinks[name]

    def replay(self, name: str) -> str:
        """The consumer group ``dead-letter replay --sink name`` commits to."""
        return self.replays[name]

    def resync(self, name: str) -> str:
        """The consumer group ``sink resync name`` commits its progress to."""
        return self.resyncs[name]


@dataclass(frozen=True)
class Names:
    """Topics and consumer groups together."""

    topics: TopicNames
    groups: GroupNames

    @classmethod
    def from_settings(cls, settings: Settings) -> Names:
        """Every name for ``settings``."""
        return cls(TopicNames.from_settings(settings), GroupNames.from_settings(settings))
