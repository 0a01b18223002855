"""Sinks: the engine against a real broker and fake destinations, plus the pure pieces."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from audience_relay.kafkautil import committed_offsets, group_lag, produce_all, read_topic
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import free_port
from devtools.processes import Component, start_worker
from devtools.wait import until, until_async
from processors.membership import fold
from schemas.records import (
    AnalyticsFieldsEvent,
    AnalyticsMembershipEvent,
    DeliveryOutcome,
    FieldChange,
    SegmentEvent,
)
from sinks import metrics as sink_metrics
from sinks.base import Delivered, GiveUp, Item, RetryAfter, idempotency_key, lytics_record
from sinks.batching import METADATA_BUDGET, Window, decode
from sinks.engine import SinkEngine, group_id
from sinks.http import classify, retry_after_seconds
from sinks.pacing import retry_delay
from sinks.policy import Policy, Send, Skip, decide
from sinks.replay import replay_dead_letters
from sinks.resync import resync
from sinks.run import serve
from sinks.scrub import excerpt, secret_variants
from tests.conftest import SAMPLES, make_settings, start_ingress
from tests.fakes import Answer, FakeDestination

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def lytics_id(n: int) -> str:
    """The Lytics ID (``_id``) of test user ``n``."""
    return f"4f1b{n:012x}"


def make_changes(users: int, audiences: int = 2) -> list[dict[str, Any]]:
    """Real MembershipChange records, made by the membership function from enter/exit events, with
    the ``identifiers`` the processors keep (the Lytics ID under ``_id``; the match field is the key)."""
    out: list[dict[str, Any]] = []
    for n in range(users):
        ident = f"user{n}@example.com"
        events = []
        for a in range(audiences):
            for kind, sec in (("enter", 10 + a), ("exit", 100 + a)) if n % 3 == 0 else (("enter", 10 + a),):
                when = T0 + timedelta(seconds=sec)
                events.append(
                    {
                        "event_id": SegmentEvent.make_id(ident, f"aud-{a}", kind, when),
                        "identifier": ident,
                        "match_field": "email",
                        "audience_id": f"aud-{a}",
                        "audience_slug": f"slug-{a}",
                        "event": kind,
                        "event_time": when,
                        "lytics_user_id": str(n),
                        "identifiers": {"_id": lytics_id(n)},
                        "source": "default",
                        "request_id": f"r{n}",
                    }
                )
        out.extend(fold(events)[1])
    return out


async def publish_changes(settings: Settings, changes: list[dict[str, Any]]) -> None:
    topics = TopicNames.from_settings(settings)
    await produce_all(
        settings.kafka_bootstrap_servers,
        topics.membership_changes,
        [
            (c["identifier"].encode(), orjson.dumps(c), [("change-id", c["change_id"].encode())])
            for c in changes
        ],
    )


def sink_settings(bootstrap: str, pushly: FakeDestination, odp: FakeDestination, **extra: object) -> Settings:
    return make_settings(
        bootstrap,
        pushly_webhook_url=pushly.url,
        pushly_api_key="pushly-secret-key",
        odp_webhook_url=odp.url,
        odp_auth_token="Bearer odp-secret-token",
        **{
            "odp_flush_seconds": 0.5,
            "sink_max_backoff_seconds": 0.5,
            "sink_min_retry_seconds": 0.1,
            **extra,
        },
    )


class Running:
    def __init__(self, settings: Settings, name: str) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(serve(settings, name, self.stop))

    async def close(self) -> SinkEngine:
        self.stop.set()
        return await self.task


def ids(received: list[Any]) -> list[str]:
    out = []
    for r in received:
        for record in r.body if isinstance(r.body, list) else [r.body]:
            out.append(record)
    return out


# --- pure pieces ------------------------------------------------------------------------------


def test_classify_answers() -> None:
    assert classify(200, None, "", [400]) == Delivered(200)
    assert classify(204, None, "", [400]) == Delivered(204)
    assert classify(400, None, "bad", [400, 404, 413]) == GiveUp("the destination answered 400", 400, "bad")
    assert classify(500, None, "", [400]) == RetryAfter("the destination answered 500", None)
    assert classify(429, "7", "", [400]) == RetryAfter("the destination answered 429", 7.0)
    assert classify(401, None, "", [401]) == GiveUp("the destination answered 401", 401, "")


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_lytics_format_and_idempotency_key() -> None:
    change = make_changes(1, audiences=1)[0]  # user0 enters (and later exits)
    record = lytics_record(Item(change, "4f1b0"), "_id")
    assert record["data"]["_id"] == "4f1b0" and record["id"] == "0"
    assert record["data"]["segment_events"] == [
        {"id": "aud-0", "event": "enter", "enter": change["event_time"], "slug": "slug-0"}
    ]
    assert idempotency_key([change]) == idempotency_key([dict(change)])
    assert idempotency_key([change]) != idempotency_key([change, change])
    assert idempotency_key([change], "resync") != idempotency_key([change])


def test_policy_picks_hashes_and_filters() -> None:
    odp = Policy("odp", "_id", "_id", "none", include=("aud-*",), exclude=("*-test", "vip"))
    change = {
        "change_id": "c",
        "identifier": "a@b.c",
        "match_field": "email",
        "identifiers": {"_id": "4f1b", "phones": [" 555 ", "", "556"]},
        "audience_id": "aud-1",
        "audience_slug": "vip",
    }
    assert decide(odp, change) == Skip(
        "filtered", "audience not in the audience lists of odp"
    )  # exclude wins
    assert decide(odp, {**change, "audience_slug": "all"}) == Send("4f1b")
    assert decide(odp, {**change, "audience_id": "other", "audience_slug": None}).outcome == "filtered"
    lacking = decide(odp, {**change, "identifiers": {}, "audience_slug": None})
    assert (
        isinstance(lacking, Skip)
        and lacking.outcome == "unknown_identifier"
        and "Lytics ID" in lacking.reason
    )
    hashed = Policy("pushly", "email", "email", "sha256")
    assert decide(hashed, {**change, "identifier": " A@B.c "}) == Send(hashlib.sha256(b"a@b.c").hexdigest())
    assert decide(Policy("x", "phones", "phones"), change) == Send(["555", "556"])
    assert decide(Policy("x", "email", "email"), change, field_change=True).outcome == "filtered"
    assert isinstance(
        decide(Policy("x", "email", "email", field_changes=True), change, field_change=True), Send
    )


@dataclass(frozen=True)
class Rec:
    offset: int
    key: bytes | None


def recs(keys: str, start: int = 0) -> list[Rec]:
    """One record per character: its key is that character."""
    return [Rec(start + i, k.encode()) for i, k in enumerate(keys)]


def test_window_batches_never_share_an_identifier_while_open_and_keep_its_order() -> None:
    w = Window(0)
    w.add(recs("aabcadbe"), now=0.0)
    first, _ = w.form(batch_size=3, max_open=5, flush_seconds=1.0, now=0.0)
    assert [[r.offset for r in b.records] for b in first] == [[0, 1, 2], [3, 5, 7]]
    # b (offset 3) is taken by the second batch; a's and b's later changes wait for their batch.
    assert first[1].skipped == (4, 6) and (first[1].start, first[1].end) == (3, 8)
    assert [r.offset for r, _ in w.pending] == [4, 6]
    assert w.form(3, 5, 1.0, now=10.0) == ([], None)  # both identifiers are busy
    w.finish(first[0])
    again, _ = w.form(3, 5, 1.0, now=10.0)  # a and b are free again, in their order
    assert [[r.offset for r in b.records] for b in again] == [[4, 6]]
    assert w.base == 3  # batch two is still open


def test_window_waits_for_the_flush_interval_unless_the_batch_is_full() -> None:
    w = Window(0)
    w.add(recs("ab"), now=5.0)
    assert w.form(batch_size=3, max_open=2, flush_seconds=1.0, now=5.5) == ([], 6.0)
    formed, _ = w.form(3, 2, 1.0, now=6.0)
    assert [r.offset for r in formed[0].records] == [0, 1]


def test_window_commit_metadata_re_forms_the_open_batches_exactly() -> None:
    w = Window(100)
    w.add(recs("abacdbefgh", start=100), now=0.0)
    formed, _ = w.form(batch_size=3, max_open=3, flush_seconds=0.0, now=0.0)
    shapes = [[r.offset for r in b.records] for b in formed]
    # a's two changes go together (in order, in one request); b's second waits for the first.
    assert shapes == [[100, 101, 102], [103, 104, 106], [107, 108, 109]]
    assert formed[1].skipped == (105,)
    w.finish(formed[1])  # a later batch finishes before an older one
    offset, metadata = w.position() or (0, "")
    assert offset == 100 and metadata.startswith("rb1|")
    # A new owner (after a crash) reads the same records from the committed offset.
    again = Window(offset, decode(metadata, offset))
    assert again.add(recs("abacdbefgh", start=100), now=1.0) == 3  # batch two's: not sent again
    assert again.form(3, 3, 0.0, now=1.0) == ([], None)  # nothing new before the old batches are done
    recovered = again.ready_recovered()
    assert [[r.offset for r in b.records] for b in recovered] == [shapes[0], shapes[2]]
    assert [r.offset for r, _ in again.pending] == [105]
    for b in recovered:
        again.finish(b)
    assert again.position() == (105, "rb1|1+4|")  # 106..109 are done above the committed 105
    assert decode("someone else's metadata", 5) is None and decode("", 5) is None


def test_window_metadata_stays_within_its_budget() -> None:
    w = Window(0)
    w.add([Rec(i, f"k{i}".encode()) for i in range(0, 4000, 2)], now=0.0)
    opened = []
    while True:
        formed, _ = w.form(batch_size=1, max_open=10_000, flush_seconds=0.0, now=0.0)
        if not formed:
            break
        opened += formed
        for b in formed[1:]:
            w.finish(b)  # every batch but the oldest finishes: the done offsets fragment
    position = w.position()
    assert position is not None and len(position[1]) <= METADATA_BUDGET
    assert w.pending  # the window stopped widening instead of writing too much


# --- against the broker -----------------------------------------------------------------------


async def test_each_destination_gets_exactly_the_changes_in_its_format(kafka_bootstrap: str) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(kafka_bootstrap, pushly, odp)
    await create_topics(settings)
    changes = make_changes(400)  # 400 users x 2 audiences, a third of them exit again
    await publish_changes(settings, changes)
    sinks = [Running(settings, name) for name in ("pushly", "odp", "analytics")]
    topics = TopicNames.from_settings(settings)
    try:
        await until(lambda: len(ids(pushly.delivered())) >= len(changes), 120, "pushly deliveries")
        await until(lambda: len(ids(odp.delivered())) >= len(changes), 120, "odp deliveries")

        async def analytics_done() -> bool:
            return len(await read_topic(kafka_bootstrap, topics.analytics)) >= len(changes)

        await until_async(analytics_done, 120, "analytics records")
    finally:
        for s in sinks:
            await s.close()
        await pushly.stop()
        await odp.stop()
    expected = sorted((c["identifier"], c["audience_id"], c["change"]) for c in changes)
    by_lytics_id = sorted((c["identifiers"]["_id"], c["audience_id"], c["change"]) for c in changes)

    def seen(records: list[dict[str, Any]], field: str) -> list[tuple[str, str, str]]:
        return sorted(
            (
                r["data"][field],
                r["data"]["segment_events"][0]["id"],
                "entered" if r["data"]["segment_events"][0]["event"] == "enter" else "exited",
            )
            for r in records
        )

    # Pushly: one user per request (batching off), matching field "email", X-API-KEY.
    assert all(isinstance(r.body, dict) for r in pushly.requests)
    assert seen(ids(pushly.requests), "email") == expected
    assert {r.headers["X-API-KEY"] for r in pushly.requests} == {"pushly-secret-key"}
    assert len({r.headers["Idempotency-Key"] for r in pushly.requests}) == len(changes)
    # ODP: arrays of at most 300, the Lytics ID under _id, the configured auth header.
    assert all(isinstance(r.body, list) and 1 <= len(r.body) <= 300 for r in odp.requests)
    assert any(len(r.body) > 1 for r in odp.requests)
    assert seen(ids(odp.requests), "_id") == by_lytics_id
    assert {r.headers["Authorization"] for r in odp.requests} == {"Bearer odp-secret-token"}
    # Analytics: one CloudEvent per change, keyed by identifier, with time in audience on exit.
    events = [orjson.loads(r.value) for r in await read_topic(kafka_bootstrap, topics.analytics)]
    assert sorted(e["id"] for e in events) == sorted(c["change_id"] for c in changes)
    exits = [e for e in events if e["type"] == "com.audience-relay.membership.exited"]
    assert exits and all(e["data"]["seconds_in_audience"] == 90.0 for e in exits)
    assert {e["specversion"] for e in events} == {"1.0"}


async def test_failing_destination_retries_honours_retry_after_and_never_delays_another(
    kafka_bootstrap: str,
) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    pushly.script = [Answer(500)] * 4 + [Answer(429, {"Retry-After": "4"})]
    settings = sink_settings(kafka_bootstrap, pushly, odp, pushly_batch_size=5)
    await create_topics(settings)
    changes = make_changes(600, audiences=1)  # more than a partition buffers while Pushly waits
    await publish_changes(settings, changes)
    started = time.monotonic()
    paused_before = sink_metrics.PAUSED_SECONDS.labels("pushly")._value.get()
    sinks = [Running(settings, "pushly"), Running(settings, "odp")]
    try:
        await until(lambda: len(ids(odp.delivered())) >= len(changes), 60, "odp deliveries")
        odp_done = time.monotonic()
        await until(lambda: len(ids(pushly.delivered())) >= len(changes), 120, "pushly deliveries")
    finally:
        for s in sinks:
            await s.close()
        await pushly.stop()
        await odp.stop()
    statuses = [r.status for r in pushly.requests]
    assert statuses[:5] == [500, 500, 500, 500, 429] and 200 in statuses
    answered_429 = next(r.at for r in pushly.requests if r.status == 429)
    started_after = [a.at for a in pushly.arrivals if a.at > answered_429]
    assert min(started_after) - answered_429 >= 4.0  # Retry-After honoured by every batch
    first_pushly_success = min(r.at for r in pushly.delivered())
    assert odp_done < first_pushly_success  # ODP was not held back by Pushly's trouble
    # No spinning: each failure cost exactly one retry of its batch, and partitions were paused.
    assert len(pushly.requests) == len(pushly.delivered()) + 5
    assert sum(len(r.body) for r in pushly.delivered()) == len(changes)
    assert sink_metrics.PAUSED_SECONDS.labels("pushly")._value.get() > paused_before
    print(
        f"odp drained {odp_done - started:.2f}s after start; pushly's first success at "
        f"{first_pushly_success - started:.2f}s"
    )
    assert sorted(r["data"]["email"] for r in ids(pushly.delivered())) == sorted(
        c["identifier"] for c in changes
    )


async def test_refused_batch_is_dead_lettered_then_replayed(kafka_bootstrap: str) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    pushly.default = Answer(400, body='{"error": "unknown field, key pushly-secret-key"}')
    settings = sink_settings(kafka_bootstrap, pushly, odp)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    changes = make_changes(3, audiences=1)
    await publish_changes(settings, changes)
    sink = Running(settings, "pushly")

    async def dead_lettered() -> bool:
        return len(await read_topic(kafka_bootstrap, topics.dead_letter)) >= len(changes)

    try:
        await until_async(dead_lettered, 60, "dead-lettered changes")
    finally:
        await sink.close()
    dead = await read_topic(kafka_bootstrap, topics.dead_letter)
    for record in dead:
        headers = dict(record.headers)
        assert headers["sink"] == b"pushly" and headers["response-status"] == b"400"
        assert b"unknown field" in headers["response-excerpt"]
        assert b"pushly-secret-key" not in b"".join(headers.values())  # scrubbed
    assert sorted(orjson.loads(r.value)["change_id"] for r in dead) == sorted(c["change_id"] for c in changes)
    # Issue 13.5: a replay while the destination still refuses loses nothing: each refused change
    # goes back to the dead-letter topic (one more replay attempt, the new answer, scrubbed) ...
    still = await replay_dead_letters(settings, "pushly", progress=False)
    assert (still.delivered, still.refused, still.superseded) == (0, len(changes), 0)
    again = await read_topic(kafka_bootstrap, topics.dead_letter, since=await end_offsets_of(dead))
    assert sorted(orjson.loads(r.value)["change_id"] for r in again) == sorted(
        c["change_id"] for c in changes
    )
    for record in again:
        headers = dict(record.headers)
        assert headers["replay-attempts"] == b"1" and headers["sink"] == b"pushly"
        assert b"pushly-secret-key" not in b"".join(headers.values())
    # ... and once the destination is fixed, the next replay delivers every one; then nothing is left.
    pushly.default = Answer(200)
    fixed = await replay_dead_letters(settings, "pushly", progress=False)
    assert (fixed.delivered, fixed.refused) == (len(changes), 0)
    assert sorted(r.body["data"]["email"] for r in pushly.delivered()) == sorted(
        c["identifier"] for c in changes
    )
    done = await replay_dead_letters(settings, "pushly", progress=False)
    assert (done.delivered, done.refused, done.superseded) == (0, 0, 0)
    await pushly.stop()
    await odp.stop()


async def end_offsets_of(records: list[Any]) -> dict[int, int]:
    """Partition -> the offset after the last of ``records``."""
    out: dict[int, int] = {}
    for r in records:
        out[r.partition] = max(out.get(r.partition, 0), r.offset + 1)
    return out


def user_events(ident: str, steps: list[tuple[str, int]], audience: str = "aud-0") -> list[dict[str, Any]]:
    """Segment events of one user: (enter|exit, seconds after T0) in one audience."""
    out = []
    for kind, sec in steps:
        when = T0 + timedelta(seconds=sec)
        out.append(
            {
                "event_id": SegmentEvent.make_id(ident, audience, kind, when),
                "identifier": ident,
                "match_field": "email",
                "audience_id": audience,
                "audience_slug": f"slug-{audience}",
                "event": kind,
                "event_time": when,
                "lytics_user_id": f"lid-{ident}",
                "source": "default",
                "request_id": f"r-{ident}-{sec}",
            }
        )
    return out


async def publish_states(settings: Settings, states: list[dict[str, Any]]) -> None:
    """MembershipState records on the compacted membership topic, keyed identifier \\x1f audience."""
    topics = TopicNames.from_settings(settings)
    await produce_all(
        settings.kafka_bootstrap_servers,
        topics.membership,
        [(f"{s['identifier']}\x1f{s['audience_id']}".encode(), orjson.dumps(s), []) for s in states],
    )


def last_word(received: list[Any], field: str = "email") -> dict[tuple[str, str], str]:
    """(identifier, audience) -> the last event a destination accepted for it."""
    out: dict[tuple[str, str], str] = {}
    for r in received:
        for record in r.body if isinstance(r.body, list) else [r.body]:
            for se in record["data"]["segment_events"]:
                out[(record["data"][field], se["id"])] = se["event"]
    return out


async def test_replay_skips_changes_a_newer_change_superseded(kafka_bootstrap: str) -> None:
    """Issue 13.6: enter refused and dead-lettered, the later exit delivered: replay must not send
    the enter (the destination's last word would be "enter" for a user who left)."""
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    refuse = {("a@example.com", "enter"), ("b@example.com", "enter")}

    def answer(body: Any) -> Answer:
        se = body["data"]["segment_events"][0]
        return Answer(400) if (body["data"]["email"], se["event"]) in refuse else Answer(200)

    pushly.decide = answer
    settings = sink_settings(kafka_bootstrap, pushly, odp)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    # a enters (refused) then exits (delivered); b enters (refused) and stays.
    states_a, changes_a = fold(user_events("a@example.com", [("enter", 10), ("exit", 20)]))
    states_b, changes_b = fold(user_events("b@example.com", [("enter", 10)]))
    await publish_changes(settings, changes_a + changes_b)
    await publish_states(settings, [*states_a.values(), *states_b.values()])
    sink = Running(settings, "pushly")

    async def settled() -> bool:
        return (
            len(await read_topic(kafka_bootstrap, topics.dead_letter)) >= 2 and len(pushly.delivered()) >= 1
        )

    try:
        await until_async(settled, 60, "two dead letters and one delivery")
    finally:
        await sink.close()
    assert last_word(pushly.delivered()) == {("a@example.com", "aud-0"): "exit"}
    pushly.decide = None  # the destination is fixed
    report = await replay_dead_letters(settings, "pushly", progress=False)
    assert (report.delivered, report.refused, report.superseded) == (1, 0, 1)
    assert last_word(pushly.delivered()) == {
        ("a@example.com", "aud-0"): "exit",
        ("b@example.com", "aud-0"): "enter",
    }
    await pushly.stop()
    await odp.stop()


def test_a_redirect_is_an_answer_not_a_delivery() -> None:
    moved = classify(302, None, "", [400], "https://elsewhere.example:8443/steal?token=abc")
    assert isinstance(moved, RetryAfter)
    assert "https://elsewhere.example:8443" in moved.reason and "token" not in moved.reason
    refused = classify(301, None, "", [301], "/v2/hook")
    assert isinstance(refused, GiveUp) and refused.status == 301


async def test_redirects_are_never_followed(kafka_bootstrap: str) -> None:
    """Issue 13.7: a 302/307 to another origin is not followed (no GET without body counted as
    delivered, no credential sent there); it is retried until the destination accepts the POST."""
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    elsewhere = await FakeDestination().start()
    pushly.script = [Answer(302, {"Location": f"{elsewhere.url}?from=pushly"})] * 3
    odp.script = [Answer(307, {"Location": f"{elsewhere.url}?from=odp"})] * 2
    settings = sink_settings(kafka_bootstrap, pushly, odp)
    await create_topics(settings)
    changes = make_changes(5, audiences=1)
    await publish_changes(settings, changes)
    sinks = [Running(settings, "pushly"), Running(settings, "odp")]
    try:
        await until(lambda: len(ids(pushly.delivered())) >= len(changes), 60, "pushly deliveries")
        await until(lambda: len(ids(odp.delivered())) >= len(changes), 60, "odp deliveries")
    finally:
        engines = [await s.close() for s in sinks]
        await elsewhere.stop()
        await pushly.stop()
        await odp.stop()
    assert elsewhere.arrivals == []  # nothing, and no credential, reached the other origin
    assert {r.method for r in pushly.requests + odp.requests} == {"POST"}
    assert all(r.body for r in pushly.requests + odp.requests)
    assert [r.status for r in pushly.requests[:3]] == [302, 302, 302]
    assert [e.delivered for e in engines] == [len(changes), len(changes)]  # no redirect counted
    assert sorted(r["data"]["email"] for r in ids(pushly.delivered())) == sorted(
        c["identifier"] for c in changes
    )


def test_every_retry_wait_has_a_floor_and_the_backoff_still_grows() -> None:
    rng = random.Random(7)
    assert retry_delay(1, 0.0, 1.0, 60, rng) >= 1.0  # Retry-After: 0
    assert retry_delay(1, None, 1.0, 60, rng) >= 1.0  # jitter may draw 0
    assert retry_delay(1, 30.0, 1.0, 60, rng) >= 30.0  # a longer Retry-After is honoured
    assert retry_delay(1, 10_000.0, 1.0, 60, rng) <= 600  # ... up to ten backoff caps
    late = [retry_delay(12, 0.0, 1.0, 60, random.Random(s)) for s in range(50)]
    assert max(late) > 10  # "now" again and again: the backoff still applies


async def test_retry_after_zero_or_in_the_past_is_floored(kafka_bootstrap: str) -> None:
    """Issue 13.9: Retry-After 0 or a past date made 10,395 requests in 3 s for one change."""
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    pushly.default = Answer(429, {"Retry-After": "0"})
    odp.default = Answer(503, {"Retry-After": "Wed, 01 Jan 2020 00:00:00 GMT"})
    settings = sink_settings(kafka_bootstrap, pushly, odp, sink_min_retry_seconds=1.0)
    await create_topics(settings)
    one = [c for c in make_changes(2, audiences=1) if c["identifier"] == "user1@example.com"]
    await publish_changes(settings, one)
    sinks = [Running(settings, "pushly"), Running(settings, "odp")]
    try:
        await until(lambda: bool(pushly.requests and odp.requests), 60, "the first attempts")
        window_end = max(pushly.requests[0].at, odp.requests[0].at) + 3.0
        await until(lambda: time.monotonic() > window_end, 10, "three seconds of retries")
        for fake in (pushly, odp):
            first = fake.requests[0].at
            in_3s = [r for r in fake.requests if r.at <= first + 3.0]
            assert len(in_3s) <= 4, f"{len(in_3s)} requests in 3 s for one change"
        pushly.default = odp.default = Answer(200)
        await until(lambda: bool(pushly.delivered() and odp.delivered()), 30, "delivery once accepted")
    finally:
        for s in sinks:
            await s.close()
        await pushly.stop()
        await odp.stop()


def test_excerpt_scrubs_the_whole_answer_before_cutting_it() -> None:
    secrets = secret_variants(["pushly-secret-key"])
    body = "x" * 490 + "pushly-secret-key and more"
    cut = excerpt(body, secrets)
    assert cut == ("x" * 490 + "*** and more")[:500] and "pushly-sec" not in cut
    assert excerpt("short pushly-secret-key", secrets) == "short ***"


async def test_a_secret_straddling_the_excerpt_cut_never_reaches_the_dead_letter(
    kafka_bootstrap: str,
) -> None:
    """Issue 13.11: the excerpt was cut to 500 characters before scrubbing: a key cut in half was
    not recognised and its first half landed in the dead-letter headers."""
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(kafka_bootstrap, pushly, odp)
    key = settings.pushly_api_key.get_secret_value() if settings.pushly_api_key else ""
    pushly.default = Answer(400, body="e" * 490 + key + " was refused")
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    changes = make_changes(2, audiences=1)
    await publish_changes(settings, changes)
    sink = Running(settings, "pushly")

    async def dead_lettered() -> bool:
        return len(await read_topic(kafka_bootstrap, topics.dead_letter)) >= len(changes)

    try:
        await until_async(dead_lettered, 60, "dead-lettered changes")
    finally:
        await sink.close()
        await pushly.stop()
        await odp.stop()
    for record in await read_topic(kafka_bootstrap, topics.dead_letter):
        headers = dict(record.headers)
        shown = headers["response-excerpt"].decode()
        assert shown.startswith("e" * 490) and len(shown) == 500
        assert key[:8] not in b"".join(headers.values()).decode()  # not even its first half


async def test_batch_size_1_is_not_held_back_by_the_fetch_loop(kafka_bootstrap: str) -> None:
    """Issue 13.10: at Pushly's default batch size 1 a paused partition made the loop wait its whole
    fetch timeout every round: ~10 changes/s per partition with the receiver idle."""
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(kafka_bootstrap, pushly, odp, partitions=1)
    assert settings.pushly_batch_size == 1  # the default
    await create_topics(settings)
    changes = make_changes(300, audiences=1)
    await publish_changes(settings, changes)
    sink = Running(settings, "pushly")
    try:
        await until(lambda: len(pushly.delivered()) >= len(changes), 120, "pushly deliveries")
    finally:
        await sink.close()
        await pushly.stop()
        await odp.stop()
    took = pushly.requests[-1].at - pushly.requests[0].at
    rate = len(changes) / took
    print(f"pushly, batch size 1, one partition, idle receiver: {rate:.0f} changes/s")
    assert rate > 100, f"{rate:.0f} changes/s"


@pytest.mark.timeout(600)
async def test_kill_9_mid_batch_resends_the_same_batch_under_the_same_key(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Issue 13.8: after a kill -9 with a partial batch in flight (50 sent as one batch), the
    restarted sink sent those 50 again inside a batch of 150 under another Idempotency-Key."""
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    odp.script = [Answer(200, delay=120)]  # the first batch hangs until the sink is killed
    settings = sink_settings(kafka_bootstrap, pushly, odp, partitions=1)
    await create_topics(settings)
    changes = [c for c in make_changes(200, audiences=1) if c["change"] == "entered"][:150]
    await publish_changes(settings, changes[:50])
    sink = Component(settings, ["sink", "odp"], tmp_path / "odp1.log", RELAY_SINK_WEB_PORT=str(free_port()))
    try:
        await until(lambda: len(odp.arrivals) >= 1, 60, "the first batch in flight")
        assert len(odp.arrivals[0].body) == 50
        await publish_changes(settings, changes[50:])
        sink.kill()
        sink = Component(
            settings, ["sink", "odp"], tmp_path / "odp2.log", RELAY_SINK_WEB_PORT=str(free_port())
        )
        await until(lambda: len(ids(odp.delivered())) >= len(changes), 120, "every change delivered")
    finally:
        sink.stop()
        await pushly.stop()
        await odp.stop()
    keys: dict[tuple[str, str, str], set[str]] = {}
    for request in odp.arrivals:
        for record in request.body:
            se = record["data"]["segment_events"][0]
            change = (record["data"]["_id"], se["id"], se["event"])
            keys.setdefault(change, set()).add(request.headers["Idempotency-Key"])
    assert len(keys) == len(changes)
    assert all(len(k) == 1 for k in keys.values()), "a change was sent under two idempotency keys"
    first = odp.arrivals[0]
    again = [a for a in odp.arrivals[1:] if a.headers["Idempotency-Key"] == first.headers["Idempotency-Key"]]
    assert again and all(a.body == first.body for a in again)  # the same 50, in the same order


@pytest.mark.timeout(600)
async def test_kill_9_of_a_sink_loses_nothing(kafka_bootstrap: str, tmp_path: Path) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    pushly.default = Answer(200, delay=0.002)
    settings = sink_settings(kafka_bootstrap, pushly, odp)
    await create_topics(settings)
    changes = make_changes(1500, audiences=1)
    await publish_changes(settings, changes)
    web_port = free_port()
    sink = Component(settings, ["sink", "pushly"], tmp_path / "sink.log", RELAY_SINK_WEB_PORT=str(web_port))
    try:
        await until(lambda: len(pushly.delivered()) >= len(changes) // 4, 120, "a quarter delivered")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{web_port}/metrics") as resp:
            assert resp.status == 200
            assert (
                'relay_sink_deliveries_total{destination="pushly",outcome="delivered"}' in await resp.text()
            )
        sink.kill()
        before = len(pushly.delivered())
        assert before < len(changes), "everything was delivered before the kill: the test proves nothing"
        sink = Component(
            settings, ["sink", "pushly"], tmp_path / "sink2.log", RELAY_SINK_WEB_PORT=str(free_port())
        )
        wanted = {c["identifier"] for c in changes}
        await until(
            lambda: {r.body["data"]["email"] for r in pushly.delivered()} >= wanted, 180, "all delivered"
        )
    finally:
        sink.stop()
        await pushly.stop()
        await odp.stop()
    keys = [r.headers["Idempotency-Key"] for r in pushly.delivered()]
    print(
        f"sink kill: {len(changes)} changes, {before} delivered before the kill, "
        f"{len(keys) - len(set(keys))} redelivered after it (same idempotency key)"
    )


# --- issue 14: what each destination gets -------------------------------------------------------


async def deliveries(settings: Settings) -> dict[bytes, DeliveryOutcome]:
    """The delivery log as compaction will leave it: last outcome per key, checked against the model."""
    topics = TopicNames.from_settings(settings)
    out: dict[bytes, DeliveryOutcome] = {}
    for record in await read_topic(settings.kafka_bootstrap_servers, topics.deliveries):
        outcome = DeliveryOutcome.model_validate_json(record.value)
        assert record.key == DeliveryOutcome.key(outcome.identifier, outcome.audience_id, outcome.destination)
        out[record.key] = outcome
    return out


async def test_each_destination_gets_its_identifier_and_every_outcome_is_logged(kafka_bootstrap: str) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(
        kafka_bootstrap,
        pushly,
        odp,
        pushly_identifier_hash="sha256",
        pushly_identifier_field="email_sha256",
        analytics_identifier_source="user_id",
    )
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    changes = make_changes(30, audiences=1)
    for c in changes:
        n = int(c["identifier"][4:].split("@")[0])
        c["identifiers"]["user_id"] = f"u{n}"
        if n % 10 == 7:
            del c["identifiers"]["_id"]  # the Lytics job does not export the Lytics ID for these
    lacking = [c for c in changes if "_id" not in c["identifiers"]]
    assert lacking
    await publish_changes(settings, changes)
    unknown_before = sink_metrics.RECORDS.labels("odp", "unknown_identifier")._value.get()
    sinks = [Running(settings, name) for name in ("pushly", "odp", "analytics")]

    async def logged() -> bool:
        return len(await deliveries(settings)) >= 3 * len(
            {(c["identifier"], c["audience_id"]) for c in changes}
        )

    try:
        await until_async(logged, 90, "every outcome in the delivery log")
    finally:
        for s in sinks:
            await s.close()
        await pushly.stop()
        await odp.stop()
    # Pushly: the SHA-256 of the normalized match field, under the configured name.
    sent = sorted(r["data"]["email_sha256"] for r in ids(pushly.delivered()))
    assert sent == sorted(hashlib.sha256(c["identifier"].encode()).hexdigest() for c in changes)
    assert not any("email" in r["data"] for r in ids(pushly.delivered()))
    # ODP: the Lytics ID under _id; changes without one are dead-lettered with a reason naming the
    # Export Field to add, and counted.
    assert sorted(r["data"]["_id"] for r in ids(odp.delivered())) == sorted(
        c["identifiers"]["_id"] for c in changes if "_id" in c["identifiers"]
    )
    dead = [
        r for r in await read_topic(kafka_bootstrap, topics.dead_letter) if dict(r.headers)["sink"] == b"odp"
    ]
    assert sorted(orjson.loads(r.value)["change_id"] for r in dead) == sorted(c["change_id"] for c in lacking)
    for record in dead:
        headers = dict(record.headers)
        assert headers["reason-code"] == b"unknown_identifier"
        assert b"Lytics ID" in headers["reason"] and b"Export Fields" in headers["reason"]
    counted = sink_metrics.RECORDS.labels("odp", "unknown_identifier")._value.get() - unknown_before
    assert counted == len(lacking)
    # Analytics: the configured field's value as data.identifier, subject and key.
    events = await read_topic(kafka_bootstrap, topics.analytics)
    for record in events:
        event = AnalyticsMembershipEvent.model_validate_json(record.value)
        assert event.data.identifier_field == "user_id" and event.subject == event.data.identifier
        assert record.key == event.subject.encode() and str(event.data.identifier).startswith("u")
    # The log: per change and destination, the last outcome with its status and attempts.
    log = await deliveries(settings)
    last = {c["identifier"]: c for c in changes}  # a user's last change (the exit, when there is one)
    for ident, change in last.items():
        p = log[DeliveryOutcome.key(ident, "aud-0", "pushly")]
        assert (p.outcome, p.status, p.attempts, p.change_id) == ("delivered", 200, 1, change["change_id"])
        o = log[DeliveryOutcome.key(ident, "aud-0", "odp")]
        assert o.outcome == ("unknown_identifier" if change in lacking else "delivered")
        assert log[DeliveryOutcome.key(ident, "aud-0", "analytics")].outcome == "delivered"


async def test_audience_lists_filter_changes_per_destination(kafka_bootstrap: str) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(
        kafka_bootstrap,
        pushly,
        odp,
        pushly_audiences_exclude="slug-1",  # by slug
        odp_audiences_include="aud-[02]",  # by id, a glob
    )
    await create_topics(settings)
    changes = make_changes(40, audiences=3)
    await publish_changes(settings, changes)
    filtered_before = sink_metrics.RECORDS.labels("pushly", "filtered")._value.get()
    sinks = [Running(settings, "pushly"), Running(settings, "odp")]
    topics = TopicNames.from_settings(settings)

    async def drained() -> bool:
        lags = [
            await group_lag(kafka_bootstrap, group_id(settings, name), [topics.membership_changes])
            for name in ("pushly", "odp")
        ]
        return lags == [0, 0]

    try:
        await until_async(drained, 90, "both sinks to commit everything, filtered changes included")
    finally:
        for s in sinks:
            await s.close()
        await pushly.stop()
        await odp.stop()

    def audiences(received: list[Any]) -> list[str]:
        return sorted(se["id"] for r in ids(received) for se in r["data"]["segment_events"])

    def expected(wanted: set[str]) -> list[str]:
        return sorted(c["audience_id"] for c in changes if c["audience_id"] in wanted)

    assert audiences(pushly.requests) == expected({"aud-0", "aud-2"})
    assert audiences(odp.requests) == expected({"aud-0", "aud-2"})
    filtered = [c for c in changes if c["audience_id"] == "aud-1"]
    assert sink_metrics.RECORDS.labels("pushly", "filtered")._value.get() - filtered_before == len(filtered)
    log = await deliveries(settings)
    for c in filtered:
        for name in ("pushly", "odp"):
            entry = log[DeliveryOutcome.key(c["identifier"], "aud-1", name)]
            assert (entry.outcome, entry.attempts, entry.status) == ("filtered", 0, None)


async def test_field_changes_reach_analytics_only_as_cloudevents(kafka_bootstrap: str) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(kafka_bootstrap, pushly, odp)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    field_changes = [
        FieldChange(
            change_id=FieldChange.make_id(f"user{n}@example.com", f"ev{n}"),
            event_id=f"ev{n}",
            identifier=f"user{n}@example.com",
            match_field="email",
            identifiers={"_id": lytics_id(n)},
            trigger_id="163bda069207c88cfdb7c84e06b9270f",
            trigger_slug="first_name_joe",
            fields={"first_name": f"Name{n}", "city": "Portland"},
            event_time=T0,
            event_time_source="meta",
            lytics_user_id=str(n),
            source="default",
            request_id=f"r{n}",
        ).model_dump(mode="json")
        for n in range(20)
    ]
    await produce_all(
        kafka_bootstrap,
        topics.field_changes,
        [
            (c["identifier"].encode(), orjson.dumps(c), [("change-id", c["change_id"].encode())])
            for c in field_changes
        ],
    )
    changes = make_changes(5, audiences=1)
    await publish_changes(settings, changes)
    sinks = [Running(settings, name) for name in ("pushly", "odp", "analytics")]

    async def settled() -> bool:
        lags = [
            await group_lag(kafka_bootstrap, group_id(settings, name), [topics.membership_changes])
            for name in ("pushly", "odp")
        ]
        analytics = await read_topic(kafka_bootstrap, topics.analytics)
        return lags == [0, 0] and len(analytics) >= len(field_changes) + len(changes)

    try:
        await until_async(settled, 90, "analytics to get everything and the others to drain")
    finally:
        for s in sinks:
            await s.close()
        await pushly.stop()
        await odp.stop()
    events = [orjson.loads(r.value) for r in await read_topic(kafka_bootstrap, topics.analytics)]
    fields = [
        AnalyticsFieldsEvent.model_validate(e)
        for e in events
        if e["type"] == "com.audience-relay.fields.changed"
    ]
    assert sorted(e.id for e in fields) == sorted(c["change_id"] for c in field_changes)
    assert all(e.data.fields["city"] == "Portland" and e.subject == e.data.identifier for e in fields)
    assert len(events) == len(field_changes) + len(changes)  # nothing twice
    # Pushly and ODP got only the membership changes.
    assert len(ids(pushly.requests)) == len(changes) and len(ids(odp.requests)) == len(changes)


async def test_one_refused_record_in_300_costs_only_itself(kafka_bootstrap: str) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    bad = "4f1b0000000000a9"  # user 169's Lytics ID

    def answer(body: Any) -> Answer:
        if any(r["data"]["_id"] == bad for r in body):
            return Answer(400, body=f'{{"error": "invalid customer id {bad}"}}')
        return Answer(200)

    odp.decide = answer
    settings = sink_settings(kafka_bootstrap, pushly, odp, partitions=1, odp_flush_seconds=5.0)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    changes = [c for c in make_changes(400, audiences=1) if c["change"] == "entered"][:300]
    assert any(c["identifiers"]["_id"] == bad for c in changes)
    await publish_changes(settings, changes)
    sink = Running(settings, "odp")

    async def dead_lettered() -> bool:
        return len(await read_topic(kafka_bootstrap, topics.dead_letter)) >= 1

    try:
        await until(lambda: len(ids(odp.delivered())) >= 299, 60, "299 delivered")
        await until_async(dead_lettered, 30, "the refused record dead-lettered")
    finally:
        await sink.close()
        await odp.stop()
        await pushly.stop()
    assert len(odp.requests[0].body) == 300 and odp.requests[0].status == 400  # one batch of 300 first
    delivered = [r["data"]["_id"] for r in ids(odp.delivered())]
    assert len(delivered) == len(set(delivered)) == 299 and bad not in delivered
    [dead] = await read_topic(kafka_bootstrap, topics.dead_letter)
    headers = dict(dead.headers)
    assert orjson.loads(dead.value)["identifiers"]["_id"] == bad
    assert (
        headers["response-status"] == b"400"
        and headers["response-excerpt"] == f'{{"error": "invalid customer id {bad}"}}'.encode()
    )
    print(f"bisect: {len(odp.requests)} requests to isolate 1 refused record in 300")
    assert len(odp.requests) <= 2 * 9 + 1  # halving: two requests per level below the first


@pytest.mark.timeout(600)
async def test_twenty_calls_at_once_with_two_partitions_keep_every_users_order(kafka_bootstrap: str) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    rng = random.Random(20261123)
    odp.latency = lambda: rng.uniform(0.02, 0.25)
    settings = sink_settings(
        kafka_bootstrap, pushly, odp, partitions=2, odp_batch_size=10, odp_flush_seconds=0.05
    )
    assert settings.odp_concurrency == 20
    await create_topics(settings)
    # 400 users x 4 audiences, enter and exit for every third user; interleaved across users so
    # that batches keep meeting users who are already in flight. (One user is in one open batch at
    # most, so 20 calls of 10 changes need more than 200 users with changes waiting.)
    per_user: dict[str, list[dict[str, Any]]] = {}
    for c in make_changes(400, audiences=4):
        per_user.setdefault(c["identifier"], []).append(c)
    interleaved = [u[i] for i in range(8) for u in per_user.values() if i < len(u)]
    await publish_changes(settings, interleaved)
    sink = Running(settings, "odp")
    try:
        await until(lambda: len(ids(odp.delivered())) >= len(interleaved), 180, "every change delivered")
    finally:
        await sink.close()
        await odp.stop()
        await pushly.stop()
    # The order in which ODP finished handling them, per user, is exactly the order of the topic.
    received: dict[str, list[tuple[str, str]]] = {}
    for request in odp.requests:
        for record in request.body:
            se = record["data"]["segment_events"][0]
            received.setdefault(record["data"]["_id"], []).append((se["id"], se["event"]))
    wanted = {
        u[0]["identifiers"]["_id"]: [(c["audience_id"], "enter" if c["member"] else "exit") for c in u]
        for u in per_user.values()
    }
    assert received == wanted
    print(f"odp: {odp.max_inflight} calls at once with 2 partitions, {len(odp.requests)} requests")
    assert odp.max_inflight == 20


def member_state(n: int, audience: str, member: bool, second: int) -> dict[str, Any]:
    """A MembershipState of test user ``n`` (with the identifiers the processors keep)."""
    ident = f"user{n}@example.com"
    when = T0 + timedelta(seconds=second)
    kind = "enter" if member else "exit"
    return {
        "schema_version": 2,
        "identifier": ident,
        "match_field": "email",
        "audience_id": audience,
        "audience_slug": f"slug-{audience[-1]}",
        "member": member,
        "entered_at": when.isoformat() if member else None,
        "exited_at": None if member else when.isoformat(),
        "updated_at": when.isoformat(),
        "event_id": SegmentEvent.make_id(ident, audience, kind, when),
        "identifiers": {"_id": lytics_id(n)},
        "identifiers_at": {"_id": when.isoformat()},
    }


@pytest.mark.timeout(900)
async def test_resync_of_100000_members_resumes_after_a_kill_and_repeats_with_the_same_keys(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(kafka_bootstrap, pushly, odp, partitions=4)
    await create_topics(settings)
    states = (
        [member_state(n, "aud-0", True, 10) for n in range(65_000)]
        + [member_state(n, "aud-1", True, 10) for n in range(30_000)]
        + [member_state(n, "aud-2", True, 10) for n in range(20_000)]  # not chosen
        + [member_state(n, "aud-0", False, 20) for n in range(65_000, 75_000)]  # left: no member
        # history: 5,000 left aud-1 since (newest state says no), 5,000 came back (newest says yes)
        + [member_state(n, "aud-1", True, 10) for n in range(30_000, 35_000)]
        + [member_state(n, "aud-1", False, 10) for n in range(35_000, 40_000)]
        + [member_state(n, "aud-1", False, 20) for n in range(30_000, 35_000)]
        + [member_state(n, "aud-1", True, 30) for n in range(35_000, 40_000)]
    )
    await publish_states(settings, states)
    wanted = {(lytics_id(n), "aud-0") for n in range(65_000)} | {
        (lytics_id(n), "aud-1") for n in [*range(30_000), *range(35_000, 40_000)]
    }
    assert len(wanted) == 100_000
    chosen = ["aud-0", "slug-1"]  # by id and by slug
    odp.latency = lambda: 0.4  # slow enough to kill the first run half-way
    run = Component(
        settings,
        ["sink", "resync", "odp", *(a for c in chosen for a in ("--audience", c))],
        tmp_path / "resync.log",
    )
    try:
        await until(lambda: len(odp.delivered()) >= 60, 180, "a good part of the first run")
        run.kill()
    finally:
        run.stop()
    first_run = len(ids(odp.delivered()))
    assert first_run < len(wanted), "the first run finished before the kill: the test proves nothing"
    assert "resync odp" in (tmp_path / "resync.log").read_text()  # the progress bar
    odp.latency = None
    resumed = await resync(settings, "odp", chosen, progress=False)
    assert resumed.resumed and 0 < resumed.already_sent < len(wanted)
    assert resumed.already_sent + resumed.delivered == resumed.members == len(wanted)

    def sent(requests: list[Any]) -> set[tuple[str, str]]:
        return {(r["data"]["_id"], r["data"]["segment_events"][0]["id"]) for r in ids(requests)}

    assert sent(odp.delivered()) == wanted
    assert {r["data"]["segment_events"][0]["event"] for r in ids(odp.delivered())} == {"enter"}
    keys_first = {r.headers["Idempotency-Key"]: r.body for r in odp.arrivals}
    before_repeat = len(odp.arrivals)
    repeat = await resync(settings, "odp", chosen, progress=False)
    assert not repeat.resumed and repeat.delivered == len(wanted)
    keys_repeat = {r.headers["Idempotency-Key"]: r.body for r in odp.arrivals[before_repeat:]}
    assert keys_repeat == keys_first  # the same batches under the same keys
    # Nobody else was touched: Pushly got nothing, the ODP sink's own group committed nothing.
    assert pushly.arrivals == []
    assert await committed_offsets(kafka_bootstrap, group_id(settings, "odp")) == {}
    log = await deliveries(settings)
    entry = log[DeliveryOutcome.key("user5@example.com", "aud-1", "odp")]
    assert (entry.outcome, entry.origin, entry.change) == ("delivered", "resync", "entered")
    print(
        f"resync: {len(wanted):,} members, {first_run:,} sent before the kill, {resumed.delivered:,} by the "
        f"resumed run, {len(keys_repeat)} batches, the same keys on a repeat"
    )
    await pushly.stop()
    await odp.stop()


@pytest.mark.timeout(600)
async def test_through_ingress_and_worker_odp_gets_the_lytics_id_and_pushly_the_email(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Issue 14's first point end to end: a Lytics record exporting "Lytics ID" (``_id``) and the
    e-mail goes through the real ingress and worker; ODP is sent the Lytics ID under ``_id``, Pushly
    the e-mail, and a record without ``_id`` reaches Pushly but is dead-lettered for ODP."""
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(kafka_bootstrap, pushly, odp, ingress_api_keys=["key-current"])
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    body = orjson.loads((SAMPLES / "default-format-enter.json").read_bytes())
    with_id = {**body, "data": {**body["data"], "_id": "4f1b2c3d4e5f"}}
    without = {**body, "data": {**body["data"], "email": "other@example.com"}}
    ingress = await start_ingress(settings)
    worker = start_worker(settings, tmp_path)
    sinks = [Running(settings, name) for name in ("pushly", "odp")]
    try:
        async with (
            aiohttp.ClientSession(headers={"X-API-KEY": "key-current"}) as http,
            http.post(ingress.url + "/v1/lytics", data=orjson.dumps([with_id, without])) as resp,
        ):
            assert resp.status == 200
        await until(lambda: len(pushly.delivered()) == 2, 120, "both changes at pushly")

        async def odp_done() -> bool:
            dead = await read_topic(kafka_bootstrap, topics.dead_letter)
            return len(ids(odp.delivered())) == 1 and any(dict(r.headers).get("sink") == b"odp" for r in dead)

        await until_async(odp_done, 120, "one change at odp, one dead-lettered for it")
    finally:
        for s in sinks:
            await s.close()
        worker.stop()
        await ingress.runner.cleanup()
        await pushly.stop()
        await odp.stop()
    assert sorted(r.body["data"]["email"] for r in pushly.delivered()) == [
        "other@example.com",
        "user@example.com",
    ]
    [record] = ids(odp.delivered())
    assert record["data"]["_id"] == "4f1b2c3d4e5f" and "email" not in record["data"]
    [dead] = [
        r for r in await read_topic(kafka_bootstrap, topics.dead_letter) if dict(r.headers)["sink"] == b"odp"
    ]
    assert orjson.loads(dead.value)["identifier"] == "other@example.com"
    assert dict(dead.headers)["reason-code"] == b"unknown_identifier"
