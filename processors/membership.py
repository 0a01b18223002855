"""Membership state transitions (pure functions, no I/O).

State is kept per identifier as one JSON-friendly value::

    {"a": {audience_id: [member, t_us, rank, event_id, enter_us, exit_us, slug]},
     "f": {user fields from the newest field-change event} | null,
     "fk": [t_us, event_id] | null}

Each audience entry is a join-semilattice, which is what makes arrival order irrelevant:

- the deciding event is the *greatest* event by ``(event time, rank, event id)`` (exit outranks enter
  at the same instant, the content id breaks any remaining tie), and membership is its kind;
- ``enter_us`` / ``exit_us`` are the newest enter / exit times ever seen (max registers).

Max is commutative, associative and idempotent, so any permutation with any duplication of the same
events reaches the same state. An event that is not greater than the deciding one never changes
membership and never emits; it can only move ``enter_us``/``exit_us`` forward. A change is emitted
exactly when the deciding event's kind differs from the previous membership, with a change id that
depends only on the identifier, audience, change and causing event — so a replay re-emits the same id.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.records import MembershipChange

MEMBER, T_US, RANK, EVENT_ID, ENTER_US, EXIT_US, SLUG = range(7)
_RANK = {"enter": 0, "exit": 1}

Value = dict[str, Any]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_us(value: datetime | str) -> int:
    """Microseconds since the epoch (UTC), exactly: integer arithmetic (a float loses microseconds
    and overflows far from the epoch; this never raises for any datetime)."""
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    return ((dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


def from_us(us: int | None) -> str | None:
    """RFC 3339 UTC text for microseconds since the epoch."""
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat().replace("+00:00", "Z")


def apply_event(value: Value | None, event: dict[str, Any]) -> tuple[Value | None, list[dict[str, Any]]]:
    """Apply one segment event (a ``SegmentEvent`` as a dict) to an identifier's state.

    Returns the new value (``None`` when nothing changed, so nothing need be written) and the
    records to emit: for a flip, one ``MembershipChange`` and one ``MembershipState`` dict.
    """
    kind = event["event"]
    t_us = to_us(event["event_time"])
    event_id = event["event_id"]
    if kind == "change":
        return _apply_fields(value, event, t_us, event_id), []
    audiences: dict[str, list[Any]] = (value or {}).get("a") or {}
    audience_id = event["audience_id"]
    current = audiences.get(audience_id)
    rank = _RANK[kind]
    is_enter = kind == "enter"
    if current is None:
        entry = [
            int(is_enter),
            t_us,
            rank,
            event_id,
            t_us if is_enter else None,
            t_us if not is_enter else None,
            event.get("audience_slug"),
        ]
        flipped = is_enter  # no state means "not a member"
    else:
        if (t_us, rank, event_id) == (current[T_US], current[RANK], current[EVENT_ID]):
            return None, []  # the same event again
        entry = list(current)
        if is_enter:
            entry[ENTER_US] = t_us if entry[ENTER_US] is None else max(entry[ENTER_US], t_us)
        else:
            entry[EXIT_US] = t_us if entry[EXIT_US] is None else max(entry[EXIT_US], t_us)
        newer = (t_us, rank, event_id) > (current[T_US], current[RANK], current[EVENT_ID])
        flipped = False
        if newer:
            flipped = bool(current[MEMBER]) != is_enter
            entry[MEMBER], entry[T_US], entry[RANK], entry[EVENT_ID] = int(is_enter), t_us, rank, event_id
            if event.get("audience_slug"):
                entry[SLUG] = event["audience_slug"]
        if entry == current:
            return None, []
    new_value: Value = dict(value or {})
    new_value["a"] = {**audiences, audience_id: entry}
    return new_value, (_outputs(entry, event) if flipped else [])


def _apply_fields(value: Value | None, event: dict[str, Any], t_us: int, event_id: str) -> Value | None:
    current = (value or {}).get("fk")
    if current is not None and (t_us, event_id) <= (current[0], current[1]):
        return None
    new_value: Value = dict(value or {})
    new_value["f"] = event.get("fields") or {}
    new_value["fk"] = [t_us, event_id]
    new_value.setdefault("a", {})
    return new_value


def _outputs(entry: list[Any], event: dict[str, Any]) -> list[dict[str, Any]]:
    member = bool(entry[MEMBER])
    change = "entered" if member else "exited"
    identifier, audience_id = event["identifier"], event["audience_id"]
    seconds = None
    if not member and entry[ENTER_US] is not None and entry[ENTER_US] <= entry[T_US]:
        seconds = (entry[T_US] - entry[ENTER_US]) / 1_000_000
    change_record = {
        "schema_version": 1,
        "change_id": MembershipChange.make_id(identifier, audience_id, change, event["event_id"]),
        "identifier": identifier,
        "match_field": event["match_field"],
        "audience_id": audience_id,
        "audience_slug": entry[SLUG],
        "change": change,
        "member": member,
        "event_time": from_us(entry[T_US]),
        "entered_at": from_us(entry[ENTER_US]),
        "exited_at": from_us(entry[EXIT_US]),
        "seconds_in_audience": seconds,
        "event_id": event["event_id"],
        "lytics_user_id": event.get("lytics_user_id"),
        "source": event["source"],
        "request_id": event["request_id"],
    }
    return [change_record, state_record(identifier, audience_id, entry)]


def state_record(identifier: str, audience_id: str, entry: list[Any]) -> dict[str, Any]:
    """The ``MembershipState`` dict of one audience entry."""
    return {
        "schema_version": 1,
        "identifier": identifier,
        "audience_id": audience_id,
        "audience_slug": entry[SLUG],
        "member": bool(entry[MEMBER]),
        "entered_at": from_us(entry[ENTER_US]),
        "exited_at": from_us(entry[EXIT_US]),
        "updated_at": from_us(entry[T_US]),
        "event_id": entry[EVENT_ID],
    }


def fold(
    events: list[dict[str, Any]], value: Value | None = None
) -> tuple[Value | None, list[dict[str, Any]]]:
    """Apply ``events`` in order; the final value and every emitted record (for tests and tools)."""
    emitted: list[dict[str, Any]] = []
    for event in events:
        new_value, out = apply_event(value, event)
        if new_value is not None:
            value = new_value
        emitted.extend(out)
    return value, emitted
