"""Input models against the samples, the exported JSON Schemas, and the split function."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from processors import split
from processors.membership import fold
from processors.split import (
    EARLIEST_EVENT_TIME,
    LATEST_EVENT_TIME,
    MAX_EVENTS_PER_BODY,
    MAX_EVENTS_PER_RECORD,
    MAX_IDENTIFIER_VALUES,
    MAX_IDENTIFIERS,
    MAX_SEGMENT_EVENTS,
    Context,
    element_spans,
    parse_time,
    split_body,
)
from schemas.export import COMMITTED, rendered
from schemas.lytics import LyticsBody, LyticsCloudEvent, LyticsDefaultEvent, LyticsLegacyEvent, classify
from schemas.records import FieldChange, SegmentEvent
from tests.conftest import SAMPLES

RECEIVED = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CTX = Context(source="default", request_id="req-1", received_at=RECEIVED, match_field="email")
SAMPLE_FILES = sorted(p for p in SAMPLES.glob("*.json") if not p.name.startswith("enrichment"))


def _sample(name: str) -> dict[str, Any]:
    return orjson.loads((SAMPLES / name).read_bytes())  # type: ignore[no-any-return]


def test_committed_json_schemas_match_the_models() -> None:
    for name, content in rendered().items():
        committed = COMMITTED / name
        assert committed.exists(), (
            f"{name} is not committed: run 'audience-relay schemas export schemas/json'"
        )
        assert committed.read_bytes() == content, (
            f"{name} drifted: run 'audience-relay schemas export schemas/json'"
        )


def test_schemas_export_command_writes_every_schema(tmp_path: Path) -> None:
    from audience_relay.cli import main

    assert main(["schemas", "export", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(rendered())


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_every_sample_parses_with_its_input_model(path: Path) -> None:
    record = orjson.loads(path.read_bytes())
    model = classify(record)
    expected = {
        "cloudevents": LyticsCloudEvent,
        "legacy": LyticsLegacyEvent,
        "default": LyticsDefaultEvent,
    }[path.stem.split("-")[0]]
    assert model is expected
    parsed = model.model_validate(record)
    # Unknown fields are kept, not rejected.
    assert parsed.model_dump(by_alias=True, exclude_unset=True).keys() >= record.keys()
    assert LyticsBody.model_validate([record, record]).records() == [record, record]


def test_field_change_sample_is_recognised() -> None:
    parsed = LyticsDefaultEvent.model_validate(_sample("default-format-field-change.json"))
    assert parsed.is_field_change()


def _events(body: bytes, ctx: Context = CTX) -> list[dict[str, Any]]:
    result = split_body(body, ctx)
    for event in result.events:
        SegmentEvent.model_validate(event)  # the published contract, extra fields forbidden
    return result.events


def test_default_format_sample() -> None:
    [event] = _events((SAMPLES / "default-format-enter.json").read_bytes())
    assert event["identifier"] == "user@example.com"
    assert event["audience_id"] == "42976a269a5e6b9d06c681b1c27292df"
    assert event["audience_slug"] == "emailzz5"
    assert event["event"] == "enter"
    assert event["event_time"] == datetime(2020, 10, 14, 20, 27, 33, 916374, tzinfo=UTC)
    assert event["event_time_source"] == "segment_event"
    assert event["lytics_user_id"] == "7076027172059065053"
    assert (event["source"], event["request_id"]) == ("default", "req-1")
    # The other identifiers configured (RELAY_IDENTIFIER_FIELDS, default the Lytics ID `_id`): none here.
    assert event["identifiers"] == {}


def test_other_identifiers_are_kept_normalized() -> None:
    record = _sample("default-format-enter.json")
    record["data"]["_id"] = " 4f1B "
    record["data"]["user_id"] = ["", "U-1", "U-2"]
    ctx = replace(CTX, identifier_fields=("_id", "user_id", "email", "missing"))
    [event] = _events(orjson.dumps(record), ctx)
    assert event["identifiers"] == {"_id": "4f1B", "user_id": "U-1"}  # the match field is the key itself
    record["data"]["_id"] = "x" * 300
    [rej] = split_body(orjson.dumps(record), ctx).rejected
    assert rej.code == "identifier_too_long" and "'_id'" in rej.reason


def test_legacy_and_cloudevents_samples() -> None:
    [legacy] = _events((SAMPLES / "legacy-format-enter.json").read_bytes())
    assert (legacy["identifier"], legacy["event"], legacy["audience_slug"]) == (
        "user@example.com",
        "enter",
        "emailzz5",
    )
    [ce] = _events((SAMPLES / "cloudevents-format-enter.json").read_bytes())
    assert (ce["identifier"], ce["audience_id"], ce["event"]) == (
        "user@example.com",
        "42976a269a5e6b9d06c681b1c27292df",
        "enter",
    )


def test_legacy_without_segment_events_uses_the_audience_fields() -> None:
    record = _sample("legacy-format-enter.json")
    del record["segment_events"]
    record["data"]["_audience_action"] = "exited"
    [event] = _events(orjson.dumps(record))
    assert (event["audience_id"], event["event"], event["audience_slug"]) == (
        "42976a269a5e6b9d06c681b1c27292df",
        "exit",
        "emailzz5",
    )
    assert event["event_time_source"] == "collected"


def test_field_change_keeps_the_user_fields() -> None:
    result = split_body((SAMPLES / "default-format-field-change.json").read_bytes(), CTX)
    assert result.events == [] and result.rejected == []
    [change] = result.field_changes
    FieldChange.model_validate(change)
    assert change["fields"] == {"city": "Portland", "email": "user@example.com", "first_name": "Joseph"}
    assert change["event_time_source"] == "meta"
    assert (change["trigger_id"], change["trigger_slug"]) == (
        "163bda069207c88cfdb7c84e06b9270f",
        "first_name_joe",
    )
    assert change["change_id"] == FieldChange.make_id("user@example.com", change["event_id"])


def test_selected_fields_samples_without_the_identifier_are_rejected_with_the_export_fields_hint() -> None:
    result = split_body((SAMPLES / "default-format-enter-selected-fields.json").read_bytes(), CTX)
    assert result.events == []
    [rej] = result.rejected
    assert rej.code == "missing_identifier"
    assert "'email'" in rej.reason and "Export Fields" in rej.reason
    assert rej.record == (SAMPLES / "default-format-enter-selected-fields.json").read_bytes()
    # Matching on another field the sample does export works.
    other = Context(source="s", request_id="r", received_at=RECEIVED, match_field="first_name")
    [event] = _events((SAMPLES / "default-format-exit-selected-fields.json").read_bytes(), other)
    assert (event["identifier"], event["event"]) == ("Joseph", "exit")


def test_array_identifiers_give_one_event_each_normalized() -> None:
    record = _sample("default-format-enter.json")
    record["data"]["email"] = ["  A@Example.COM ", "b@example.com", "a@example.com", ""]
    events = _events(orjson.dumps(record))
    assert [e["identifier"] for e in events] == ["a@example.com", "b@example.com"]


def test_a_batch_keeps_good_records_and_rejects_bad_ones_by_index() -> None:
    good = _sample("default-format-enter.json")
    no_id = _sample("default-format-enter-selected-fields.json")
    body = orjson.dumps([good, no_id, 7, {"data": {"email": "x@example.com"}}])
    result = split_body(body, CTX)
    assert [e["identifier"] for e in result.events] == ["user@example.com"]
    assert [(r.index, r.code) for r in result.rejected] == [
        (1, "missing_identifier"),
        (2, "not_an_object"),
        (3, "no_audience"),
    ]
    assert orjson.loads(result.rejected[0].record) == no_id


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda r: r["data"].update(email="x" * 300 + "@example.com"), "identifier_too_long"),
        (lambda r: r["data"].update(email=[f"u{i}@example.com" for i in range(51)]), "too_many_identifiers"),
        (lambda r: r["data"].update(email={"nested": 1}), "bad_identifier"),
        (lambda r: r["data"]["segment_events"][0].update(event="wobble"), "bad_segment_event"),
        (lambda r: r["data"]["segment_events"][0].pop("id"), "bad_segment_event"),
        (lambda r: r["data"]["segment_events"][0].update(enter="yesterday"), "bad_timestamp"),
        (lambda r: r["data"].pop("segment_events"), "no_audience"),
    ],
)
def test_unusable_records_get_a_reason(mutate: Any, code: str) -> None:
    record = _sample("default-format-enter.json")
    mutate(record)
    result = split_body(orjson.dumps(record), CTX)
    assert result.events == [] and [r.code for r in result.rejected] == [code]
    assert result.rejected[0].reason


def test_unparsable_body() -> None:
    result = split_body(b"{nope", CTX)
    assert [r.code for r in result.rejected] == ["unparsable"] and result.rejected[0].record == b"{nope"


def test_time_fallbacks() -> None:
    record = _sample("default-format-enter.json")
    del record["data"]["segment_events"][0]["enter"]
    [event] = _events(orjson.dumps(record))
    assert event["event_time_source"] == "meta"
    del record["meta"]
    [event] = _events(orjson.dumps(record))
    assert (event["event_time_source"], event["event_time"]) == ("received", RECEIVED)
    ce = _sample("cloudevents-format-enter.json")
    del ce["data"]["segment_events"][0]["enter"]
    [event] = _events(orjson.dumps(ce))
    assert event["event_time_source"] == "cloudevent"


def test_parse_time_forms() -> None:
    assert parse_time("2020-10-14T13:27:33.916374949-07:00") == datetime(
        2020, 10, 14, 20, 27, 33, 916374, tzinfo=UTC
    )
    assert parse_time("2023-05-25T23:09:59Z") == datetime(2023, 5, 25, 23, 9, 59, tzinfo=UTC)
    assert (
        parse_time(1_700_000_000)
        == parse_time(1_700_000_000_000)
        == datetime.fromtimestamp(1_700_000_000, UTC)
    )
    assert parse_time("soon") is None and parse_time(True) is None and parse_time(None) is None


emails = st.from_regex(r"\A[a-zA-Z0-9]{1,10}@[a-z]{1,8}\.(com|org)\Z")


@settings(max_examples=200)
@given(
    email=emails,
    pad=st.sampled_from(["", " ", "\t", "  "]),
    kind=st.sampled_from(["enter", "exit"]),
    fmt=st.sampled_from(["default", "legacy", "cloudevents"]),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=6).filter(lambda k: k not in ("email", "segment_events")),
        st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
        max_size=4,
    ),
    batch=st.integers(min_value=1, max_value=4),
)
def test_generated_variants_of_every_format(
    email: str, pad: str, kind: str, fmt: str, extra: dict[str, Any], batch: int
) -> None:
    base = _sample(
        {
            "default": "default-format-enter.json",
            "legacy": "legacy-format-enter.json",
            "cloudevents": "cloudevents-format-enter.json",
        }[fmt]
    )
    base["data"]["email"] = pad + email + pad
    base["data"].update(extra)
    holder = base if fmt == "legacy" else base["data"]
    holder["segment_events"] = [
        {"id": "aud1", "event": kind, "slug": "s1", kind: "2026-01-02T03:04:05.123456789Z"}
    ]
    body = orjson.dumps([base] * batch) if batch > 1 else orjson.dumps(base)
    events = _events(body)
    assert len(events) == batch
    for event in events:
        assert event["identifier"] == email.lower()
        assert (event["audience_id"], event["event"]) == ("aud1", kind)
        assert event["event_time"] == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert len({e["event_id"] for e in events}) == 1  # same content, same id


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_a_rejected_batch_element_too_deep_to_re_encode_is_dead_lettered_alone() -> None:
    # Regression (fuzz): orjson writes at most 254 levels, so re-encoding such an element raised; the
    # element's own bytes are dead-lettered now, and the good element's events still come out.
    good = _sample("default-format-enter.json")
    bad = b'{"data": {"x": ' + _deep(600) + b"}}"
    body = b"[" + orjson.dumps(good) + b",\n  " + bad + b"\n]"
    result = split_body(body, CTX)
    assert [e["identifier"] for e in result.events] == ["user@example.com"]
    [rej] = result.rejected
    assert (rej.code, rej.index, rej.record) == ("missing_identifier", 1, bad)


def test_field_change_fields_must_fit_in_a_segment_event() -> None:
    # Regression (fuzz): a change event carried fields orjson could not write (the worker died on
    # encoding it) or over the broker's record size (the send failed and the worker exited).
    for extra, phrase in [(orjson.loads(_deep(600)), "cannot be re-encoded"), ("x" * 600_000, "bytes")]:
        record = _sample("default-format-field-change.json")
        record["data"]["x"] = extra
        body = orjson.dumps(record) if isinstance(extra, str) else None
        if body is None:  # too deep for orjson.dumps: splice the text in
            record["data"]["x"] = "DEEP"
            body = orjson.dumps(record).replace(b'"DEEP"', _deep(600))
        result = split_body(body, CTX)
        assert result.events == [] and result.field_changes == []
        [rej] = result.rejected
        assert rej.code == "field_too_large" and phrase in rej.reason


@pytest.mark.parametrize("where", ["audience", "slug", "user-id"])
def test_oversized_tokens_are_rejected_not_sent(where: str) -> None:
    record = _sample("default-format-enter.json")
    huge = "a" * 5000
    if where == "audience":
        record["data"]["segment_events"][0]["id"] = huge
    elif where == "slug":
        record["data"]["segment_events"][0]["slug"] = huge
    else:
        record["id"] = huge
    result = split_body(orjson.dumps(record), CTX)
    assert result.events == [] and [r.code for r in result.rejected] == ["field_too_large"]


def test_reasons_stay_short_whatever_the_value() -> None:
    # Reasons travel in Kafka headers: a 2 MB bad value must not make a 2 MB header.
    for field, value in [("event", "e" * 2_000_000), ("enter", "t" * 2_000_000)]:
        record = _sample("default-format-enter.json")
        record["data"]["segment_events"][0][field] = value
        [rej] = split_body(orjson.dumps(record), CTX).rejected
        assert len(rej.reason) < 300


def test_a_batch_of_millions_of_records_is_kept_whole_as_one_dead_letter() -> None:
    # Found adding the fuzz corpus's 10 MB body of empty objects: 3 million dead letters for one request.
    body = b"[" + b"{}," * 2_000_000 + b"{}]"
    result = split_body(body, CTX)
    assert result.events == []
    [rej] = result.rejected
    assert (rej.code, rej.index, rej.record) == ("batch_too_large", None, body)


@pytest.mark.parametrize("field", ["event", "enter"])
def test_a_deeply_nested_segment_event_field_is_a_clear_reject(field: str) -> None:
    # Regression (fuzz, seed 20261123): str()/repr() of a value nested ~900 deep raised
    # RecursionError in the split agent, so the body went to dead-letter as internal_error.
    record = _sample("default-format-enter.json")
    record["data"]["segment_events"][0][field] = "DEEP"
    body = orjson.dumps(record).replace(b'"DEEP"', _deep(900))
    result = split_body(body, CTX)
    assert result.events == []
    [rej] = result.rejected
    expected = {"event": "bad_segment_event", "enter": "bad_timestamp"}[field]
    assert rej.code == expected and "an array of 1 elements" in rej.reason


# ---------------------------------------------------------------------------------------------------
# One record costs only itself


def _user(email: str, enter: Any = "2026-01-02T03:04:05Z", audiences: int = 1) -> dict[str, Any]:
    events = [{"id": f"aud{i}", "event": "enter", "enter": enter} for i in range(audiences)]
    return {"id": "u1", "data": {"email": email, "segment_events": events}}


@pytest.mark.parametrize(
    "stamp",
    [
        "0001-01-01T00:00:00+01:00",  # the case: astimezone overflowed
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00Z",  # Go's zero time
        "1969-12-31T23:59:59Z",
        "2200-01-01T00:00:00Z",
        -1,
        10**19,  # epoch milliseconds past year 9999
        1e300,
    ],
)
def test_an_unusable_time_costs_only_its_record(stamp: Any) -> None:
    body = orjson.dumps([_user("a@example.com"), _user("b@example.com", stamp), _user("c@example.com")])
    result = split_body(body, CTX)
    assert [e["identifier"] for e in result.events] == ["a@example.com", "c@example.com"]
    [rej] = result.rejected
    assert (rej.code, rej.index, rej.record) == (
        "bad_timestamp",
        1,
        orjson.dumps(_user("b@example.com", stamp)),
    )
    assert "from 1970-01-01 to 2200-01-01" in rej.reason


def test_parse_time_accepts_exactly_the_documented_range() -> None:
    assert parse_time("1970-01-01T00:00:00Z") == parse_time(0) == EARLIEST_EVENT_TIME
    assert parse_time("1970-01-01T00:59:59+01:00") is None  # 1969 in UTC
    last = LATEST_EVENT_TIME - timedelta(microseconds=1)
    assert parse_time("2199-12-31T23:59:59.999999999Z") == last
    assert parse_time("2200-01-01T00:59:59.999999+01:00") == last
    assert parse_time("2200-01-01T00:00:00Z") is None
    assert parse_time(LATEST_EVENT_TIME.timestamp() * 1000) is None


_offsets = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)),
)
_time_texts = st.builds(
    lambda when, tz, sep: when.replace(tzinfo=tz).isoformat(sep=sep),
    st.datetimes(),
    _offsets | st.none(),
    st.sampled_from(["T", " "]),
)
_anything = (
    _time_texts
    | _time_texts.map(lambda t: t.replace(".", ".123456789", 1) if "." in t else t + ".1Z")
    | st.text()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.none()
    | st.booleans()
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)


@settings(max_examples=500)
@given(value=_anything)
@example("0001-01-01T00:00:00+01:00")
@example("9999-12-31T23:59:59.999999999-23:59")
@example(10**400)
@example(float("inf"))
@example(float("nan"))
def test_parse_time_never_raises_and_only_returns_accepted_utc_times(value: Any) -> None:
    parsed = parse_time(value)
    assert parsed is None or (parsed.tzinfo is UTC and EARLIEST_EVENT_TIME <= parsed < LATEST_EVENT_TIME)


@settings(max_examples=300)
@given(
    when=st.datetimes(
        min_value=EARLIEST_EVENT_TIME.replace(tzinfo=None),
        max_value=(LATEST_EVENT_TIME - timedelta(microseconds=1)).replace(tzinfo=None),
        timezones=st.just(UTC),
    )
)
@example(EARLIEST_EVENT_TIME)
@example(LATEST_EVENT_TIME - timedelta(microseconds=1))
@example(datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC))  # float microseconds lost this one
def test_every_accepted_event_time_survives_the_membership_stage(when: datetime) -> None:
    # Regression: the membership stage's microsecond arithmetic went through a float, which loses
    # microseconds near the epoch and overflows far from it; split refuses times outside the range.
    [event] = split_body(orjson.dumps(_user("a@example.com", when.isoformat())), CTX).events
    states, [change] = fold([orjson.loads(orjson.dumps(event))])  # as it travels through Kafka
    [state] = states.values()
    assert datetime.fromisoformat(change["event_time"]) == when
    assert datetime.fromisoformat(state["entered_at"]) == when


def test_a_receipt_time_out_of_range_rejects_only_records_that_need_it() -> None:
    ctx = Context(source="s", request_id="r", received_at=datetime(1, 1, 1, tzinfo=UTC), match_field="email")
    timeless = {"data": {"email": "b@example.com", "segment_events": [{"id": "aud", "event": "enter"}]}}
    result = split_body(orjson.dumps([_user("a@example.com"), timeless]), ctx)
    assert [e["identifier"] for e in result.events] == ["a@example.com"]
    assert [(r.code, r.index) for r in result.rejected] == [("bad_timestamp", 1)]
    assert "receipt time" in result.rejected[0].reason


def test_an_unexpected_error_in_one_record_costs_only_that_record(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever a record makes a library raise, the other records' events still come out.
    real = split.normalize_identifier

    def surprising(value: str, match_field: str) -> str:
        if value == "boom@example.com":
            raise KeyError("k" * 100_000)
        return real(value, match_field)

    monkeypatch.setattr(split, "normalize_identifier", surprising)
    bad = b'{"data": {"email": "boom@example.com", "n": 1E2, "n": 2,\n "segment_events": []}}'
    body = (
        b"["
        + orjson.dumps(_user("a@example.com"))
        + b", "
        + bad
        + b" ,"
        + orjson.dumps(_user("c@x.org"))
        + b"]"
    )
    result = split_body(body, CTX)
    assert [e["identifier"] for e in result.events] == ["a@example.com", "c@x.org"]
    [rej] = result.rejected
    assert (rej.code, rej.index, rej.record) == ("internal_error", 1, bad)
    assert isinstance(rej.exception, KeyError) and "KeyError" in rej.reason and len(rej.reason) < 300


# ---------------------------------------------------------------------------------------------------
# Work per record is bounded before any loop over it


class _Budget:
    """Counts calls of a function; a call over ``limit`` fails (fast, instead of running for minutes)."""

    def __init__(self, real: Callable[..., Any], limit: int) -> None:
        self.real, self.limit, self.calls = real, limit, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls > self.limit:
            raise AssertionError(f"called more than {self.limit} times")
        return self.real(*args)


def test_a_huge_identifier_list_is_rejected_without_looking_at_its_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: 100,000 values (1.3 MiB) ran a quadratic duplicate check before the 50 limit.
    budget = _Budget(split.normalize_identifier, MAX_IDENTIFIER_VALUES)
    monkeypatch.setattr(split, "normalize_identifier", budget)
    record = _sample("default-format-enter.json")
    record["data"]["email"] = [f"u{i}@example.com" for i in range(100_000)]
    body = orjson.dumps(record)
    started = time.process_time()
    result = split_body(body, CTX)
    cpu = time.process_time() - started
    assert result.events == [] and [r.code for r in result.rejected] == ["too_many_identifiers"]
    assert budget.calls == 0
    assert cpu < 2, cpu  # ~20 ms here; this process's CPU only, so another process's load does not count


def test_identifier_values_stop_at_the_first_one_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = _Budget(split.normalize_identifier, MAX_IDENTIFIERS + 1)
    monkeypatch.setattr(split, "normalize_identifier", budget)
    record = _sample("default-format-enter.json")
    record["data"]["email"] = [f"u{i}@example.com" for i in range(MAX_IDENTIFIER_VALUES)]
    [rej] = split_body(orjson.dumps(record), CTX).rejected
    assert rej.code == "too_many_identifiers" and budget.calls == MAX_IDENTIFIERS + 1


def test_repeated_identifier_values_within_the_bound_are_one_identifier_each() -> None:
    # Case and padding variants of the same 50 addresses: the raw-value bound does not bite them.
    record = _sample("default-format-enter.json")
    variants = [" U{}@Example.com", "u{}@example.com", "U{}@EXAMPLE.COM ", "u{}@Example.Com"]
    record["data"]["email"] = [v.format(i) for i in range(MAX_IDENTIFIERS) for v in variants]
    assert len(record["data"]["email"]) == MAX_IDENTIFIER_VALUES
    events = split_body(orjson.dumps(record), CTX).events
    assert [e["identifier"] for e in events] == [f"u{i}@example.com" for i in range(MAX_IDENTIFIERS)]


def _many(identifiers: int, audiences: int) -> dict[str, Any]:
    record = _user("x", audiences=audiences)
    record["data"]["email"] = [f"u{i}@example.com" for i in range(identifiers)]
    return record


@pytest.mark.parametrize(
    "identifiers, audiences, code",
    [
        (50, 8_000, "too_many_segment_events"),  # the 242 KiB body: 400,000 events
        (1, MAX_SEGMENT_EVENTS + 1, "too_many_segment_events"),
        (50, MAX_EVENTS_PER_RECORD // 50 + 1, "too_many_events_per_record"),
    ],
)
def test_a_record_over_an_event_cap_is_rejected_before_anything_is_made(
    monkeypatch: pytest.MonkeyPatch, identifiers: int, audiences: int, code: str
) -> None:
    made = _Budget(SegmentEvent.make_id, 100)
    parsed = _Budget(split.parse_time, 100)
    monkeypatch.setattr(SegmentEvent, "make_id", made)
    monkeypatch.setattr(split, "parse_time", parsed)
    split_body(orjson.dumps(_user("a@example.com")), CTX)
    alone = made.limit, parsed.limit = made.calls, parsed.calls
    made.calls = parsed.calls = 0
    body = orjson.dumps([_user("a@example.com"), _many(identifiers, audiences)])
    result = split_body(body, CTX)
    assert (made.calls, parsed.calls) == alone  # nothing for the second record: no time read, no event
    assert [e["identifier"] for e in result.events] == ["a@example.com"]
    [rej] = result.rejected
    assert (rej.code, rej.index, rej.record) == (code, 1, orjson.dumps(_many(identifiers, audiences)))


def test_the_largest_real_payloads_fit_every_cap() -> None:
    # Lytics: at most 50 stitched identifiers, batches of up to 300 users; a few segment events each.
    [one] = [_many(MAX_IDENTIFIERS, MAX_EVENTS_PER_RECORD // MAX_IDENTIFIERS)]
    assert len(split_body(orjson.dumps(one), CTX).events) == MAX_EVENTS_PER_RECORD
    batch = [_many(MAX_IDENTIFIERS, 3) for _ in range(300)]
    result = split_body(orjson.dumps(batch), CTX)
    assert (len(result.events), result.rejected) == (300 * MAX_IDENTIFIERS * 3, [])
    assert len(result.events) <= MAX_EVENTS_PER_BODY


def test_events_per_body_are_capped_record_by_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split, "MAX_EVENTS_PER_BODY", 5)
    sizes = [2, 2, 2, 1, 3]
    body = orjson.dumps([_many(n, 1) for n in sizes])
    result = split_body(body, CTX)
    # 2 + 2 kept; the third would make 6 and is rejected; the 1 fits (5); the 3 does not.
    assert len(result.events) == 5
    assert [(r.code, r.index) for r in result.rejected] == [
        ("too_many_events_per_body", 2),
        ("too_many_events_per_body", 4),
    ]
    assert [r.record for r in result.rejected] == [orjson.dumps(_many(2, 1)), orjson.dumps(_many(3, 1))]


# ---------------------------------------------------------------------------------------------------
# A dead-lettered batch element is its original bytes


def test_a_dead_lettered_batch_element_keeps_its_original_bytes() -> None:
    # Regression: the element was re-encoded (a duplicate key lost, 1E2 became 100.0).
    elements = [
        b'{"data": {"email": "a@example.com", "n": 1E2, "n": -0.50e-3}}',
        orjson.dumps(_user("ok@example.com")),
        b'{ "data" : { "email" : "\\u00e9\\"]},[{\\\\" , "s": "caf\\u00e9 \xc3\xa9 \xf0\x9f\x98\x80" } }',
        b"7",
        b'["not", "an", {"object": []}]',
    ]
    body = b"\n [\r\n\t" + b" ,\n  ".join(elements) + b"\n]\t"
    result = split_body(body, CTX)
    assert [e["identifier"] for e in result.events] == ["ok@example.com"]
    assert [(r.index, r.record) for r in result.rejected] == [
        (0, elements[0]),
        (2, elements[2]),
        (3, elements[3]),
        (4, elements[4]),
    ]


def test_element_spans_run_only_when_an_element_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    scans = _Budget(element_spans, 0)
    monkeypatch.setattr(split, "element_spans", scans)
    assert len(split_body(orjson.dumps([_user("a@example.com")] * 3), CTX).events) == 3
    monkeypatch.setattr(split, "element_spans", _Budget(element_spans, 1))
    result = split_body(orjson.dumps([7, _user("a@example.com"), 8]), CTX)
    assert [r.record for r in result.rejected] == [b"7", b"8"]  # two rejects, one scan


_space = st.text(alphabet=" \t\n\r", max_size=3).map(str.encode)
_scalar_texts = (
    st.sampled_from([b"null", b"true", b"false", b"1E2", b"-0.5e-3", b"0", b"-0", b"1.0E+2"])
    | st.integers(min_value=-(2**63), max_value=2**64 - 1).map(lambda i: str(i).encode())
    | st.floats(allow_nan=False, allow_infinity=False).map(orjson.dumps)
    | st.text(max_size=12).map(orjson.dumps)  # raw UTF-8, escaped quotes, backslashes, control chars
    | st.text(max_size=12).map(lambda t: json.dumps(t).encode())  # \uXXXX escapes, surrogate pairs
)


def _array_text(items: list[tuple[bytes, bytes, bytes]], empty: bytes) -> bytes:
    return b"[" + (b",".join(a + v + b for a, v, b in items) if items else empty) + b"]"


def _object_text(members: list[tuple[bytes, bytes, bytes, bytes, bytes]], empty: bytes) -> bytes:
    inside = b",".join(a + key + b + b":" + c + value + a for a, key, b, c, value in members)
    return b"{" + (inside if members else empty) + b"}"


_keys = st.text(max_size=6).map(orjson.dumps)
_json_texts = st.recursive(
    _scalar_texts,
    lambda inner: (
        st.builds(_array_text, st.lists(st.tuples(_space, inner, _space), max_size=4), _space)
        | st.builds(
            _object_text, st.lists(st.tuples(_space, _keys, _space, _space, inner), max_size=4), _space
        )
    ),
    max_leaves=12,
)


@settings(max_examples=500)
@given(
    items=st.lists(st.tuples(_space, _json_texts, _space), max_size=6),
    lead=_space,
    empty=_space,
    trail=_space,
)
def test_element_spans_are_the_elements_and_rebuild_the_body(
    items: list[tuple[bytes, bytes, bytes]], lead: bytes, empty: bytes, trail: bytes
) -> None:
    body = lead + _array_text(items, empty) + trail
    spans = element_spans(body)
    # Each span parses to its element, and is the element's text as written.
    assert [orjson.loads(body[s:e]) for s, e in spans] == orjson.loads(body)
    assert [body[s:e] for s, e in spans] == [text for _, text, _ in items]
    # The bytes around and between spans are whitespace and the array's punctuation, nothing else.
    cuts = [0, *(x for span in spans for x in span), len(body)]
    gaps = [body[cuts[i] : cuts[i + 1]] for i in range(0, len(cuts), 2)]
    punctuation = [b"[]"] if not spans else [b"[", *[b","] * (len(spans) - 1), b"]"]
    assert [re.sub(rb"[ \t\n\r]", b"", gap) for gap in gaps] == punctuation
    assert b"".join(body[a:b] for a, b in itertools.pairwise(cuts)) == body
