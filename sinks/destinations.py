"""The three destinations: Pushly and ODP over HTTP, analytics as CloudEvents on a Kafka topic."""

from __future__ import annotations

from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from audience_relay import kafka
from audience_relay.exits import ExitCode, Fatal
from audience_relay.names import SINKS
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from sinks.base import Change, Delivered, Destination, Result, RetryAfter, lytics_record
from sinks.http import HttpDestination


def pushly(settings: Settings) -> Destination:
    """Pushly: the Lytics default format with ``X-API-KEY`` (one user per request unless batched)."""
    if not settings.pushly_webhook_url or settings.pushly_api_key is None:
        raise Fatal("the pushly sink needs PUSHLY_WEBHOOK_URL and PUSHLY_API_KEY", ExitCode.CONFIG)
    field = settings.match_field

    def body(batch: list[Change]) -> Any:
        records = [lytics_record(c, field) for c in batch]
        return records[0] if settings.pushly_batch_size == 1 and len(records) == 1 else records

    return HttpDestination(
        "pushly",
        settings.pushly_webhook_url,
        {"X-API-KEY": settings.pushly_api_key.get_secret_value()},
        body,
        settings.sink_do_not_retry,
        settings.sink_timeout_seconds,
    )


def odp(settings: Settings) -> Destination:
    """ODP: arrays in the Lytics default format, identifier under ``ODP_IDENTIFIER_FIELD``."""
    if not settings.odp_webhook_url or settings.odp_auth_token is None:
        raise Fatal("the odp sink needs ODP_WEBHOOK_URL and ODP_AUTH_TOKEN", ExitCode.CONFIG)
    field = settings.odp_identifier_field
    return HttpDestination(
        "odp",
        settings.odp_webhook_url,
        {settings.odp_auth_header: settings.odp_auth_token.get_secret_value()},
        lambda batch: [lytics_record(c, field) for c in batch],
        settings.sink_do_not_retry,
        settings.sink_timeout_seconds,
    )


def cloudevent(change: Change, source: str) -> dict[str, Any]:
    """One membership change as a CloudEvents 1.0 JSON event."""
    return {
        "specversion": "1.0",
        "id": change["change_id"],
        "source": source,
        "type": f"com.audience-relay.membership.{change['change']}",
        "subject": change["identifier"],
        "time": change["event_time"],
        "datacontenttype": "application/json",
        "data": {
            "identifier": change["identifier"],
            "match_field": change["match_field"],
            "audience_id": change["audience_id"],
            "audience_slug": change.get("audience_slug"),
            "member": change["member"],
            "entered_at": change.get("entered_at"),
            "exited_at": change.get("exited_at"),
            "seconds_in_audience": change.get("seconds_in_audience"),
            "lytics_user_id": change.get("lytics_user_id"),
        },
    }


class AnalyticsTopic:
    """CloudEvents JSON, one record per change, keyed by identifier, on ``RELAY_ANALYTICS_TOPIC``."""

    name = "analytics"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.topic = TopicNames.from_settings(settings).analytics
        self._source = f"/audience-relay/{settings.topic_prefix}"
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = kafka.producer(
            self._settings, linger_ms=5, client_id="audience-relay-sink-analytics"
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def write(self, batch: list[Change]) -> Result:
        assert self._producer is not None, "start() first"
        try:
            futures = [
                await self._producer.send(
                    self.topic,
                    key=c["identifier"].encode(),
                    value=orjson.dumps(cloudevent(c, self._source)),
                    headers=[
                        ("ce_id", c["change_id"].encode()),
                        ("content-type", b"application/cloudevents+json"),
                    ],
                )
                for c in batch
            ]
            for future in futures:
                await future
        except KafkaError as exc:
            return RetryAfter(f"kafka did not acknowledge: {type(exc).__name__}")
        return Delivered()


def build(name: str, settings: Settings) -> tuple[Destination, int, float, int]:
    """The destination ``name`` with its batch size, flush interval (s) and concurrency."""
    if name == "pushly":
        return (
            pushly(settings),
            settings.pushly_batch_size,
            settings.pushly_flush_seconds,
            settings.pushly_concurrency,
        )
    if name == "odp":
        return odp(settings), settings.odp_batch_size, settings.odp_flush_seconds, settings.odp_concurrency
    if name == "analytics":
        return AnalyticsTopic(settings), 500, 0.2, 8
    raise Fatal(f"unknown sink {name!r}: one of {', '.join(SINKS)}", ExitCode.USAGE)
