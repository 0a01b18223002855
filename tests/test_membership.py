"""Membership semantics as properties: order and duplication never matter; only real flips emit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.membership import MEMBER, apply_event, fold
from schemas.records import MembershipChange, MembershipState, SegmentEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(ident: str, audience: str, kind: str, second: int) -> dict[str, Any]:
    when = T0 + timedelta(seconds=second)
    return {
        "schema_version": 1,
        "event_id": SegmentEvent.make_id(ident, audience, kind, when),
        "identifier": ident,
        "match_field": "email",
        "audience_id": audience,
        "audience_slug": f"slug-{audience}",
        "event": kind,
        "event_time": when,
        "event_time_source": "segment_event",
        "lytics_user_id": None,
        "source": "default",
        "request_id": "r",
        "received_at": T0,
        "fields": None,
    }


def changes_of(emitted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in emitted if "change_id" in e]


def test_enter_then_exit_emits_two_flips_with_time_in_audience() -> None:
    value, emitted = fold([event("u", "a", "enter", 10), event("u", "a", "exit", 70)])
    entered, exited = changes_of(emitted)
    assert (entered["change"], exited["change"]) == ("entered", "exited")
    assert exited["seconds_in_audience"] == 60.0
    for record in emitted:
        (MembershipChange if "change_id" in record else MembershipState).model_validate(record)
    assert value is not None and value["a"]["a"][MEMBER] == 0


def test_duplicates_stale_events_and_backfills_emit_nothing() -> None:
    value, emitted = fold([event("u", "a", "enter", 10)])
    assert len(changes_of(emitted)) == 1
    # The same event again (a Lytics retry) changes nothing at all.
    assert apply_event(value, event("u", "a", "enter", 10)) == (None, [])
    # A backfill "entered" for a member: no flip.
    new_value, out = apply_event(value, event("u", "a", "enter", 500))
    assert out == [] and new_value is not None
    # An older exit: membership stays, nothing emitted.
    _, out = apply_event(new_value, event("u", "a", "exit", 5))
    assert out == []
    # An exit for someone we never saw enter is not a change either.
    assert changes_of(fold([event("v", "a", "exit", 10)])[1]) == []


def test_field_change_updates_fields_without_a_membership_change() -> None:
    change = event("u", "a", "change", 20) | {"fields": {"city": "Portland"}}
    value, emitted = fold([event("u", "a", "enter", 10), change])
    assert len(changes_of(emitted)) == 1
    assert value is not None and value["f"] == {"city": "Portland"}
    older = event("u", "a", "change", 15) | {"fields": {"city": "Old"}}
    assert apply_event(value, older) == (None, [])


events_strategy = st.lists(
    st.builds(
        event,
        ident=st.sampled_from(["u1", "u2"]),
        audience=st.sampled_from(["a", "b"]),
        kind=st.sampled_from(["enter", "exit"]),
        second=st.integers(min_value=0, max_value=20),
    ),
    min_size=1,
    max_size=25,
)


def _by_identifier(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        out.setdefault(e["identifier"], []).append(e)
    return out


def _run(events: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    states, emitted = {}, []
    for ident, evs in _by_identifier(events).items():
        states[ident], out = fold(evs)
        emitted.extend(changes_of(out))
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
