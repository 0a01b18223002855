"""Version 1 of the published records, frozen: their exported schemas stay as they were.

audience-relay 0.1 published these; ``schemas.records`` holds the current versions. Nothing here may
change (a test compares the exported files), so a consumer pinned to v1 keeps validating v1 records.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EventKind = Literal["enter", "exit", "change"]
TimeSource = Literal["segment_event", "meta", "cloudevent", "collected", "received"]


def content_id(*parts: str) -> str:
    """A deterministic id over the given parts (hex, 128 bits)."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SegmentEvent(_Record):
    """One user's audience event, split out of a Lytics webhook body; keyed by ``identifier``."""

    schema_version: Literal[1] = 1
    event_id: str = Field(
        description="Content id: identifier + audience + event + event time. Equal for duplicates."
    )
    identifier: str = Field(description="Normalized matching identifier (emails trimmed and lower-cased).")
    match_field: str = Field(description="The field of Lytics' data the identifier came from.")
    audience_id: str = Field(description="Lytics audience (segment) id; empty for a field-change event.")
    audience_slug: str | None = None
    event: EventKind
    event_time: datetime
    event_time_source: TimeSource
    lytics_user_id: str | None = Field(None, description="Lytics' top-level record id (stable per user).")
    source: str = Field(description="Ingress source (Lytics job) the body came through.")
    request_id: str
    received_at: datetime
    fields: dict[str, Any] | None = Field(
        None, description="User fields of a field-change event (segment_events removed); null otherwise."
    )

    @staticmethod
    def make_id(identifier: str, audience_id: str, event: str, event_time: datetime) -> str:
        return content_id(identifier, audience_id, event, event_time.isoformat())


class MembershipState(_Record):
    """Current membership of one identifier in one audience (``<prefix>.membership``, compacted)."""

    schema_version: Literal[1] = 1
    identifier: str
    audience_id: str
    audience_slug: str | None = None
    member: bool
    entered_at: datetime | None = Field(None, description="Time of the newest enter event seen.")
    exited_at: datetime | None = Field(None, description="Time of the newest exit event seen.")
    updated_at: datetime = Field(description="Event time of the event that decided the current state.")
    event_id: str = Field(description="Id of the event that decided the current state.")


class MembershipChange(_Record):
    """A real flip of membership (``<prefix>.membership-changes``, keyed by identifier)."""

    schema_version: Literal[1] = 1
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
    source: str
    request_id: str

    @staticmethod
    def make_id(identifier: str, audience_id: str, change: str, event_id: str) -> str:
        return content_id("change", identifier, audience_id, change, event_id)


PUBLISHED: dict[str, type[BaseModel]] = {
    "segment-event.v1": SegmentEvent,
    "membership-state.v1": MembershipState,
    "membership-change.v1": MembershipChange,
}
