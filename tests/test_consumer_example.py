"""examples/consumer.py, the downstream teams' example, against what a real worker publishes.

The end-to-end test runs the example as its own process (as a downstream team would) while a worker
processes bodies, through change records produced again (a worker crash repeats changes this way),
records that do not validate, and a partition move (3 → 6) under a running reader; it checks the
members per audience against the pure membership functions and every change printed exactly once.
"""

from __future__ import annotations

import importlib.util
import io
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from audience_relay.kafkautil import group_lag, produce_all, read_topic
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.processes import start_worker, wait_for_outputs, wait_group
from devtools.wait import until_async
from processors import partitions as parts
from processors.membership import fold
from processors.split import Context, split_body
from tests.conftest import PROJECT, make_settings
from tests.test_processors_e2e import bodies_for, oracle, preload, split_all

EXAMPLE = PROJECT / "examples" / "consumer.py"
GROUP = "downstream-team"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("relay_consumer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


example = _load_example()


# --- the pieces, without a broker ------------------------------------------------------------------


def _state(identifier: str, audience: str, member: bool, second: int) -> dict[str, Any]:
    return {"identifier": identifier, "audience_id": audience, "member": member,
            "updated_at": f"2026-01-01T00:00:{second:02d}Z"}  # fmt: skip


def _moving_identifier(before: int, after: int) -> str:
    return next(
        f"user{n}@example.com"
        for n in range(1000)
        if partition_for(f"user{n}@example.com", before) != partition_for(f"user{n}@example.com", after)
    )


def test_membership_view_follows_a_key_across_a_partition_move_in_any_read_order() -> None:
    ident = _moving_identifier(3, 6)
    old, new = partition_for(ident, 3), partition_for(ident, 6)
    key = f"{ident}\x1faud-0".encode()
    # Per partition, in offset order: the state before the move and its tombstone (relay-moved-to) on
    # the old partition; the copy, then an exit processed after the move, on the new one.
    old_records = [(old, _state(ident, "aud-0", True, 1)), (old, None)]
    new_records = [(new, _state(ident, "aud-0", True, 1)), (new, _state(ident, "aud-0", False, 2))]
    orders = {
        "old partition first": old_records + new_records,
        "new partition first": new_records + old_records,
        "interleaved": [old_records[0], new_records[0], new_records[1], old_records[1]],
    }
    for name, order in orders.items():
        view = example.MembershipView()
        view.partitions = 6
        for partition, state in order:
            view.apply(partition, key, state)
        assert view.current()[key].member is False, name  # never lost, never stale
        assert view.members() == {}, name
    # Half read: the old value and the copy both live; the copy on the key's home partition is current.
    view = example.MembershipView()
    view.partitions = 6
    view.apply(old, key, _state(ident, "aud-0", False, 1))
    assert view.members() == {}  # only the old partition read so far: its value stands
    view.apply(new, key, _state(ident, "aud-0", True, 1))  # the home copy wins, whatever the times
    assert view.members() == {"aud-0": [ident]}
    # A tombstone removes a key from its own partition only.
    view.apply(old, key, None)
    assert view.members() == {"aud-0": [ident]}
    view.apply(new, key, None)
    assert view.members() == {}


def test_seen_ids_drop_repeats_within_the_window() -> None:
    seen = example.SeenIds(capacity=2)
    assert [seen.add(i) for i in ("a", "b", "a", "c", "a")] == [True, True, False, True, True]


def test_schemas_accept_what_the_relay_writes_and_report_the_rest() -> None:
    schemas = example.Schemas(example.DEFAULT_SCHEMAS)
    settings = make_settings("127.0.0.1:1")
    events = split_all(settings, bodies_for(range(3)))
    states, changes = fold(events)
    assert changes and all(schemas.problems("membership-change", c) == [] for c in changes)
    assert all(schemas.problems("membership-state", s) == [] for s in states.values())
    state = next(iter(states.values()))
    assert schemas.problems("membership-state", {**state, "updated_at": "2026-01-01 00:00:00"}) == [
        "updated_at: '2026-01-01 00:00:00' is not a 'date-time'"
    ]
    assert (
        "no schema urn:audience-relay:schema:membership-state.v7"
        in schemas.problems("membership-state", {**state, "schema_version": 7})[0]
    )
    assert schemas.problems("membership-change", [1]) == ["not a JSON object"]


# --- end to end -----------------------------------------------------------------------------------


def field_change_bodies(users: range) -> list[bytes]:
    """One Lytics field-change record per user ("event": "change"), in one body."""
    return [
        orjson.dumps(
            [
                {
                    "id": str(n),
                    "data": {
                        "email": f"user{n}@example.com",
                        "first_name": f"Name{n}",
                        "segment_events": [{"id": "fc-1", "event": "change", "slug": "first_name_set"}],
                    },
                    "meta": {"timestamp": "2026-01-01T01:00:00Z"},
                }
                for n in users
            ]
        )
    ]


def exit_bodies(users: range, audience: int, second: int) -> list[bytes]:
    """Every user of ``users`` leaves ``aud-<audience>`` later than any earlier event."""
    stamp = f"2026-01-01T02:{second // 60 % 60:02d}:{second % 60:02d}Z"
    return [
        orjson.dumps(
            [
                {
                    "id": str(n),
                    "data": {
                        "email": f"user{n}@example.com",
                        "segment_events": [{"id": f"aud-{audience}", "event": "exit", "exit": stamp}],
                    },
                }
                for n in users
            ]
        )
    ]


def field_change_ids(bodies: list[bytes]) -> set[str]:
    ctx = Context("default", "r", datetime(2026, 1, 1, tzinfo=UTC), "email")
    return {c["change_id"] for body in bodies for c in split_body(body, ctx).field_changes}


def members_of(table: dict[bytes, Any]) -> dict[str, list[str]]:
    """Audience -> sorted members, from the oracle's table."""
    out: dict[str, list[str]] = {}
    for state in table.values():
        if state["member"]:
            out.setdefault(state["audience_id"], []).append(state["identifier"])
    return {a: sorted(ids) for a, ids in sorted(out.items())}


def _command(settings: Settings, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--bootstrap", settings.kafka_bootstrap_servers,
            "--prefix", settings.topic_prefix, *args]  # fmt: skip


def run_example(settings: Settings, *args: str) -> list[dict[str, Any]]:
    """The example to the end of every topic; its output lines."""
    done = subprocess.run(_command(settings, "--until-end", *args), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert lines[-1]["kind"] == "snapshot" and lines[-2]["kind"] == "caught-up"
    return lines


class Follower:
    """The example following the topics (no --until-end), its output in a file."""

    def __init__(self, settings: Settings, tmp: Path, *args: str) -> None:
        self.out = tmp / "follower.out"
        self.err = tmp / "follower.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(_command(settings, *args), stdout=out, stderr=err)

    def lines(self) -> list[dict[str, Any]]:
        # The last piece is a line still being written (or empty): only whole lines.
        return [orjson.loads(line) for line in self.out.read_bytes().split(b"\n")[:-1]]

    async def wait_for(self, what: str, check: Any, timeout: float = 120) -> None:
        async def ready() -> bool:
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            return bool(check(self.lines()))

        await until_async(ready, timeout, what=f"the follower to print {what}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def kinds(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["kind"] == kind]


def printed_ids(lines: list[dict[str, Any]], kind: str) -> list[str]:
    return sorted(line["change_id"] for line in kinds(lines, kind))


@pytest.mark.timeout(600)
async def test_the_consumer_example_against_a_real_worker(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap, partitions=3, standby_replicas=0)
    await create_topics(settings)
    names = TopicNames.from_settings(settings)
    bodies_a = bodies_for(range(200)) + field_change_bodies(range(20))
    table_a, changes_a = oracle(settings, bodies_a)
    fields_a = field_change_ids(bodies_a)
    worker = start_worker(settings, tmp_path, "w1")
    workers = [worker]
    follower: Follower | None = None
    try:
        await wait_group(settings, 1)
        await preload(settings, bodies_a)
        await wait_for_outputs(settings, workers, changes_a, table_a)

        # A snapshot that commits to a group: the oracle's members, every change once.
        first = run_example(settings, "--group", GROUP, "--list-members")
        snapshot = first[-1]
        assert {a: s["identifiers"] for a, s in snapshot["audiences"].items()} == members_of(table_a)
        assert printed_ids(first, "membership-change") == sorted(changes_a)
        assert printed_ids(first, "field-change") == sorted(fields_a) and len(fields_a) == 20
        assert kinds(first, "repeat") == kinds(first, "invalid") == []

        # Following with the same group: it resumes after the first run's commits, so nothing is
        # printed again; it reads the few records before them back, only to know their change ids.
        follower = Follower(settings, tmp_path, "--group", GROUP, "--list-members", "--refresh-seconds", "1")
        await follower.wait_for("caught-up", lambda lines: kinds(lines, "caught-up"))
        assert kinds(follower.lines(), "membership-change") == []

        # Repeats, as a worker crash makes them: records written again as they were (same key,
        # partition, value, headers).
        written = await read_topic(settings, names.membership_changes)
        again = written[:5] + (await read_topic(settings, names.field_changes))[:1]
        for r in again:
            await produce_all(settings, r.topic, [(r.key, r.value, list(r.headers))], [r.partition])
        await follower.wait_for("the repeats", lambda lines: len(kinds(lines, "repeat")) == 6)
        await until_async(
            lambda: _drained(settings, names), 60, what="the follower's group to commit everything"
        )

        # A partition move under the running follower: the worker stops, `partitions apply` moves
        # every key (value to the new partition, tombstone on the old), the worker restarts on 6.
        worker.stop()
        await wait_group(settings, 0)
        out = io.StringIO()
        assert await parts.apply(settings, 6, out, progress=False) == 0, out.getvalue()
        settings6 = settings.model_copy(update={"partitions": 6})
        worker = start_worker(settings6, tmp_path, "w1")
        workers = [worker]
        await wait_group(settings6, 1)
        # New users, and exits of earlier members (keys that moved get new states on their new partition).
        bodies_b = bodies_for(range(200, 300)) + exit_bodies(range(0, 120), 0, 10)
        table_all, changes_all = oracle(settings, bodies_a + bodies_b)
        assert changes_all > changes_a
        await preload(settings6, bodies_b)
        await wait_for_outputs(settings6, workers, changes_all, table_all)

        # Records that do not validate (written once the worker's outputs are checked: the test's own
        # readers of the topics expect the relay's records only).
        change = orjson.loads(written[0].value)
        nobody = "nobody@example.com"
        bad_state_key = f"{nobody}\x1faud-x".encode()
        bad = [
            (names.membership_changes, b"k", b"not json"),
            (names.membership_changes, b"k", orjson.dumps({**change, "schema_version": 9})),
            (names.membership_changes, b"k", orjson.dumps({**change, "change": "maybe"})),
            (names.field_changes, b"k", orjson.dumps({"schema_version": 1, "change_id": "x"})),
            # In the table topic, under a key no event touches.
            (names.membership, bad_state_key, orjson.dumps({"schema_version": 2, "audience_id": "aud-x"})),
        ]
        for topic, key, value in bad:
            partition = partition_for(nobody, 6) if topic == names.membership else 0
            await produce_all(settings, topic, [(key, value, [])], [partition])

        new_ids = changes_all - changes_a
        await follower.wait_for(
            "every new change and the invalid records",
            lambda lines: (
                set(printed_ids(lines, "membership-change")) >= new_ids
                and len(kinds(lines, "invalid")) == len(bad)
            ),
        )
        assert follower.stop() == 0
        lines = follower.lines()
        snapshot = lines[-1]
        assert snapshot["kind"] == "snapshot"
        assert printed_ids(lines, "membership-change") == sorted(new_ids)  # each exactly once
        assert {a: s["identifiers"] for a, s in snapshot["audiences"].items()} == members_of(table_all)
        assert snapshot["partitions"] == dict.fromkeys(
            sorted([names.membership, names.membership_changes, names.field_changes]), 6
        )
        state_records = await read_topic(settings6, names.membership)
        moved = [r for r in state_records if r.value is None]
        assert moved and all(dict(r.headers).get("relay-moved-to") for r in moved)
        assert snapshot["topics"][names.membership]["moved_tombstones"] == len(moved)

        # A new reader from the start (no group): the same members, every change once, repeats dropped.
        last = run_example(settings6, "--list-members")
        snapshot = last[-1]
        assert {a: s["identifiers"] for a, s in snapshot["audiences"].items()} == members_of(table_all)
        assert printed_ids(last, "membership-change") == sorted(changes_all)
        assert printed_ids(last, "field-change") == sorted(fields_a)
        published = {
            topic: await read_topic(settings6, topic)
            for topic in (names.membership_changes, names.field_changes, names.membership)
        }
        valid = Counter(
            (topic, orjson.loads(r.value)["change_id"])
            for topic in (names.membership_changes, names.field_changes)
            for r in published[topic]
            if r.key != b"k"
        )
        repeats = kinds(last, "repeat")
        assert len(repeats) == sum(valid.values()) - len(valid) >= 6
        assert {r["change_id"] for r in repeats} >= {orjson.loads(r.value)["change_id"] for r in again}
        # Each record that does not validate is reported, where it is, and skipped.
        assert sorted((i["topic"], i["partition"], i["offset"]) for i in kinds(last, "invalid")) == sorted(
            (r.topic, r.partition, r.offset)
            for records in published.values()
            for r in records
            if r.key in (b"k", bad_state_key)
        )
        assert len(kinds(last, "invalid")) == len(bad)
        assert snapshot["topics"][names.membership]["moved_tombstones"] == len(moved)
    finally:
        if follower is not None:
            follower.stop()
        for w in workers:
            w.stop()


async def _drained(settings: Settings, names: TopicNames) -> bool:
    return await group_lag(settings, GROUP, [names.membership_changes, names.field_changes]) == 0
