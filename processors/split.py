"""Split a Lytics webhook body into per-user audience events (pure functions, no I/O).

Every Lytics format is read leniently — customers reshape bodies with templates — and every record
that cannot be used comes back as a ``Rejected`` with a reason a person can act on:

- default ``{id, data: {..., segment_events: [...]}, meta: {timestamp}}``
- legacy ``{id, data: {_audience, _audience_action, _audience_friendly, ...}, segment_events, collected}``
- CloudEvents ``{specversion, id, time, data: {..., segment_events}}`` (structured or batch)
- field change: ``segment_events[].event == "change"`` (no enter/exit)
- any of these batched as a JSON array.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.records import FieldChange, SegmentEvent

MAX_IDENTIFIER_BYTES = 256  # Lytics' published limit for a profile identifier
MAX_IDENTIFIERS = 50  # Lytics' published limit of stitched identifiers
# An audience id, slug or Lytics user id is a short token (32 hex characters in Lytics); a larger one
# would make segment events over the broker's default record size (1 MiB), which ends the worker.
MAX_TOKEN_BYTES = 256
# The user fields a field-change event carries; bounded for the same reason.
MAX_FIELDS_BYTES = 512 * 1024
# Lytics batches hold hundreds of users. A 10 MiB body of 3 million empty objects would otherwise
# become 3 million dead letters (minutes of work for one request); it is kept whole instead.
MAX_BATCH_RECORDS = 10_000
_EVENTS = {"enter": "enter", "entered": "enter", "exit": "exit", "exited": "exit", "change": "change"}


@dataclass(frozen=True)
class Rejected:
    """A record that goes to the dead-letter topic, with a reason code and a sentence."""

    code: str
    reason: str
    index: int | None  # position in a batch, None for a single-object body
    record: bytes  # the original bytes of a single-object body, or the batch element


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


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 string (any fraction digits, ``Z`` or offset) or epoch seconds/ms, as aware UTC."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        seconds = value / 1000 if abs(value) > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str) and value:
        text = value.strip()
        if "." in text:  # Python keeps at most 6 fraction digits; Lytics sends 9.
            head, _, rest = text.partition(".")
            digits = len(rest) - len(rest.lstrip("0123456789"))
            text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}" if digits else f"{head}{rest}"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    return None


def normalize_identifier(value: str, match_field: str) -> str:
    """Trim; lower-case e-mail addresses (by field name or by shape)."""
    text = value.strip()
    if "@" in text or "email" in match_field.lower():
        text = text.lower()
    return text


def _identifiers(raw: Any, match_field: str) -> list[str]:
    export_hint = (
        f"add '{match_field}' to the Export Fields of the Lytics webhook job, "
        "or set RELAY_MATCH_FIELD to a field the job exports"
    )
    if raw is None or raw == "" or raw == []:
        raise _Reject("missing_identifier", f"the record has no '{match_field}' in its data: {export_hint}")
    values = raw if isinstance(raw, list) else [raw]
    out: list[str] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Reject(
                "bad_identifier",
                f"'{match_field}' holds a {type(value).__name__}; expected a string, a number or a list",
            )
        ident = normalize_identifier(str(value), match_field)
        if not ident:
            continue
        if len(ident.encode()) > MAX_IDENTIFIER_BYTES:
            raise _Reject(
                "identifier_too_long",
                f"a '{match_field}' value has {len(ident.encode())} bytes (limit {MAX_IDENTIFIER_BYTES})",
            )
        if ident not in out:
            out.append(ident)
    if not out:
        raise _Reject("missing_identifier", f"'{match_field}' is empty in the record's data: {export_hint}")
    if len(out) > MAX_IDENTIFIERS:
        raise _Reject(
            "too_many_identifiers",
            f"'{match_field}' holds {len(out)} identifiers; Lytics stitches at most {MAX_IDENTIFIERS}",
        )
    return out


def _segment_events(record: dict[str, Any], data: dict[str, Any]) -> list[Any]:
    for holder in (data, record):
        found = holder.get("segment_events")
        if isinstance(found, list) and found:
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


def _fallback_time(record: dict[str, Any], received_at: datetime) -> tuple[datetime, str]:
    meta = record.get("meta")
    if isinstance(meta, dict) and (t := parse_time(meta.get("timestamp"))):
        return t, "meta"
    if "specversion" in record and (t := parse_time(record.get("time"))):
        return t, "cloudevent"
    if t := parse_time(record.get("collected")):
        return t, "collected"
    return received_at, "received"


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


def split_record(record: Any, ctx: Context) -> Iterator[dict[str, Any]]:
    """The segment events of one Lytics user record; raises ``_Reject`` when it cannot be used."""
    if not isinstance(record, dict):
        raise _Reject("not_an_object", f"a Lytics user record is a JSON object, got {type(record).__name__}")
    data = record.get("data")
    if not isinstance(data, dict):
        # A template may flatten the record; then the user fields sit at the top.
        data = record
    idents = _identifiers(data.get(ctx.match_field, record.get(ctx.match_field)), ctx.match_field)
    raw_events = _segment_events(record, data)
    fallback, fallback_source = _fallback_time(record, ctx.received_at)
    user_id = record.get("id")
    lytics_user_id = (
        _token(user_id, "the record's 'id'")
        if isinstance(user_id, str | int) and not isinstance(user_id, bool)
        else None
    )
    fields: dict[str, Any] | None = None
    parsed: list[tuple[str, str | None, str, datetime, str]] = []
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
        if kind == "change":
            when, when_source = fallback, fallback_source
            if fields is None:
                fields = _bounded_fields(data)
        elif kind in se:
            stamp = parse_time(se[kind])
            if stamp is None:
                raise _Reject(
                    "bad_timestamp",
                    f"segment_events[{position}].{kind} is not a timestamp: {_show(se[kind])}",
                )
            when, when_source = stamp, "segment_event"
        else:
            when, when_source = fallback, fallback_source
        audience_id = _token(audience, f"segment_events[{position}].id")
        parsed.append((audience_id, slug if isinstance(slug, str) else None, kind, when, when_source))
    identifiers = _other_identifiers(data, ctx)
    for ident in idents:
        for audience_id, slug, kind, when, when_source in parsed:
            event_id = SegmentEvent.make_id(ident, audience_id, kind, when)
            if kind == "change":
                yield {
                    "schema_version": 1,
                    "change_id": FieldChange.make_id(ident, event_id),
                    "event_id": event_id,
                    "identifier": ident,
                    "match_field": ctx.match_field,
                    "identifiers": identifiers,
                    "trigger_id": audience_id,
                    "trigger_slug": slug,
                    "fields": fields,
                    "event_time": when,
                    "event_time_source": when_source,
                    "lytics_user_id": lytics_user_id,
                    "source": ctx.source,
                    "request_id": ctx.request_id,
                }
                continue
            yield {
                "schema_version": 2,
                "event_id": event_id,
                "identifier": ident,
                "match_field": ctx.match_field,
                "audience_id": audience_id,
                "audience_slug": slug,
                "event": kind,
                "event_time": when,
                "event_time_source": when_source,
                "lytics_user_id": lytics_user_id,
                "identifiers": identifiers,
                "source": ctx.source,
                "request_id": ctx.request_id,
                "received_at": ctx.received_at,
            }


def split_body(body: bytes, ctx: Context) -> Split:
    """Every segment event of a raw webhook body, and every record that had to be rejected."""
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
    for index, record in enumerate(records):
        try:
            for item in split_record(record, ctx):
                (out.field_changes if "change_id" in item else out.events).append(item)
        except _Reject as rej:
            reason, original = rej.reason, body
            if batch:
                try:
                    original = orjson.dumps(record)
                except orjson.JSONEncodeError:  # deeper than orjson writes: keep the whole body
                    reason += " (the element cannot be re-encoded alone; the whole batch is kept)"
            out.rejected.append(Rejected(rej.code, reason, index if batch else None, original))
    return out
