"""Split a Lytics webhook body into per-user audience events (pure functions, no I/O).

Every Lytics format is read leniently — customers reshape bodies with templates — and every record
that cannot be used comes back as a ``Rejected`` with a reason a person can act on:

- default ``{id, data: {..., segment_events: [...]}, meta: {timestamp}}``
- legacy ``{id, data: {_audience, _audience_action, _audience_friendly, ...}, segment_events, collected}``
- CloudEvents ``{specversion, id, time, data: {..., segment_events}}`` (structured or batch)
- field change: ``segment_events[].event == "change"`` (no enter/exit)
- any of these batched as a JSON array.

Two rules hold for any input:

- one record costs only itself: whatever one batch element holds (an unusable value, a value that
  makes a library raise), it alone is rejected, with its original bytes, and the other elements'
  events still come out;
- work per record is bounded before any loop over it: every list a record brings (identifier
  values, segment events) and the events it would produce are counted against a cap first, so a
  record is rejected without being walked when it is too big.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.records import FieldChange, SegmentEvent

MAX_IDENTIFIER_BYTES = 256  # Lytics' published limit for a profile identifier
MAX_IDENTIFIERS = 50  # Lytics' published limit of stitched identifiers
# The raw values of the identifier field looked at, before normalizing: Lytics' stitched identifiers
# are distinct, but values differing only in case or padding normalize to one; a longer list is
# rejected without normalizing any of it (a 100,000-value list must cost nothing).
MAX_IDENTIFIER_VALUES = 4 * MAX_IDENTIFIERS
# A Lytics trigger record carries one segment event, or a few; a longer list is rejected unread.
MAX_SEGMENT_EVENTS = 100
# One record makes (identifiers) x (segment events) events: 50 identifiers with 50 segment events.
MAX_EVENTS_PER_RECORD = 2_500
# The events one body may make: a batch of 300 users with 50 identifiers and 3 segment events each
# fits; beyond it each further record is rejected (~30 MB of worker memory at this cap).
MAX_EVENTS_PER_BODY = 50_000
# An audience id, slug or Lytics user id is a short token (32 hex characters in Lytics); a larger one
# would make segment events over the broker's default record size (1 MiB), which ends the worker.
MAX_TOKEN_BYTES = 256
# The user fields a field-change event carries; bounded for the same reason.
MAX_FIELDS_BYTES = 512 * 1024
# Lytics batches hold hundreds of users. A 10 MiB body of 3 million empty objects would otherwise
# become 3 million dead letters (minutes of work for one request); it is kept whole instead.
MAX_BATCH_RECORDS = 10_000
# Event times outside [EARLIEST_EVENT_TIME, LATEST_EVENT_TIME) are refused (bad_timestamp): they are
# never a real audience event (Go's zero time "0001-01-01T00:00:00Z" is "no time"), and extreme dates
# overflow datetime arithmetic (an offset applied near year 1 or 9999).
EARLIEST_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_EVENT_TIME = datetime(2200, 1, 1, tzinfo=UTC)
_EVENTS = {"enter": "enter", "entered": "enter", "exit": "exit", "exited": "exit", "change": "change"}
_RANGE = f"{EARLIEST_EVENT_TIME:%Y-%m-%d} to {LATEST_EVENT_TIME:%Y-%m-%d}"
_MAX_ERROR_CHARS = 200


@dataclass(frozen=True)
class Rejected:
    """A record that goes to the dead-letter topic, with a reason code and a sentence."""

    code: str
    reason: str
    index: int | None  # position in a batch, None for a single-object body
    record: bytes  # the original bytes of a single-object body, or of the batch element
    # For ``internal_error``: what was raised, so the caller can log its traceback.
    exception: Exception | None = field(default=None, compare=False)


@dataclass
class Split:
    """What one raw body became: segment events and field changes (dicts matching ``SegmentEvent``
    and ``FieldChange``), and rejects."""

    events: list[dict[str, Any]] = field(default_factory=list)
    field_changes: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    """What the ingress recorded about the request, from the raw record's headers."""

    source: str
    request_id: str
    received_at: datetime
    match_field: str
    #: Other identifier fields of ``data`` kept with every event (e.g. ``_id``, the Lytics ID).
    identifier_fields: tuple[str, ...] = ("_id",)


class _Reject(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _show(value: Any, limit: int = 80) -> str:
    """A short description of ``value`` for a reason (reasons travel in Kafka headers).

    Containers are described, never ``repr``-ed: a deeply nested one would raise RecursionError
    and a large one would cost its whole size before being cut.
    """
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, list):
        return f"an array of {len(value)} elements"
    if isinstance(value, str):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def _token(value: Any, what: str) -> str:
    text = str(value).strip()
    size = len(text.encode(errors="replace"))
    if size > MAX_TOKEN_BYTES:
        raise _Reject("field_too_large", f"{what} has {size} bytes (limit {MAX_TOKEN_BYTES})")
    return text


def _in_range(when: datetime) -> datetime | None:
    """``when`` in UTC if it lies in the accepted event times, else None (comparing never overflows)."""
    aware = when.replace(tzinfo=UTC) if when.tzinfo is None else when
    if not EARLIEST_EVENT_TIME <= aware < LATEST_EVENT_TIME:
        return None
    return aware.astimezone(UTC)  # cannot overflow inside the range


#: Recently parsed timestamp texts: a backfill repeats the same few enter times thousands of times.
_PARSED: dict[str, datetime | None] = {}
_PARSED_MAX = 4096


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 string (any fraction digits, ``Z`` or offset) or epoch seconds/ms, as aware UTC.

    None for anything else, and for a time outside [``EARLIEST_EVENT_TIME``, ``LATEST_EVENT_TIME``):
    never raises, whatever ``value`` is.
    """
    if isinstance(value, str):
        try:
            return _PARSED[value]
        except KeyError:
            parsed = _parse_time(value)
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            if len(value) <= 64:  # only timestamp-sized texts are worth remembering
                _PARSED[value] = parsed
            return parsed
    return _parse_time(value)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            seconds = value / 1000 if abs(value) > 1e11 else value
            return _in_range(datetime.fromtimestamp(seconds, UTC))
        except (OverflowError, OSError, ValueError):  # huge, infinite or NaN
            return None
    if isinstance(value, str) and value:
        text = value.strip()
        if "." in text:  # Python keeps at most 6 fraction digits; Lytics sends 9.
            head, _, rest = text.partition(".")
            digits = len(rest) - len(rest.lstrip("0123456789"))
            text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}" if digits else f"{head}{rest}"
        try:
            return _in_range(datetime.fromisoformat(text))
        except (OverflowError, ValueError):
            return None
    return None


def normalize_identifier(value: str, match_field: str) -> str:
    """Trim; lower-case e-mail addresses (by field name or by shape)."""
    text = value.strip()
    if "@" in text or "email" in match_field.lower():
        text = text.lower()
    return text


def _export_hint(match_field: str) -> str:
    return (
        f"add '{match_field}' to the Export Fields of the Lytics webhook job, "
        "or set RELAY_MATCH_FIELD to a field the job exports"
    )


def _too_many(match_field: str, values: int) -> _Reject:
    return _Reject(
        "too_many_identifiers",
        f"'{match_field}' holds more than {MAX_IDENTIFIERS} identifiers ({values} values); "
        f"Lytics stitches at most {MAX_IDENTIFIERS}",
    )


def _identifiers(raw: Any, match_field: str) -> list[str]:
    if raw is None or raw == "" or raw == []:
        reason = f"the record has no '{match_field}' in its data: {_export_hint(match_field)}"
        raise _Reject("missing_identifier", reason)
    values = raw if isinstance(raw, list) else [raw]
    if len(values) > MAX_IDENTIFIER_VALUES:
        raise _too_many(match_field, len(values))
    out: list[str] = []
    seen: set[str] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Reject(
                "bad_identifier",
                f"'{match_field}' holds a {type(value).__name__}; expected a string, a number or a list",
            )
        ident = normalize_identifier(value if isinstance(value, str) else str(value), match_field)
        if not ident or ident in seen:
            continue
        size = len(ident) if ident.isascii() else len(ident.encode())
        if size > MAX_IDENTIFIER_BYTES:
            raise _Reject(
                "identifier_too_long",
                f"a '{match_field}' value has {size} bytes (limit {MAX_IDENTIFIER_BYTES})",
            )
        if len(out) == MAX_IDENTIFIERS:
            raise _too_many(match_field, len(values))
        seen.add(ident)
        out.append(ident)
    if not out:
        reason = f"'{match_field}' is empty in the record's data: {_export_hint(match_field)}"
        raise _Reject("missing_identifier", reason)
    return out


def _segment_events(record: dict[str, Any], data: dict[str, Any]) -> list[Any]:
    for holder in (data, record):
        found = holder.get("segment_events")
        if isinstance(found, list) and found:
            if len(found) > MAX_SEGMENT_EVENTS:
                raise _Reject(
                    "too_many_segment_events",
                    f"the record has {len(found)} segment_events (limit {MAX_SEGMENT_EVENTS}); a Lytics "
                    "trigger sends one or a few per user",
                )
            return found
    audience = data.get("_audience", record.get("_audience"))
    if audience:  # legacy format without segment_events
        action = data.get("_audience_action", record.get("_audience_action"))
        slug = data.get("_audience_friendly", record.get("_audience_friendly"))
        return [{"id": audience, "event": action, "slug": slug}]
    raise _Reject(
        "no_audience",
        "the record has no segment_events (nor a legacy _audience): add segment_events to the Export Fields "
        "of the Lytics webhook job",
    )


def _fallback_time(record: dict[str, Any], received_at: datetime) -> tuple[datetime | None, str]:
    """The record's own time (meta, CloudEvents, collected), else the receipt time (None if unusable)."""
    meta = record.get("meta")
    if isinstance(meta, dict) and (t := parse_time(meta.get("timestamp"))):
        return t, "meta"
    if "specversion" in record and (t := parse_time(record.get("time"))):
        return t, "cloudevent"
    if t := parse_time(record.get("collected")):
        return t, "collected"
    return _in_range(received_at), "received"


def _bounded_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The user fields a field-change event carries, if they can travel in one segment event."""
    fields = {k: v for k, v in data.items() if k != "segment_events"}
    try:
        size = len(orjson.dumps(fields))
    except orjson.JSONEncodeError as exc:  # e.g. nested deeper than orjson writes (254 levels)
        raise _Reject("field_too_large", f"the user's fields cannot be re-encoded: {exc}") from None
    if size > MAX_FIELDS_BYTES:
        raise _Reject(
            "field_too_large",
            f"the user's fields take {size} bytes (limit {MAX_FIELDS_BYTES}): export fewer or smaller "
            "fields in the Lytics webhook job",
        )
    return fields


def _other_identifiers(data: dict[str, Any], ctx: Context) -> dict[str, str]:
    """The configured identifier fields the record exported, normalized; an array gives its first value."""
    out: dict[str, str] = {}
    for name in ctx.identifier_fields:
        if name == ctx.match_field:
            continue
        raw = data.get(name)
        if isinstance(raw, list):
            raw = next((v for v in raw if v not in (None, "")), None)
        if raw is None or isinstance(raw, bool) or not isinstance(raw, str | int | float):
            continue
        value = normalize_identifier(str(raw), name)
        if not value:
            continue
        size = len(value.encode())
        if size > MAX_IDENTIFIER_BYTES:
            raise _Reject(
                "identifier_too_long", f"the '{name}' value has {size} bytes (limit {MAX_IDENTIFIER_BYTES})"
            )
        out[name] = value
    return out


@dataclass(frozen=True)
class _Audience:
    """One checked segment event of a record, before it is paired with each identifier."""

    audience_id: str
    slug: str | None
    kind: str
    when: datetime
    when_source: str


@dataclass(frozen=True)
class _Plan:
    """Everything one record's events are made of; ``count`` is known before any is made."""

    identifiers: list[str]
    audiences: list[_Audience]
    lytics_user_id: str | None
    fields: dict[str, Any] | None
    #: The configured other identifier fields (e.g. ``_id``), the same for each identifier.
    other_identifiers: dict[str, str]

    @property
    def count(self) -> int:
        return len(self.identifiers) * len(self.audiences)


def _plan(record: Any, ctx: Context) -> _Plan:
    """Check one Lytics user record; raises ``_Reject`` when it cannot be used."""
    if not isinstance(record, dict):
        raise _Reject("not_an_object", f"a Lytics user record is a JSON object, got {type(record).__name__}")
    data = record.get("data")
    if not isinstance(data, dict):
        # A template may flatten the record; then the user fields sit at the top.
        data = record
    idents = _identifiers(data.get(ctx.match_field, record.get(ctx.match_field)), ctx.match_field)
    raw_events = _segment_events(record, data)
    if (count := len(idents) * len(raw_events)) > MAX_EVENTS_PER_RECORD:
        raise _Reject(
            "too_many_events_per_record",
            f"the record would make {count} events ({len(idents)} identifiers times {len(raw_events)} "
            f"segment events; limit {MAX_EVENTS_PER_RECORD})",
        )
    fallback, fallback_source = _fallback_time(record, ctx.received_at)
    user_id = record.get("id")
    lytics_user_id = (
        _token(user_id, "the record's 'id'")
        if isinstance(user_id, str | int) and not isinstance(user_id, bool)
        else None
    )
    fields: dict[str, Any] | None = None
    audiences: list[_Audience] = []
    for position, se in enumerate(raw_events):
        if not isinstance(se, dict):
            raise _Reject("bad_segment_event", f"segment_events[{position}] is not an object")
        event = se.get("event")
        kind = _EVENTS.get(event.strip().lower()) if isinstance(event, str) else None
        if kind is None:
            raise _Reject(
                "bad_segment_event",
                f"segment_events[{position}].event is {_show(se.get('event'))}; "
                "expected enter, exit or change",
            )
        audience = se.get("id")
        if not isinstance(audience, str | int) or isinstance(audience, bool) or not str(audience).strip():
            raise _Reject("bad_segment_event", f"segment_events[{position}] has no audience id ('id')")
        slug = se.get("slug")
        if isinstance(slug, str):
            _token(slug, f"segment_events[{position}].slug")  # size only: the slug is kept as sent
        when: datetime | None
        if kind != "change" and kind in se:
            when, when_source = parse_time(se[kind]), "segment_event"
            if when is None:
                raise _Reject(
                    "bad_timestamp",
                    f"segment_events[{position}].{kind} is not a timestamp from {_RANGE} "
                    f"(RFC 3339 or epoch seconds/milliseconds): {_show(se[kind])}",
                )
        else:
            when, when_source = fallback, fallback_source
            if when is None:  # only the receipt time was left, and it is out of range
                raise _Reject(
                    "bad_timestamp",
                    f"the record has no event time and its receipt time {_show(ctx.received_at)} "
                    f"is not from {_RANGE}",
                )
        if kind == "change" and fields is None:
            fields = _bounded_fields(data)
        audience_id = _token(audience, f"segment_events[{position}].id")
        audiences.append(
            _Audience(audience_id, slug if isinstance(slug, str) else None, kind, when, when_source)
        )
    return _Plan(idents, audiences, lytics_user_id, fields, _other_identifiers(data, ctx))


def _events(plan: _Plan, ctx: Context, out: Split) -> None:
    """The segment events and field changes of a checked record: one per identifier and segment event."""
    for ident in plan.identifiers:
        for a in plan.audiences:
            event_id = SegmentEvent.make_id(ident, a.audience_id, a.kind, a.when)
            if a.kind == "change":
                out.field_changes.append(
                    {
                        "schema_version": 1,
                        "change_id": FieldChange.make_id(ident, event_id),
                        "event_id": event_id,
                        "identifier": ident,
                        "match_field": ctx.match_field,
                        "identifiers": plan.other_identifiers,
                        "trigger_id": a.audience_id,
                        "trigger_slug": a.slug,
                        "fields": plan.fields,
                        "event_time": a.when,
                        "event_time_source": a.when_source,
                        "lytics_user_id": plan.lytics_user_id,
                        "source": ctx.source,
                        "request_id": ctx.request_id,
                    }
                )
                continue
            out.events.append(
                {
                    "schema_version": 2,
                    "event_id": event_id,
                    "identifier": ident,
                    "match_field": ctx.match_field,
                    "audience_id": a.audience_id,
                    "audience_slug": a.slug,
                    "event": a.kind,
                    "event_time": a.when,
                    "event_time_source": a.when_source,
                    "lytics_user_id": plan.lytics_user_id,
                    "identifiers": plan.other_identifiers,
                    "source": ctx.source,
                    "request_id": ctx.request_id,
                    "received_at": ctx.received_at,
                }
            )


# A JSON string (escapes included) or one structural character; everything else (numbers,
# literals, whitespace) lies between matches. Bytes of a multi-byte UTF-8 character are all >= 0x80,
# so they never look like a quote, a backslash or a bracket.
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},]', re.DOTALL)
_JSON_SPACE = b" \t\n\r"
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")
_COMMA = ord(",")


def element_spans(body: bytes) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte span of each element of the JSON array ``body``, in order.

    ``body`` must be valid JSON whose top level is an array (as ``orjson.loads`` accepted it); each
    ``body[start:end]`` is then that element's text exactly as sent, without surrounding whitespace.
    One pass over the body.
    """
    spans: list[tuple[int, int]] = []
    depth = 0
    start = 0
    for match in _JSON_TOKENS.finditer(body):
        char = body[match.start()]
        if char in _OPEN:
            depth += 1
            if depth == 1:
                start = match.end()
        elif char in _CLOSE:
            depth -= 1
            if depth == 0:
                if (span := _trimmed(body, start, match.start()))[0] < span[1]:  # not "[]"
                    spans.append(span)
                break
        elif char == _COMMA and depth == 1:
            spans.append(_trimmed(body, start, match.start()))
            start = match.end()
    return spans


def _trimmed(body: bytes, start: int, end: int) -> tuple[int, int]:
    while start < end and body[start] in _JSON_SPACE:
        start += 1
    while end > start and body[end - 1] in _JSON_SPACE:
        end -= 1
    return start, end


def _failure(exc: Exception) -> str:
    text = f"splitting this record failed: {type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else f"{text[:_MAX_ERROR_CHARS]}…"


def split_body(body: bytes, ctx: Context) -> Split:
    """Every segment event of a raw webhook body, and every record that had to be rejected.

    A record costs only itself: anything it raises, expected or not, rejects that record alone
    (``internal_error`` for the unexpected), with its original bytes.
    """
    out = Split()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        out.rejected.append(Rejected("unparsable", f"the body is not valid JSON: {exc}", None, body))
        return out
    batch = isinstance(parsed, list)
    records = parsed if batch else [parsed]
    if batch and not records:
        out.rejected.append(Rejected("empty_batch", "the body is an empty JSON array", None, body))
    if len(records) > MAX_BATCH_RECORDS:
        reason = f"the batch holds {len(records)} records (limit {MAX_BATCH_RECORDS}): send smaller batches"
        out.rejected.append(Rejected("batch_too_large", reason, None, body))
        return out
    spans: list[tuple[int, int]] | None = None  # found on the first reject only: free when all is well

    def reject(index: int, code: str, reason: str, exc: Exception | None = None) -> None:
        nonlocal spans
        original = body
        if batch:
            spans = element_spans(body) if spans is None else spans
            original = body[slice(*spans[index])]
        out.rejected.append(Rejected(code, reason, index if batch else None, original, exc))

    for index, record in enumerate(records):
        try:
            plan = _plan(record, ctx)
            made = len(out.events) + len(out.field_changes)
            if made + plan.count > MAX_EVENTS_PER_BODY:
                raise _Reject(
                    "too_many_events_per_body",
                    f"the record would make {plan.count} events and the body already made "
                    f"{made} (limit {MAX_EVENTS_PER_BODY} per body): send smaller batches",
                )
            _events(plan, ctx, out)
        except _Reject as rej:
            reject(index, rej.code, rej.reason)
        except Exception as exc:  # a bug or a library's surprise must cost this record only
            reject(index, "internal_error", _failure(exc), exc)
    return out
