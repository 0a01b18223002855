"""What Lytics sends: models of every Audience Trigger webhook format, single or batched.

Documentation of the input contract and the yardstick the tests hold the samples and the split
agent to. They are lenient on purpose — customers reshape bodies with templates — so unknown fields
are kept (``extra="allow"``) and only the fields the relay reads are typed. The split agent's hot path
reads the same fields from plain dicts (``processors/split.py``) to avoid building models per user.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class LyticsSegmentEvent(_Lenient):
    """One entry of ``segment_events``: the audience, what happened, and when."""

    id: str = Field(description="Audience (segment) id.")
    event: Literal["enter", "exit", "change"]
    slug: str | None = None
    enter: datetime | None = None
    exit: datetime | None = None


class LyticsMeta(_Lenient):
    object: str | None = None
    subscription_id: str | None = None
    timestamp: datetime | None = None


class LyticsUserData(_Lenient):
    """The user's exported fields; the matching identifier is one of them (``RELAY_MATCH_FIELD``)."""

    segment_events: list[LyticsSegmentEvent] | None = None


class LyticsDefaultEvent(_Lenient):
    """Default format: ``{id, data: {...fields, segment_events}, meta}``; field-change events too."""

    id: str | None = None
    data: LyticsUserData
    meta: LyticsMeta | None = None

    def is_field_change(self) -> bool:
        events = self.data.segment_events or []
        return bool(events) and all(e.event == "change" for e in events)


class LyticsLegacyData(LyticsUserData):
    audience: str | None = Field(None, alias="_audience")
    audience_action: Literal["entered", "exited"] | None = Field(None, alias="_audience_action")
    audience_friendly: str | None = Field(None, alias="_audience_friendly")


class LyticsLegacyEvent(_Lenient):
    """Legacy format: audience in ``data._audience*``, ``segment_events`` at the top, ``subscriptionid``."""

    id: str | None = None
    data: LyticsLegacyData
    collected: datetime | None = None
    segment_events: list[LyticsSegmentEvent] | None = None
    subscriptionid: str | None = None


class LyticsCloudEvent(_Lenient):
    """CloudEvents 1.0 structured format, ``data`` holding the user as in the default format."""

    specversion: Literal["1.0"]
    id: str
    source: str | None = None
    type: str | None = None
    time: datetime | None = None
    data: LyticsUserData


LyticsEvent = LyticsCloudEvent | LyticsLegacyEvent | LyticsDefaultEvent


class LyticsBody(RootModel[list[dict[str, Any]] | dict[str, Any]]):
    """A webhook body: one user event or a batch (JSON array) of them."""

    def records(self) -> list[dict[str, Any]]:
        return self.root if isinstance(self.root, list) else [self.root]


def classify(record: dict[str, Any]) -> type[LyticsCloudEvent | LyticsLegacyEvent | LyticsDefaultEvent]:
    """Which format a record is in, by its distinguishing fields."""
    if "specversion" in record:
        return LyticsCloudEvent
    data = record.get("data")
    if "subscriptionid" in record or (isinstance(data, dict) and "_audience" in data):
        return LyticsLegacyEvent
    return LyticsDefaultEvent
