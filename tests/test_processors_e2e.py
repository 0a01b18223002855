"""Processors end to end on the real broker: ingress → split → membership → changes and state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson

from audience_relay import kafka
from audience_relay.kafkautil import produce_all, read_topic
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.processes import (
    raw_headers,
    read_json,
    read_segment_events,
    start_worker,
    wait_caught_up,
    wait_for_outputs,
    wait_group,
)
from processors.membership import fold
from processors.split import Context, split_body
from schemas.records import FieldChange, MembershipChange, MembershipState, SegmentEvent, SegmentEvents
from tests.conftest import SAMPLES, make_settings, start_ingress

KEY = {"X-API-KEY": "key-current"}
AUDIENCE = "42976a269a5e6b9d06c681b1c27292df"


async def _post_all(url: str, bodies: list[bytes]) -> None:
    async with aiohttp.ClientSession(headers=KEY) as http:
        for body in bodies:
            async with http.post(url + "/v1/lytics", data=body) as resp:
                assert resp.status == 200, await resp.text()


async def test_samples_become_events_states_and_changes(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap)
    await create_topics(settings)
    names = TopicNames.from_settings(settings)
    ingress = await start_ingress(settings)
    worker = start_worker(settings, tmp_path)
    try:
        await wait_group(settings, 1)
        samples = sorted(p for p in SAMPLES.glob("*.json") if not p.name.startswith("enrichment"))
        await _post_all(ingress.url, [p.read_bytes() for p in samples])
        await wait_caught_up(settings, [worker])

        for group in await read_json(settings, names.segment_events):
            SegmentEvents.model_validate(group)
        events = await read_segment_events(settings)
        for e in events:
            SegmentEvent.model_validate(e)
        assert sorted((e["identifier"], e["event"], e["event_time_source"]) for e in events) == [
            ("user@example.com", "enter", "segment_event"),  # cloudevents
            ("user@example.com", "enter", "segment_event"),  # default
            ("user@example.com", "enter", "segment_event"),  # legacy
        ]
        # The field-change sample goes to its own topic, with the user's fields.
        [field_change] = await read_json(settings, names.field_changes)
        FieldChange.model_validate(field_change)
        assert field_change["identifier"] == "user@example.com"
        assert field_change["fields"]["city"] == "Portland"
        # The three "enter" samples are one user entering one audience: a single change.
        [change] = await read_json(settings, names.membership_changes)
        MembershipChange.model_validate(change)
        assert (change["identifier"], change["audience_id"], change["change"]) == (
            "user@example.com",
            AUDIENCE,
            "entered",
        )
        [state] = await read_json(settings, names.membership)
        MembershipState.model_validate(state)
        assert state["member"] is True and state["entered_at"] == change["entered_at"]
        state_records = await read_topic(kafka_bootstrap, names.membership)
        assert state_records[0].key == b"user@example.com\x1f" + AUDIENCE.encode()
        # The selected-fields samples export no e-mail: dead-lettered with the Export Fields hint.
        dead = await read_topic(kafka_bootstrap, names.dead_letter)
        assert len(dead) == 2
        for record in dead:
            headers = dict(record.headers)
            assert headers["reason-code"] == b"missing_identifier"
            assert b"Export Fields" in headers["reason"]
            assert record.value in {p.read_bytes() for p in samples}

        # A backfill ("Existing Users") re-sends the members as entered: nothing new is emitted.
        backfill = [orjson.dumps([orjson.loads(p.read_bytes()) for p in samples if "enter" in p.name])] * 3
        await _post_all(ingress.url, backfill)
        await wait_caught_up(settings, [worker])
        assert len(await read_json(settings, names.membership_changes)) == 1

        # The user exits: one more change, with the time spent in the audience.
        leave = orjson.loads((SAMPLES / "default-format-enter.json").read_bytes())
        leave["data"]["segment_events"] = [
            {
                "id": AUDIENCE,
                "event": "exit",
                "slug": "emailzz5",
                "exit": "2020-10-15T13:27:33.916374949-07:00",
            }
        ]
        await _post_all(ingress.url, [orjson.dumps(leave)])
        await wait_caught_up(settings, [worker])
        changes = await read_json(settings, names.membership_changes)
        assert [c["change"] for c in changes] == ["entered", "exited"]
        assert changes[1]["seconds_in_audience"] == 86400.0
    finally:
        worker.stop()
        await ingress.runner.cleanup()


def user_history(n: int, audiences: int = 3) -> list[dict[str, Any]]:
    """One user's records: enter every audience, exit some, re-enter one, with duplicates."""
    records = []
    for a in range(audiences):
        records.append(_record(n, a, "enter", 1000 + a))
        if (n + a) % 3 == 0:
            records.append(_record(n, a, "exit", 2000 + a))
        if (n + a) % 5 == 0:
            records.append(_record(n, a, "enter", 3000 + a))
        if (n + a) % 4 == 0:
            records.append(_record(n, a, "enter", 1000 + a))  # a Lytics retry
    return records


def _record(n: int, audience: int, kind: str, second: int) -> dict[str, Any]:
    stamp = f"2026-01-01T00:{second // 60 % 60:02d}:{second % 60:02d}.{second:06d}Z"
    return {
        "id": str(n),
        "data": {
            "email": f"User{n}@Example.com",
            "segment_events": [
                {"id": f"aud-{audience}", "event": kind, "slug": f"audience-{audience}", kind: stamp}
            ],
        },
        "meta": {"timestamp": stamp},
    }


def bodies_for(users: range, per_body: int = 50) -> list[bytes]:
    """Raw bodies of 50 user records each; all of a user's records in one body, so their order holds."""
    bodies, current = [], []
    for n in users:
        current.extend(user_history(n))
        if len(current) >= per_body:
            bodies.append(orjson.dumps(current))
            current = []
    if current:
        bodies.append(orjson.dumps(current))
    return bodies


def split_all(settings: Settings, bodies: list[bytes]) -> list[dict[str, Any]]:
    """Every segment event of ``bodies`` as the workers see it (through JSON), in body order."""
    from datetime import UTC, datetime

    ctx = Context("default", "r", datetime(2026, 1, 1, tzinfo=UTC), settings.match_field)
    return [orjson.loads(orjson.dumps(e)) for body in bodies for e in split_body(body, ctx).events]


def oracle(settings: Settings, bodies: list[bytes]) -> tuple[dict[bytes, Any], set[str]]:
    """What a correct run must produce: final table values (by state key) and the set of change ids."""
    table, changes = fold(split_all(settings, bodies))
    return table, {c["change_id"] for c in changes}


async def preload(settings: Settings, bodies: list[bytes]) -> None:
    names = TopicNames.from_settings(settings)
    await produce_all(
        settings.kafka_bootstrap_servers,
        names.raw,
        [(None, body, raw_headers(f"req-{i}")) for i, body in enumerate(bodies)],
    )


async def test_two_workers_share_partitions_and_match_one(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap, partitions=4)
    await create_topics(settings)
    bodies = bodies_for(range(600))
    expected_table, expected_changes = oracle(settings, bodies)
    workers = [start_worker(settings, tmp_path, "w1"), start_worker(settings, tmp_path, "w2")]
    try:
        await wait_group(settings, 2)
        await preload(settings, bodies)
        changes = await wait_for_outputs(settings, workers, expected_changes, expected_table)
        admin = kafka.admin(settings)
        await admin.start()
        try:
            [group] = await admin.describe_consumer_groups([GroupNames.from_settings(settings).tables])
        finally:
            await admin.close()
        assert len(group.groups[0][5]) == 2  # two members share the partitions
        assert {c["change_id"] for c in changes} == expected_changes
        assert len(changes) == len(expected_changes)  # no crash, so no repeats
    finally:
        for w in workers:
            w.stop()


async def test_a_healthy_backlog_run_logs_no_warning(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A backlog through one worker: every batch is clean, so not one warning (or error) line."""
    settings = make_settings(kafka_bootstrap, partitions=4)
    await create_topics(settings)
    bodies = bodies_for(range(4_000), per_body=300)
    expected_table, expected_changes = oracle(settings, bodies)
    await preload(settings, bodies)  # a backlog before the worker starts, like a backfill
    worker = start_worker(settings, tmp_path, RELAY_LOG_LEVEL="INFO")
    try:
        await wait_for_outputs(settings, [worker], expected_changes, expected_table, timeout=300)
        await wait_caught_up(settings, [worker])
    finally:
        worker.stop()
    lines = [orjson.loads(line) for line in worker.log.read_text().splitlines() if line.startswith("{")]
    started = next(i for i, line in enumerate(lines) if line["event"] == "membership partitions started")
    # From the first batch on (before it, aiokafka may log a group coordinator it is still looking
    # for at start: retried, and not about the data).
    noisy = [f"{x['level']} {x['logger']}: {x['event']}" for x in lines[started:] if x["level"] != "info"]
    assert noisy == [], noisy
