"""The one small interface every destination implements, and the results it may return.

A destination only turns a batch of changes into one delivery attempt and says how it went.
Batching, concurrency and commits live in ``sinks.engine``; retries, backoff, splitting refused
batches, dead-lettering and the delivery log in ``sinks.deliver``; the per-destination choices
(identifier, audiences) in ``sinks.policy``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

Change = dict[str, Any]


@dataclass(frozen=True)
class Delivered:
    """The destination accepted the whole batch (``status``: its HTTP answer, if any)."""

    status: int | None = None


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


@dataclass(frozen=True)
class Item:
    """One change as a destination gets it: the record and the identifier value chosen for it."""

    change: Change
    #: The value the destination's policy picked (possibly hashed); see ``sinks.policy``.
    identifier: str | list[str]
    field_change: bool = False


class Destination(Protocol):
    """Where membership changes go. ``write`` makes one attempt at delivering ``items`` together."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def write(self, items: list[Item], key: str) -> Result:
        """One delivery attempt of ``items`` under the idempotency key ``key``."""
        ...


def idempotency_key(changes: list[Change], namespace: str = "") -> str:
    """Derived from the changes' ids only, so a redelivery of the same batch carries the same key.

    ``namespace`` separates keys of another kind of sending (a resync) from the stream's.
    """
    digest = hashlib.blake2b(digest_size=16)
    if namespace:
        digest.update(namespace.encode() + b"\x1e")
    for change in changes:
        digest.update(change["change_id"].encode())
        digest.update(b"\x1f")
    return digest.hexdigest()


def lytics_record(item: Item, identifier_field: str) -> dict[str, Any]:
    """A change in the Lytics default webhook format, its identifier under ``identifier_field``."""
    change = item.change
    event = "enter" if change["change"] == "entered" else "exit"
    segment_event: dict[str, Any] = {"id": change["audience_id"], "event": event, event: change["event_time"]}
    if change.get("audience_slug"):
        segment_event["slug"] = change["audience_slug"]
    record: dict[str, Any] = {
        "data": {identifier_field: item.identifier, "segment_events": [segment_event]},
        "meta": {"object": "user", "timestamp": change["event_time"]},
    }
    if change.get("lytics_user_id"):
        record["id"] = change["lytics_user_id"]
    return record
