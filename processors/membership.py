"""Membership state transitions (pure functions, no I/O).

State is kept per (identifier, audience) as the ``MembershipState`` record itself (a JSON-friendly
dict, schemas/records.py), under the key ``identifier`` + ``\\x1f`` + ``audience_id``. A user in ten
thousand audiences is ten thousand small values, never one value over the broker's record limit.

Each state is a join-semilattice, which is what makes arrival order irrelevant:

- the deciding event is the *greatest* event by ``(event time, rank, event id)`` (exit outranks enter
  at the same instant, the content id breaks any remaining tie), and membership is its kind — so the
  rank of the stored decider is ``0`` when ``member`` else ``1``;
- ``entered_at`` / ``exited_at`` are the newest enter / exit times ever seen (max registers);
- each identifier in ``identifiers`` is a max register over ``(event time, value)``.

Max is commutative, associative and idempotent, so any permutation with any duplication of the same
events reaches the same state. An event that is not greater than the deciding one never changes
membership and never emits; it can only move the registers forward. A change is emitted exactly when
the deciding event's kind differs from the previous membership, with a change id that depends only
on the identifier, audience, change and causing event — so a replay re-emits the same id.

Times are compared as exact integer microseconds since the epoch and written back as RFC 3339 UTC
with a ``Z``, so a state survives any number of round trips through JSON unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.records import MembershipChange

State = dict[str, Any]
Event = dict[str, Any]

SEPARATOR = "\x1f"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def state_key(identifier: str, audience_id: str) -> bytes:
    """The table key (and ``<prefix>.membership`` record key) of one identifier in one audience."""
    return f"{identifier}{SEPARATOR}{audience_id}".encode()


def identifier_prefix(identifier: str) -> bytes:
    """The key prefix shared by every state of ``identifier``."""
    return f"{identifier}{SEPARATOR}".encode()


#: Conversions are memoized: a batch repeats the same few times (a backfill sends one enter time for
#: thousands of users), and parsing and formatting them is a good part of a membership batch's work.
_TO_US: dict[str, int] = {}
_FROM_US: dict[int, str] = {}
_MEMO_MAX = 8192


def to_us(value: datetime | str) -> int:
    """Exact microseconds since the epoch of an aware (or UTC-naive) datetime or RFC 3339 text."""
    if isinstance(value, str):
        us = _TO_US.get(value)
        if us is None:
            us = _datetime_us(datetime.fromisoformat(value))
            if len(_TO_US) >= _MEMO_MAX:
                _TO_US.clear()
            _TO_US[value] = us
        return us
    return _datetime_us(value)


def _datetime_us(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MICROSECOND


def from_us(us: int | None) -> str | None:
    """RFC 3339 UTC text (``…Z``) for microseconds since the epoch."""
    if us is None:
        return None
    text = _FROM_US.get(us)
    if text is None:
        text = (_EPOCH + us * _MICROSECOND).isoformat().replace("+00:00", "Z")
        if len(_FROM_US) >= _MEMO_MAX:
            _FROM_US.clear()
        _FROM_US[us] = text
    return text


def _opt_us(text: str | None) -> int | None:
    return None if text is None else to_us(text)


def decide(state: State | None, event: Event) -> tuple[State | None, dict[str, Any] | None]:
    """Apply one segment event (a ``SegmentEvent`` as a dict) to the state of its key.

    Returns the new state (``None`` when nothing changed, so nothing need be written) and the
    ``MembershipChange`` dict when membership flipped (else ``None``).
    """
    is_enter = event["event"] == "enter"
    rank = 0 if is_enter else 1
    t_us = to_us(event["event_time"])
    event_id = event["event_id"]
    ids: dict[str, str] = event.get("identifiers") or {}
    if state is None:
        when = from_us(t_us)
        new: State = {
            "schema_version": 2,
            "identifier": event["identifier"],
            "match_field": event["match_field"],
            "audience_id": event["audience_id"],
            "audience_slug": event.get("audience_slug"),
            "member": is_enter,
            "entered_at": when if is_enter else None,
            "exited_at": None if is_enter else when,
            "updated_at": when,
            "event_id": event_id,
            "identifiers": dict(ids),
            "identifiers_at": dict.fromkeys(ids, when),
        }
        # No state means "not a member": only an enter flips it.
        return new, (_change(new, event, t_us) if is_enter else None)

    current = (to_us(state["updated_at"]), 0 if state["member"] else 1, state["event_id"])
    incoming = (t_us, rank, event_id)
    if incoming == current and not ids:
        return None, None  # the same event again
    new = dict(state)
    register = "entered_at" if is_enter else "exited_at"
    seen = _opt_us(state[register])
    if seen is None or t_us > seen:
        new[register] = from_us(t_us)
    flipped = False
    if incoming > current:
        flipped = bool(state["member"]) != is_enter
        new["member"] = is_enter
        new["updated_at"] = from_us(t_us)
        new["event_id"] = event_id
        if event.get("audience_slug"):
            new["audience_slug"] = event["audience_slug"]
    if ids:
        _merge_identifiers(new, ids, t_us)
    if new == state:
        return None, None
    return new, (_change(new, event, t_us) if flipped else None)


def _merge_identifiers(state: State, ids: dict[str, str], t_us: int) -> None:
    """Per field, keep the value of the newest event (ties: the greater value)."""
    values: dict[str, str] = dict(state.get("identifiers") or {})
    times: dict[str, str] = dict(state.get("identifiers_at") or {})
    changed = False
    for field, value in ids.items():
        old_at = times.get(field)
        if old_at is None or (t_us, value) > (to_us(old_at), values.get(field, "")):
            values[field] = value
            times[field] = from_us(t_us)  # type: ignore[assignment]
            changed = True
    if changed:
        state["identifiers"] = values
        state["identifiers_at"] = times


def _change(state: State, event: Event, t_us: int) -> dict[str, Any]:
    member = bool(state["member"])
    change = "entered" if member else "exited"
    seconds = None
    if not member and state["entered_at"] is not None:
        entered_us = to_us(state["entered_at"])
        if entered_us <= t_us:
            seconds = (t_us - entered_us) / 1_000_000
    identifier, audience_id = state["identifier"], state["audience_id"]
    return {
        "schema_version": 2,
        "change_id": MembershipChange.make_id(identifier, audience_id, change, event["event_id"]),
        "identifier": identifier,
        "match_field": state["match_field"],
        "audience_id": audience_id,
        "audience_slug": state["audience_slug"],
        "change": change,
        "member": member,
        "event_time": state["updated_at"],
        "entered_at": state["entered_at"],
        "exited_at": state["exited_at"],
        "seconds_in_audience": seconds,
        "event_id": event["event_id"],
        "lytics_user_id": event.get("lytics_user_id"),
        "identifiers": dict(state.get("identifiers") or {}),
        "source": event["source"],
        "request_id": event["request_id"],
    }


def fold(
    events: list[Event], states: dict[bytes, State] | None = None
) -> tuple[dict[bytes, State], list[dict[str, Any]]]:
    """Apply ``events`` in order; the final state per key and every change emitted (tests, tools)."""
    out: dict[bytes, State] = dict(states or {})
    changes: list[dict[str, Any]] = []
    for event in events:
        key = state_key(event["identifier"], event["audience_id"])
        new, change = decide(out.get(key), event)
        if new is not None:
            out[key] = new
        if change is not None:
            changes.append(change)
    return out, changes
