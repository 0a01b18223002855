"""Input models against the samples, the exported JSON Schemas, and the split function."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.split import Context, parse_time, split_body
from schemas.export import COMMITTED, rendered
from schemas.lytics import LyticsBody, LyticsCloudEvent, LyticsDefaultEvent, LyticsLegacyEvent, classify
from schemas.records import SegmentEvent
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
    assert (event["source"], event["request_id"], event["fields"]) == ("default", "req-1", None)


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
    [event] = _events((SAMPLES / "default-format-field-change.json").read_bytes())
    assert event["event"] == "change"
    assert event["fields"] == {"city": "Portland", "email": "user@example.com", "first_name": "Joseph"}
    assert event["event_time_source"] == "meta"


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


def test_a_rejected_batch_element_too_deep_to_re_encode_keeps_the_whole_body() -> None:
    # Regression (fuzz): orjson writes at most 254 levels, so re-encoding such an element raised and
    # the worker dead-lettered the whole body as internal_error, losing the good elements' events.
    good = _sample("default-format-enter.json")
    body = b"[" + orjson.dumps(good) + b',{"data": {"x": ' + _deep(600) + b"}}]"
    result = split_body(body, CTX)
    assert [e["identifier"] for e in result.events] == ["user@example.com"]
    [rej] = result.rejected
    assert (rej.code, rej.index, rej.record) == ("missing_identifier", 1, body)
    assert "whole batch" in rej.reason


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
        assert result.events == []
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
