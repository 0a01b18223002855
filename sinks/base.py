"""The one small interface every destination implements, and the results it may return.

A destination only turns a batch of membership changes into one delivery attempt and says how it
went. Batching, concurrency, retries, backoff, pausing and dead-lettering live in ``sinks.engine``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

Change = dict[str, Any]


@dataclass(frozen=True)
class Delivered:
    """The destination accepted the whole batch."""


@dataclass(frozen=True)
class RetryAfter:
    """Try the same batch again later; ``seconds`` when the destination said when (Retry-After)."""

    reason: str
    seconds: float | None = None


@dataclass(frozen=True)
class GiveUp:
    """Retrying cannot help (e.g. 400): the batch goes to the dead-letter topic with this reason."""

    reason: str
    status: int | None = None
    #: The answer's text as read (bounded, not yet scrubbed nor cut: ``sinks.scrub.excerpt`` does both).
    response_text: str = ""


Result = Delivered | RetryAfter | GiveUp


class Destination(Protocol):
    """Where membership changes go. ``write`` is called with one batch at a time per partition."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def write(self, batch: list[Change]) -> Result: ...


def idempotency_key(batch: list[Change]) -> str:
    """Derived from the batch's change ids only, so a redelivery carries the same key."""
    digest = hashlib.blake2b(digest_size=16)
    for change in batch:
        digest.update(change["change_id"].encode())
        digest.update(b"\x1f")
    return digest.hexdigest()


def lytics_record(change: Change, identifier_field: str) -> dict[str, Any]:
    """A change in the Lytics default webhook format, the identifier under ``identifier_field``."""
    event = "enter" if change["change"] == "entered" else "exit"
    segment_event: dict[str, Any] = {"id": change["audience_id"], "event": event, event: change["event_time"]}
    if change.get("audience_slug"):
        segment_event["slug"] = change["audience_slug"]
    record: dict[str, Any] = {
        "data": {identifier_field: change["identifier"], "segment_events": [segment_event]},
        "meta": {"object": "user", "timestamp": change["event_time"]},
    }
    if change.get("lytics_user_id"):
        record["id"] = change["lytics_user_id"]
    return record
