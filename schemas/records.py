"""What audience-relay publishes: the contract with downstream teams.

Every record carries ``schema_version``; a breaking change gets a new version and a new exported
file, never an edit of an old one (version 1 lives on, frozen, in ``schemas.v1``).
``audience-relay schemas export DIR`` writes the JSON Schemas; the committed copies live in
``schemas/json/`` and a test fails when they drift from these models.

Compatible changes (same version): a new *optional* field in an input model, a wider description,
a new value in an open set documented as open. Breaking (new version): any field added to, removed
from or retyped in a published record (the schemas forbid unknown fields, so validating consumers
would reject it), a new value of a closed enum, a changed key or partitioning of a topic.

Version 2 (this module) differs from version 1 by:

- ``SegmentEvent``: ``identifiers`` (the other identifiers the Lytics record exported); ``event`` is
  enter/exit only (field changes are ``FieldChange`` records on their own topic); records on
  ``<prefix>.segment-events`` are ``SegmentEvents`` groups, one per raw body and partition.
- ``MembershipState`` / ``MembershipChange``: ``identifiers`` (and ``identifiers_at`` on the state),
  ``match_field`` on the state. ``<prefix>.membership`` is partitioned by the identifier (as
  ``membership-changes``), so one user's states share a partition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.v1 import content_id

__all__ = [
    "PUBLISHED",
    "AnalyticsFieldsEvent",
    "AnalyticsMembershipEvent",
    "DeliveryOutcome",
    "FieldChange",
    "MembershipChange",
    "MembershipState",
    "SegmentEvent",
    "SegmentEvents",
    "content_id",
]

Identifiers = dict[str, str]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SegmentEvent(_Record):
    """One user's audience event (enter or exit), split out of a Lytics webhook body."""

    schema_version: Literal[2] = 2
    event_id: str = Field(
        description="Content id: identifier + audience + event + event time. Equal for duplicates."
    )
    identifier: str = Field(description="Normalized matching identifier (emails trimmed and lower-cased).")
    match_field: str = Field(description="The field of Lytics' data the identifier came from.")
    audience_id: str = Field(description="Lytics audience (segment) id.")
    audience_slug: str | None = None
    event: Literal["enter", "exit"]
    event_time: datetime
    event_time_source: Literal["segment_event", "meta", "cloudevent", "collected", "received"]
    lytics_user_id: str | None = Field(None, description="The top-level 'id' of the Lytics record.")
    identifiers: Identifiers = Field(
        default_factory=dict,
        description="Other identifiers the record exported (RELAY_IDENTIFIER_FIELDS and the fields "
        "destinations send), by field name, normalized; e.g. {'_id': <Lytics ID>}.",
    )
    source: str = Field(description="Ingress source (Lytics job) the body came through.")
    request_id: str
    received_at: datetime

    @staticmethod
    def make_id(identifier: str, audience_id: str, event: str, event_time: datetime) -> str:
        return content_id(identifier, audience_id, event, event_time.isoformat())


class SegmentEvents(_Record):
    """One record of ``<prefix>.segment-events``, the processors' own repartition topic.

    The segment events of one raw webhook body whose identifiers hash to this partition
    (``murmur2(identifier) % partitions``, Kafka's default partitioner), in body order. The record
    key is null; headers ``raw-topic``, ``raw-partition``, ``raw-offset`` and ``request-id`` name
    the body. Records of one partition are in raw-offset order, so one identifier's events keep
    their order.
    """

    schema_version: Literal[2] = 2
    events: list[SegmentEvent] = Field(min_length=1)


class FieldChange(_Record):
    """A user-field change event (``<prefix>.field-changes``, keyed by identifier).

    Lytics sends these for audiences defined on field changes (``"event": "change"``). They are
    passed on as they come (no state: a repeat has the same ``change_id``); ``fields`` holds the
    record's exported user fields (``segment_events`` removed).
    """

    schema_version: Literal[1] = 1
    change_id: str = Field(description="Deterministic: identifier + causing event. Drop repeats.")
    event_id: str
    identifier: str
    match_field: str
    identifiers: Identifiers = Field(default_factory=dict)
    trigger_id: str = Field(description="Id of the segment event that carried the change.")
    trigger_slug: str | None = None
    fields: dict[str, Any]
    event_time: datetime
    event_time_source: Literal["meta", "cloudevent", "collected", "received"]
    lytics_user_id: str | None = None
    source: str
    request_id: str

    @staticmethod
    def make_id(identifier: str, event_id: str) -> str:
        return content_id("fields", identifier, event_id)


class MembershipState(_Record):
    """Current membership of one identifier in one audience (``<prefix>.membership``, compacted).

    Key ``identifier`` + ``\\x1f`` + ``audience_id``; partition ``murmur2(identifier) % partitions``.
    The topic is also the membership table's changelog: it gets a record whenever the state changes
    (a flip, or e.g. a newer enter of a member moving ``entered_at``), so the last record per key is
    always the current state. A tombstone (null value) may follow a partition-count change.
    """

    schema_version: Literal[2] = 2
    identifier: str
    match_field: str
    audience_id: str
    audience_slug: str | None = None
    member: bool
    entered_at: datetime | None = Field(None, description="Time of the newest enter event seen.")
    exited_at: datetime | None = Field(None, description="Time of the newest exit event seen.")
    updated_at: datetime = Field(description="Event time of the event that decided the current state.")
    event_id: str = Field(description="Id of the event that decided the current state.")
    identifiers: Identifiers = Field(
        default_factory=dict, description="Other identifiers of the user; per field the newest value seen."
    )
    identifiers_at: dict[str, datetime] = Field(
        default_factory=dict, description="Per identifier field, the event time its value came from."
    )


class MembershipChange(_Record):
    """A real flip of membership (``<prefix>.membership-changes``, keyed by identifier)."""

    schema_version: Literal[2] = 2
    change_id: str = Field(
        description="Deterministic: identifier + audience + change + causing event. Drop repeats."
    )
    identifier: str
    match_field: str
    audience_id: str
    audience_slug: str | None = None
    change: Literal["entered", "exited"]
    member: bool
    event_time: datetime
    entered_at: datetime | None = None
    exited_at: datetime | None = None
    seconds_in_audience: float | None = Field(
        None, description="On exit: exit time minus the newest enter time."
    )
    event_id: str
    lytics_user_id: str | None = None
    identifiers: Identifiers = Field(
        default_factory=dict, description="Other identifiers of the user (as on the state)."
    )
    source: str
    request_id: str

    @staticmethod
    def make_id(identifier: str, audience_id: str, change: str, event_id: str) -> str:
        return content_id("change", identifier, audience_id, change, event_id)


DeliveryOutcomeKind = Literal["delivered", "dead_lettered", "filtered", "unknown_identifier", "superseded"]


class DeliveryOutcome(_Record):
    """What a sink did with one change for one destination (``<prefix>.deliveries``, compacted).

    One record per change and destination (not per batch), keyed ``identifier`` + ``\\x1f`` +
    ``audience_id`` + ``\\x1f`` + ``destination`` (UTF-8), so compaction keeps the last outcome of
    each user, audience and destination; partitioned by the identifier (``murmur2(identifier) %
    partitions``), like every identifier-keyed topic. ``audience_id`` is empty for a field-change
    event.
    """

    schema_version: Literal[1] = 1
    destination: str = Field(description="The sink: pushly, odp or analytics.")
    identifier: str = Field(description="The matching identifier (the key of state and topics).")
    audience_id: str = Field(description="Lytics audience id; empty for a field-change event.")
    audience_slug: str | None = None
    change_id: str
    change: Literal["entered", "exited", "fields_changed"]
    event_time: datetime | None = Field(None, description="When the change happened (its event time).")
    outcome: DeliveryOutcomeKind = Field(
        description=(
            "delivered: the destination accepted it; dead_lettered: it refused it (do-not-retry status), "
            "the change is in the dead-letter topic; filtered: the destination's audience lists exclude "
            "it, never sent; unknown_identifier: the change lacks the identifier the destination is "
            "configured to send, dead-lettered; superseded: a dead-letter replay skipped it because a "
            "newer change of the same identifier and audience exists."
        )
    )
    origin: Literal["stream", "replay", "resync"] = Field(
        description="stream: membership-changes; replay: a dead-letter replay; resync: a resync."
    )
    at: datetime = Field(description="When the outcome was decided.")
    status: int | None = Field(
        None, description="HTTP status of the answer that decided it; null without an HTTP answer."
    )
    attempts: int = Field(
        description="Requests that carried this change (retries and batch splits included); 0 if never sent."
    )
    idempotency_key: str | None = Field(None, description="Idempotency-Key of the deciding request.")
    reason: str | None = Field(None, description="Why it was not delivered (secrets scrubbed).")
    response_excerpt: str | None = Field(
        None, description="First 500 characters of a refusing answer (secrets scrubbed)."
    )

    @staticmethod
    def key(identifier: str, audience_id: str, destination: str) -> bytes:
        return f"{identifier}\x1f{audience_id}\x1f{destination}".encode()


class _IdentifierData(_Record):
    identifier: str | list[str] = Field(
        description=(
            "The identifier the analytics sink sends (ANALYTICS_IDENTIFIER_SOURCE, default the matching "
            "identifier); lower-case hex SHA-256 of the normalized value when identifier_hash is sha256."
        )
    )
    identifier_field: str = Field(description="The field the identifier came from.")
    identifier_hash: Literal["sha256"] | None = None
    match_field: str = Field(description="The field of the matching identifier that keys state.")
    lytics_user_id: str | None = None


class MembershipEventData(_IdentifierData):
    audience_id: str
    audience_slug: str | None = None
    member: bool
    entered_at: datetime | None = None
    exited_at: datetime | None = None
    seconds_in_audience: float | None = Field(
        None, description="On exit: exit time minus the newest enter time."
    )


class AnalyticsMembershipEvent(_Record):
    """A membership change on the analytics topic: CloudEvents 1.0 JSON, keyed by ``subject``."""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(description="The change id (deterministic: drop repeats by it).")
    source: str = Field(description="/audience-relay/<RELAY_TOPIC_PREFIX>")
    type: Literal["com.audience-relay.membership.entered", "com.audience-relay.membership.exited"]
    subject: str = Field(description="The identifier sent (data.identifier; the first one if several).")
    time: datetime = Field(description="The change's event time.")
    datacontenttype: Literal["application/json"] = "application/json"
    data: MembershipEventData


class FieldsChangedData(_IdentifierData):
    fields: dict[str, Any] = Field(description="The user fields the field-change event carried.")
    event_id: str


class AnalyticsFieldsEvent(_Record):
    """A field-change event on the analytics topic: CloudEvents 1.0 JSON, keyed by ``subject``."""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(description="The field change's change id.")
    source: str = Field(description="/audience-relay/<RELAY_TOPIC_PREFIX>")
    type: Literal["com.audience-relay.fields.changed"] = "com.audience-relay.fields.changed"
    subject: str
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    data: FieldsChangedData


def _published() -> dict[str, type[BaseModel]]:
    from schemas import v1

    return {
        **v1.PUBLISHED,
        "segment-event.v2": SegmentEvent,
        "segment-events.v2": SegmentEvents,
        "field-change.v1": FieldChange,
        "membership-state.v2": MembershipState,
        "membership-change.v2": MembershipChange,
        "delivery-outcome.v1": DeliveryOutcome,
        "analytics-membership-event.v1": AnalyticsMembershipEvent,
        "analytics-fields-event.v1": AnalyticsFieldsEvent,
    }


#: Exported schema name → model, every version still published.
PUBLISHED: dict[str, type[BaseModel]] = _published()
