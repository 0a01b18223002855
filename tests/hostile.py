"""A corpus of hostile webhook requests, drawn by hypothesis, each with the answers it may get.

Every case carries the statuses the ingress may answer (from the design's answers table: the
ingress stores any JSON object or non-empty array of objects raw and answers 200; the split agent
dead-letters what it cannot use; anything else is a 400 kept in dead-letter; 413 above the size
limit; 415 for any Content-Encoding). The strategies reach every Lytics format with wrong types
everywhere, truncated and invalid JSON, invalid UTF-8, NUL bytes, duplicate keys, deep nesting (up
to 10,000), huge numbers and strings, too long and too many identifiers (up to 100,000 values), too
many segment events, times out of range (year 1 with an offset, year 9999, huge epochs), batches whose
rejected elements are written as no serializer writes them, empty arrays and arrays of non-objects; a
few fixed cases add 50 MB bodies and gzip bombs.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SAMPLES

STORED = frozenset({200})
BAD = frozenset({400})
TOO_LARGE = frozenset({413})
ENCODED = frozenset({415})


@dataclass
class Case:
    """One request of the corpus."""

    kind: str
    body: bytes
    expect: frozenset[int]
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind} ({len(self.body)} bytes): {self.body[:120]!r}"


def _templates() -> list[bytes]:
    names = [
        "default-format-enter.json",
        "default-format-field-change.json",
        "legacy-format-enter.json",
        "cloudevents-format-enter.json",
        "default-format-exit-selected-fields.json",
    ]
    return [orjson.dumps(orjson.loads((SAMPLES / n).read_bytes())) for n in names]


TEMPLATES = _templates()

# Where a value can be replaced in a record (paths that exist in at least one template).
PATHS: list[tuple[Any, ...]] = [
    ("id",),
    ("data",),
    ("data", "email"),
    ("data", "segment_events"),
    ("data", "segment_events", 0),
    ("data", "segment_events", 0, "id"),
    ("data", "segment_events", 0, "event"),
    ("data", "segment_events", 0, "slug"),
    ("data", "segment_events", 0, "enter"),
    ("data", "first_name"),
    ("data", "_audience"),
    ("data", "_audience_action"),
    ("meta",),
    ("meta", "timestamp"),
    ("specversion",),
    ("time",),
    ("collected",),
    ("segment_events",),
    ("segment_events", 0, "enter"),
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6,
)


# Times that overflow datetime arithmetic or lie outside the accepted event times.
EXTREME_TIMES: list[Any] = [
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999-23:59",
    "1969-12-31T23:59:59Z",
    "2200-01-01T00:00:00Z",
    -1,
    2**63 - 1,
    2**64 - 1,
    1e308,
]


# String markers replaced by raw JSON text after encoding: orjson writes neither more than 254 levels
# of nesting nor integers beyond 64 bits, and the corpus needs both.
DEEP = "\x01deep:"
LITERAL = "\x01literal:"


def _nested_text(depth: int) -> bytes:
    """``depth`` levels of alternating objects and arrays around a 1."""
    opens = b"".join(b'{"n": ' if i % 2 == 0 else b"[" for i in range(depth))
    closes = b"".join(b"}" if i % 2 == 0 else b"]" for i in reversed(range(depth)))
    return opens + b"1" + closes


@st.composite
def huge_values(draw: st.DrawFn) -> Any:
    """Values that are big in some way: long strings, big numbers, deep nesting, long lists."""
    kind = draw(
        st.sampled_from(["string", "number", "nesting", "identifiers", "wide", "segment-events", "time"])
    )
    if kind == "string":
        # Mostly small; now and then over the split agent's 512 KiB limit for a change's fields.
        size = draw(st.sampled_from([257, 300, 4_000, 70_000])) if draw(st.integers(0, 9)) else 600_000
        char = draw(st.sampled_from(["x", "é", "\u0000", "\U0001f600", "@"]))
        return char * size
    if kind == "number":
        literal = draw(
            st.sampled_from(
                ["18446744073709551616", "-9223372036854775809", "1" * 300, "1e308", "-1e308", "5e-324"]
            )
        )
        return f"{LITERAL}{literal}"
    if kind == "nesting":
        return f"{DEEP}{draw(st.sampled_from([20, 200, 254, 255, 256, 600, 1000]))}"
    if kind == "identifiers":
        # Up to the 100,000 values (1.9 MB): rejected before any value is looked at.
        count = draw(st.sampled_from([0, 1, 50, 51, 200, 201, 500, 100_000]))
        return [f"user{i}@example.com" for i in range(count)]
    if kind == "segment-events":
        count = draw(st.sampled_from([2, 50, 100, 101, 8_000]))
        return [{"id": f"aud{i}", "event": "enter", "slug": f"s{i}"} for i in range(count)]
    if kind == "time":
        return draw(st.sampled_from(EXTREME_TIMES))
    return {f"k{i}": i for i in range(draw(st.sampled_from([100, 20_000])))}


def _set(record: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``record`` with ``path`` set to ``value`` when the path exists (else unchanged)."""
    node = record
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return record
    key = path[-1]
    if (isinstance(node, dict) and isinstance(key, str)) or (
        isinstance(node, list) and isinstance(key, int) and key < len(node)
    ):
        node[key] = value
    return record


@st.composite
def lytics_records(draw: st.DrawFn) -> Any:
    """A Lytics record of any format with a few values replaced by wrong or huge ones."""
    record = orjson.loads(draw(st.sampled_from(TEMPLATES)))  # a fresh copy
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        path = draw(st.sampled_from(PATHS))
        value = draw(json_values | huge_values()) if draw(st.booleans()) else draw(json_values)
        record = _set(record, path, value)
    return record


def _dumps(value: Any) -> bytes:
    """JSON text of ``value``, with every deep-nesting marker expanded."""
    text = orjson.dumps(value)
    for marker in (DEEP, LITERAL):
        while (at := text.find(b'"' + orjson.dumps(marker)[1:-1])) >= 0:
            end = text.index(b'"', at + 1)
            raw = text[at + 1 + len(orjson.dumps(marker)[1:-1]) : end]
            text = text[:at] + (_nested_text(int(raw)) if marker == DEEP else raw) + text[end + 1 :]
    return text


@st.composite
def structured_cases(draw: st.DrawFn) -> Case:
    """Valid JSON bodies: single records, batches, batches with non-objects, empty arrays."""
    shape = draw(
        st.sampled_from(["single", "batch", "single", "batch", "mixed-batch", "empty-array", "scalar"])
    )
    if shape == "empty-array":
        return Case("empty-array", b"[]", BAD)
    if shape == "scalar":
        return Case("scalar", orjson.dumps(draw(json_scalars)), BAD)
    records = [draw(lytics_records()) for _ in range(1 if shape == "single" else draw(st.integers(1, 5)))]
    if shape == "mixed-batch":
        records.insert(draw(st.integers(0, len(records))), draw(json_scalars | st.lists(json_scalars)))
    body = _dumps(records[0] if shape == "single" else records)
    # Nesting markers sit at most 6 levels down, with at most 1000 levels: within orjson's 1024.
    return Case(shape, body, BAD if shape == "mixed-batch" else STORED)


@st.composite
def byte_cases(draw: st.DrawFn) -> Case:
    """Broken bytes around valid records: truncation, invalid UTF-8, raw NUL bytes, garbage."""
    base = _dumps(draw(lytics_records()))
    kind = draw(st.sampled_from(["truncated", "invalid-utf8", "raw-nul", "garbage", "whitespace"]))
    if kind == "truncated":
        return Case(kind, base[: draw(st.integers(0, len(base) - 1))], BAD)
    if kind in ("invalid-utf8", "raw-nul"):
        # Inside a string value: after the first quote that opens a value.
        at = base.find(b'":"') + 3 if b'":"' in base else 1
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        return Case(kind, base[:at] + (junk if kind == "invalid-utf8" else b"\x00") + base[at:], BAD)
    if kind == "whitespace":
        return Case(kind, draw(st.sampled_from([b"", b" ", b"\n\t ", b"\xef\xbb\xbf{}"])), BAD)
    garbage = draw(st.binary(max_size=64))
    return Case(kind, garbage, BAD | STORED)  # random bytes are occasionally an object: {} is


@st.composite
def textual_cases(draw: st.DrawFn) -> Case:
    """JSON text that no serializer here writes: duplicate keys, escapes, big literals, deep nesting."""
    kind = draw(
        st.sampled_from(
            ["duplicate-keys", "nul-escape", "big-literal", "deep", "deep-in-record", "nan", "odd-batch"]
        )
    )
    email = draw(st.sampled_from(["a@example.com", "A@Example.com ", ""]))
    event = b'"segment_events": [{"id": "aud", "event": "enter"}]'
    if kind == "duplicate-keys":
        body = b'{"data": {"email": "x@example.com", "email": "%s", %s, %s}}' % (
            email.encode(),
            event,
            event,
        )
        return Case(kind, body, STORED)
    if kind == "nul-escape":
        return Case(kind, b'{"data": {"email": "a\\u0000b@example.com", %s}}' % event, STORED)
    if kind == "big-literal":
        literal = draw(
            st.sampled_from([b"1" * 400, b"1e400", b"-1e400", b"1" * 5000 + b".5", b"-0.0e-99999"])
        )
        body = b'{"data": {"email": %s, %s}}' % (literal, event)
        # orjson reads an out-of-range integer as a float; a double overflowing to infinity is refused.
        return Case(kind, body, BAD | STORED)
    if kind == "nan":
        return Case(kind, b'{"data": {"email": NaN, %s}}' % event, BAD)
    if kind == "odd-batch":
        # Rejected elements a re-encoding would change (duplicate keys, 1E2, escapes, spacing): the
        # dead letters must be their bytes as sent.
        good = b'{"data": {"email": "ok@example.com", %s}}' % event
        odd = [
            b'{"data": {"email": "%s", "n": 1E2, "n": -0.50e-3}}' % email.encode(),
            b'{ "data" :{"email":"\\u00e9\\"]},[{\\\\",\n "segment_events" : [ ] } }',
            b'{"data": {"email": "x@example.com", "segment_events": [{"id": "a", "event": "enter", '
            b'"enter": "0001-01-01T00:00:00+01:00"}]}}',
        ]
        elements = [good, *draw(st.permutations(odd))[: draw(st.integers(1, 3))]]
        return Case(kind, b"[\n  " + b" ,\r\n\t".join(draw(st.permutations(elements))) + b"\n] ", STORED)
    depth = draw(st.sampled_from([255, 256, 1000, 1024, 1025, 10_000]))
    nested = b"[" * depth + b"]" * depth
    if kind == "deep":
        # An array nested `depth` deep is not an object at the top: a 400 at any depth.
        return Case(kind, nested, BAD)
    body = (
        b'{"data": {"email": "deep@example.com", "x": %s, "segment_events": [{"id": "a", "event": "%s"}]}}'
        % (
            nested,
            draw(st.sampled_from([b"enter", b"change"])),
        )
    )
    return Case(kind, body, STORED if depth + 2 <= 1024 else BAD)


@st.composite
def encoded_cases(draw: st.DrawFn) -> Case:
    """Compressed bodies (small ones; the bombs are fixed cases): any Content-Encoding is a 415."""
    body = _dumps(draw(lytics_records()))
    encoding = draw(st.sampled_from(["gzip", "deflate", "GZIP", "br", "gzip, identity", "x-custom"]))
    packed = zlib.compress(body) if encoding == "deflate" else gzip.compress(body)
    return Case("encoded", packed, ENCODED, {"Content-Encoding": encoding})


@st.composite
def hostile_cases(draw: st.DrawFn) -> Case:
    """One case of any family (drawn flat: hypothesis's one_of leans towards some branches)."""
    family = draw(st.sampled_from([structured_cases, byte_cases, textual_cases, encoded_cases]))
    return draw(family())


@cache
def _bomb() -> bytes:
    return gzip.compress(b"\0" * (256 << 20), compresslevel=9)  # 256 MiB of zeros in ~250 KB


def fixed_cases() -> list[Case]:
    """The cases too big to draw thousands of: 50 MB and 10 MB bodies, and gzip bombs."""
    fifty = 50 * 1024 * 1024
    big_record = b'{"data": {"email": "big@example.com", "pad": "' + b"x" * fifty + b'"}}'
    return [
        Case("50MB", big_record, TOO_LARGE),
        Case("50MB-array", b"[" + b"{}," * (fifty // 3) + b"{}]", TOO_LARGE),
        # Just under the 10 MiB limit: the most objects a body can make the ingress parse.
        Case("10MB-of-empty-objects", b"[" + b"{}," * 3_400_000 + b"{}]", STORED),
        Case("gzip-bomb", _bomb(), ENCODED, {"Content-Encoding": "gzip"}),
        Case("gzip-bomb-as-identity", _bomb(), BAD, {"Content-Encoding": "identity"}),
    ]


PER_EXAMPLE = 10  # cases drawn per hypothesis example: its per-example overhead dominates otherwise


def draw_corpus(count: int) -> list[Case]:
    """``count`` cases drawn by hypothesis (seeded by pytest's --hypothesis-seed) plus the fixed ones."""
    drawn: list[Case] = []

    @settings(
        max_examples=-(-count // PER_EXAMPLE),
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(hostile_cases(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def collect(cases: list[Case]) -> None:
        drawn.extend(cases)

    collect()
    return drawn[:count] + fixed_cases()
