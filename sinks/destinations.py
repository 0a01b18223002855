"""The three destinations: Pushly and ODP over HTTP, analytics as CloudEvents on a Kafka topic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from audience_relay import kafka
from audience_relay.exits import ExitCode, Fatal
from audience_relay.names import SINKS
from audience_relay.outbox import BatchProducer, Outbox, OutputError
from audience_relay.partitioner import identifier_partition
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from sinks.base import Delivered, Destination, Item, Result, RetryAfter, lytics_record
from sinks.http import HttpDestination
from sinks.policy import Policy, policy_for

MEMBERSHIP_TYPE = "com.audience-relay.membership.{change}"
FIELDS_TYPE = "com.audience-relay.fields.changed"


@dataclass(frozen=True)
class SinkSpec:
    """A destination with everything the engine needs to run it."""

    destination: Destination
    policy: Policy
    batch_size: int
    flush_seconds: float
    concurrency: int
    #: The topics it consumes (analytics also takes field changes).
    topics: tuple[str, ...]


def pushly(settings: Settings, policy: Policy) -> Destination:
    """Pushly: the Lytics default format with ``X-API-KEY`` (one user per request unless batched)."""
    if not settings.pushly_webhook_url or settings.pushly_api_key is None:
        raise Fatal("the pushly sink needs PUSHLY_WEBHOOK_URL and PUSHLY_API_KEY", ExitCode.CONFIG)

    def body(items: list[Item]) -> Any:
        records = [lytics_record(i, policy.field) for i in items]
        return records[0] if settings.pushly_batch_size == 1 and len(records) == 1 else records

    return HttpDestination(
        "pushly",
        settings.pushly_webhook_url,
        {"X-API-KEY": settings.pushly_api_key.get_secret_value()},
        body,
        settings.sink_do_not_retry,
        settings.sink_timeout_seconds,
    )


def odp(settings: Settings, policy: Policy) -> Destination:
    """ODP: arrays in the Lytics default format, the identifier under ``ODP_IDENTIFIER_FIELD``."""
    if not settings.odp_webhook_url or settings.odp_auth_token is None:
        raise Fatal("the odp sink needs ODP_WEBHOOK_URL and ODP_AUTH_TOKEN", ExitCode.CONFIG)
    return HttpDestination(
        "odp",
        settings.odp_webhook_url,
        {settings.odp_auth_header: settings.odp_auth_token.get_secret_value()},
        lambda items: [lytics_record(i, policy.field) for i in items],
        settings.sink_do_not_retry,
        settings.sink_timeout_seconds,
    )


def _subject(identifier: str | list[str]) -> str:
    return identifier[0] if isinstance(identifier, list) else identifier


def cloudevent(item: Item, source: str, policy: Policy) -> dict[str, Any]:
    """One change (membership or fields) as a CloudEvents 1.0 JSON event (schemas/records.py)."""
    change = item.change
    data: dict[str, Any] = {
        "identifier": item.identifier,
        "identifier_field": policy.source,
        "identifier_hash": "sha256" if policy.hash == "sha256" else None,
        "match_field": change["match_field"],
        "lytics_user_id": change.get("lytics_user_id"),
    }
    if item.field_change:
        kind = FIELDS_TYPE
        data.update(fields=change.get("fields") or {}, event_id=change["event_id"])
    else:
        kind = MEMBERSHIP_TYPE.format(change=change["change"])
        data.update(
            audience_id=change["audience_id"],
            audience_slug=change.get("audience_slug"),
            member=change["member"],
            entered_at=change.get("entered_at"),
            exited_at=change.get("exited_at"),
            seconds_in_audience=change.get("seconds_in_audience"),
        )
    return {
        "specversion": "1.0",
        "id": change["change_id"],
        "source": source,
        "type": kind,
        "subject": _subject(item.identifier),
        "time": change["event_time"],
        "datacontenttype": "application/json",
        "data": data,
    }


class AnalyticsTopic:
    """CloudEvents JSON, one record per change, keyed by the identifier sent, on ``RELAY_ANALYTICS_TOPIC``."""

    name = "analytics"

    def __init__(self, settings: Settings, policy: Policy) -> None:
        self._settings = settings
        self._policy = policy
        self.topic = TopicNames.from_settings(settings).analytics
        self._source = f"/audience-relay/{settings.topic_prefix}"
        self._producer: AIOKafkaProducer | None = None
        self._batches: BatchProducer | None = None

    async def start(self) -> None:
        self._producer = kafka.producer(
            self._settings, linger_ms=5, client_id="audience-relay-sink-analytics"
        )
        await self._producer.start()
        self._batches = BatchProducer(self._producer)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def write(self, items: list[Item], key: str) -> Result:
        """Produce every event and wait for the broker's acknowledgement of each."""
        assert self._producer is not None and self._batches is not None, "start() first"
        try:
            # Kafka's default partitioning of the key (the analytics topic may keep a partition
            # count of its own), computed here to produce per-partition batches (outbox.py).
            partitions = len(await self._producer.partitions_for(self.topic))
            out = Outbox(self._batches)
            for i in items:
                subject = _subject(i.identifier)
                out.add(
                    self.topic,
                    identifier_partition(subject, partitions),
                    subject.encode(),
                    orjson.dumps(cloudevent(i, self._source, self._policy)),
                    [
                        ("ce_id", i.change["change_id"].encode()),
                        ("content-type", b"application/cloudevents+json"),
                    ],
                )
            await out.flush()
        except (KafkaError, OutputError) as exc:
            return RetryAfter(f"kafka did not acknowledge: {type(exc).__name__}")
        return Delivered()


def build(name: str, settings: Settings) -> SinkSpec:
    """The destination ``name`` with its policy, batch size, flush interval (s), concurrency, topics."""
    policy = policy_for(name, settings)
    topics = TopicNames.from_settings(settings)
    if name == "pushly":
        return SinkSpec(
            pushly(settings, policy),
            policy,
            settings.pushly_batch_size,
            settings.pushly_flush_seconds,
            settings.pushly_concurrency,
            (topics.membership_changes,),
        )
    if name == "odp":
        return SinkSpec(
            odp(settings, policy),
            policy,
            settings.odp_batch_size,
            settings.odp_flush_seconds,
            settings.odp_concurrency,
            (topics.membership_changes,),
        )
    if name == "analytics":
        return SinkSpec(
            AnalyticsTopic(settings, policy),
            policy,
            settings.analytics_batch_size,
            settings.analytics_flush_seconds,
            settings.analytics_concurrency,
            (topics.membership_changes, topics.field_changes),
        )
    raise Fatal(f"unknown sink {name!r}: one of {', '.join(SINKS)}", ExitCode.USAGE)
