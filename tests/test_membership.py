"""Membership semantics as properties: order and duplication never matter; only real flips emit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.membership import decide, fold, from_us, state_key, to_us
from schemas.records import MembershipChange, MembershipState, SegmentEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(
    ident: str, audience: str, kind: str, second: int, identifiers: dict[str, str] | None = None
) -> dict[str, Any]:
    when = T0 + timedelta(seconds=second)
    return {
        "schema_version": 2,
        "event_id": SegmentEvent.make_id(ident, audience, kind, when),
        "identifier": ident,
        "match_field": "email",
        "audience_id": audience,
        "audience_slug": f"slug-{audience}",
        "event": kind,
        "event_time": when,
        "event_time_source": "segment_event",
        "lytics_user_id": None,
        "identifiers": identifiers or {},
        "source": "default",
        "request_id": "r",
        "received_at": T0,
    }


def test_enter_then_exit_emits_two_flips_with_time_in_audience() -> None:
    states, changes = fold([event("u", "a", "enter", 10), event("u", "a", "exit", 70)])
    entered, exited = changes
    assert (entered["change"], exited["change"]) == ("entered", "exited")
    assert exited["seconds_in_audience"] == 60.0
    for change in changes:
        MembershipChange.model_validate(change)
    state = states[state_key("u", "a")]
    MembershipState.model_validate(state)
    assert state["member"] is False and state["exited_at"] == "2026-01-01T00:01:10Z"


def test_duplicates_stale_events_and_backfills_emit_nothing() -> None:
    states, changes = fold([event("u", "a", "enter", 10)])
    assert len(changes) == 1
    state = states[state_key("u", "a")]
    # The same event again (a Lytics retry) changes nothing at all.
    assert decide(state, event("u", "a", "enter", 10)) == (None, None)
    # A backfill "entered" for a member: no flip (the state's enter time moves on).
    newer, change = decide(state, event("u", "a", "enter", 500))
    assert change is None and newer is not None and newer["entered_at"] == "2026-01-01T00:08:20Z"
    # An older exit: membership stays, nothing emitted.
    _, change = decide(newer, event("u", "a", "exit", 5))
    assert change is None
    # An exit for someone we never saw enter is not a change either.
    assert fold([event("v", "a", "exit", 10)])[1] == []


def test_each_audience_is_its_own_small_state() -> None:
    """A user in many audiences is many small values: none grows with the audience count."""
    states, changes = fold([event("u", f"aud-{i}", "enter", i) for i in range(2_000)])
    assert len(states) == len(changes) == 2_000
    assert max(len(orjson.dumps(v)) for v in states.values()) < 1_024


def test_identifiers_keep_the_newest_value_per_field() -> None:
    older = event("u", "a", "enter", 10, {"_id": "old", "user_id": "u-1"})
    newer = event("u", "a", "exit", 20, {"_id": "new"})
    for order in ([older, newer], [newer, older]):
        states, changes = fold(order)
        state = states[state_key("u", "a")]
        assert state["identifiers"] == {"_id": "new", "user_id": "u-1"}
        assert state["identifiers_at"]["_id"] == from_us(to_us(T0 + timedelta(seconds=20)))
    # The change carries the identifiers known when it was emitted.
    _, changes = fold([older])
    assert changes[0]["identifiers"] == {"_id": "old", "user_id": "u-1"}


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)))
def test_times_round_trip_exactly(when: datetime) -> None:
    assert to_us(from_us(to_us(when)) or "") == to_us(when)


events_strategy = st.lists(
    st.builds(
        event,
        ident=st.sampled_from(["u1", "u2"]),
        audience=st.sampled_from(["a", "b"]),
        kind=st.sampled_from(["enter", "exit"]),
        second=st.integers(min_value=0, max_value=20),
        identifiers=st.one_of(
            st.none(), st.dictionaries(st.sampled_from(["_id", "user_id"]), st.sampled_from(["x", "y"]))
        ),
    ),
    min_size=1,
    max_size=25,
)


def _by_identifier(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        out.setdefault(e["identifier"], []).append(e)
    return out


def _run(events: list[dict[str, Any]]) -> tuple[dict[bytes, Any], list[dict[str, Any]]]:
    states: dict[bytes, Any] = {}
    emitted: list[dict[str, Any]] = []
    for evs in _by_identifier(events).values():
        out_states, out = fold(evs)
        states.update(out_states)
        emitted.extend(out)
    return states, emitted


def _ordered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e["event_time"], 1 if e["event"] == "exit" else 0, e["event_id"]))


@settings(max_examples=400)
@given(events=events_strategy, data=st.data())
def test_any_permutation_with_duplicates_gives_the_same_final_state(
    events: list[dict[str, Any]], data: Any
) -> None:
    ordered_states, ordered_changes = _run(_ordered(events))
    shuffled = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events), max_size=10))))
    states, changes = _run(shuffled)
    assert states == ordered_states

    # Receivers converge: per (identifier, audience) the last change says the same as in order
    # (no change at all means "not a member", as for a receiver that never heard of the user)...
    def last(chs: list[dict[str, Any]]) -> dict[tuple[str, str], bool]:
        out = {(c["identifier"], c["audience_id"]): c["member"] for c in chs}
        return {k: v for k, v in out.items() if v}

    assert last(changes) == last(ordered_changes)
    # ...every change is a real flip of what was emitted before (never two "entered" in a row)...
    seen: dict[tuple[str, str], bool] = {}
    for c in changes:
        key = (c["identifier"], c["audience_id"])
        assert seen.get(key, False) != c["member"]
        seen[key] = c["member"]
    # ...and never moves backwards (in event time, then exit over enter, then event id).
    order: dict[tuple[str, str], tuple[str, int, str]] = {}
    for c in changes:
        key = (c["identifier"], c["audience_id"])
        rank = (c["event_time"], 0 if c["member"] else 1, c["event_id"])
        assert rank > order.get(key, ("", 0, ""))
        order[key] = rank
    # Duplicates of an ordered stream change nothing: exactly the ordered flips, once each.
    doubled = [e for e in _ordered(events) for _ in (0, 1)]
    assert _run(doubled) == (ordered_states, ordered_changes)


@settings(max_examples=200)
@given(events=events_strategy)
def test_change_ids_are_deterministic(events: list[dict[str, Any]]) -> None:
    first = [c["change_id"] for c in _run(events)[1]]
    assert first == [c["change_id"] for c in _run(list(events))[1]]
    assert len(first) == len(set(first))
