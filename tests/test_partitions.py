"""``audience-relay partitions``: 4 → 12 partitions with real workers, checked against a fresh 12."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from audience_relay import kafka
from audience_relay.kafkautil import committed_offsets, end_offsets, produce_all, read_topic, topic_size
from audience_relay.names import GroupNames
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.processes import Component, start_worker, wait_caught_up, wait_group
from devtools.wait import until_async
from processors import partitions as parts
from processors.app import app_id, create_app
from processors.membership import fold
from processors.split import Context, split_body
from schemas.records import SegmentEvent
from tests.conftest import make_settings

IDENTIFIERS = 100_000


# --- pure functions -------------------------------------------------------------------------------


def test_partition_for_is_the_producers_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    for n in (1, 4, 12, 7):
        for i in range(500):
            ident = f"user{i}@example.com"
            assert partition_for(ident, n) == partitioner(ident.encode(), list(range(n)), list(range(n)))


def test_state_keys_are_placed_by_their_identifier() -> None:
    assert parts.state_identifier(b"user@example.com\x1faud-0") == "user@example.com"
    settings = make_settings("x")
    app = create_app(settings)
    names = TopicNames.from_settings(settings)
    # The membership topic is the table's changelog: one topic holds the state.
    assert app.tables["membership"].changelog_topic.get_topic_name() == names.membership
    # The state topics: the membership (the table's changelog) and the delivery log (the deliveries
    # table's changelog, written by the sinks); both placed by the identifier.
    assert [t.name for t in parts.managed_topics(settings) if t.role == "state"] == [
        names.membership,
        names.deliveries,
    ]


def test_collect_moves_keeps_the_latest_live_value_of_keys_that_move() -> None:
    keys = [f"k{i}".encode() for i in range(200)]
    staying = [k for k in keys if partition_for(k.decode(), 8) == 0]
    leaving = [k for k in keys if partition_for(k.decode(), 8) != 0]
    records: list[tuple[bytes | None, bytes | None]] = [(k, b"old") for k in keys]
    records += [(k, b"new") for k in keys]
    records += [(leaving[0], None), (None, b"no key")]  # moved by an earlier, interrupted run
    moves = parts.collect_moves(records, 0, 8, lambda k: k.decode())
    assert set(moves) == set(leaving[1:]) and not set(moves) & set(staying)
    assert all(
        value == b"new" and target == partition_for(k.decode(), 8) for k, (target, value) in moves.items()
    )


def test_regroup_splits_a_segment_events_record_by_new_partition_in_order() -> None:
    events = segment_events(range(40))
    regrouped = parts.regroup(orjson.dumps({"schema_version": 2, "events": events}), 6)
    assert regrouped is not None
    for partition, value in regrouped.items():
        group = orjson.loads(value)["events"]
        assert all(partition_for(e["identifier"], 6) == partition for e in group)
        assert group == [e for e in events if partition_for(e["identifier"], 6) == partition]
    assert parts.regroup(b"not json", 6) is None


def _state(s: Settings, counts: int, **kw: Any) -> parts.ClusterState:
    return parts.ClusterState(
        {t.name: counts for t in parts.managed_topics(s)}, kw.get("groups", []), kw.get("move")
    )


def test_check_refusals_and_resume() -> None:
    s = make_settings("x")
    topics = parts.managed_topics(s)
    names = TopicNames.from_settings(s)
    assert parts.check(s, topics, _state(s, 4), 12).errors == []
    assert "not larger" in parts.check(s, topics, _state(s, 4), 4).errors[0]
    assert "cannot remove" in parts.check(s, topics, _state(s, 4), 3).errors[0]
    missing = parts.ClusterState({t.name: 4 for t in topics[:-1]}, [], None)
    assert "does not exist" in parts.check(s, topics, missing, 12).errors[0]
    groups = GroupNames.from_settings(s)
    busy = parts.Group(groups.split, 2, {names.raw: 9})
    pending = parts.Group(groups.membership, 0, {names.segment_events: 5})
    verdict = parts.check(s, topics, _state(s, 4, groups=[busy, pending]), 12)
    assert len(verdict.errors) == 1 and "2 active member" in verdict.errors[0]
    assert "stop workers" in verdict.errors[0]
    assert any("5 unprocessed segment-events records: apply moves those" in n for n in verdict.notes)
    assert any("9 raw webhooks to split" in n for n in verdict.notes)
    sink = parts.Group(f"{s.topic_prefix}.sink.odp", 0, {names.membership_changes: 3})
    assert "3 records behind" in parts.check(s, topics, _state(s, 4, groups=[sink]), 12).errors[0]
    started = {"state": "started", "to": 12, "started_at": "t"}
    assert parts.check(s, topics, _state(s, 12, move=started), 12).resume
    assert "did not finish" in parts.check(s, topics, _state(s, 12, move=started), 16).errors[0]
    finished = {"state": "done", "to": 12, "finished_at": "t"}
    assert parts.check(s, topics, _state(s, 12, move=finished), 12).done


# --- helpers --------------------------------------------------------------------------------------


def segment_events(identifiers: range, kind: str = "enter", second: int = 1) -> list[dict[str, Any]]:
    """One event per identifier (audience aud-0), shaped by the real split from one Lytics record."""
    ctx = Context("default", "req-partitions", datetime(2026, 1, 1, tzinfo=UTC), "email")
    record = {
        "id": "0",
        "data": {
            "email": "user0@example.com",
            "segment_events": [
                {"id": "aud-0", "event": kind, "slug": "a0", kind: f"2026-01-01T00:00:{second:02d}Z"}
            ],
        },
    }
    [template] = split_body(orjson.dumps(record), ctx).events
    template = orjson.loads(orjson.dumps(template))
    SegmentEvent.model_validate(template)
    out = []
    for n in identifiers:
        event = dict(template)
        event["identifier"] = f"user{n}@example.com"
        event["event_id"] = f"{kind}-{second}-{n}"
        event["lytics_user_id"] = str(n)
        out.append(event)
    return out


async def send_events(settings: Settings, events: list[dict[str, Any]]) -> None:
    """To segment-events on each identifier's partition, one ``SegmentEvents`` record per event."""
    names = TopicNames.from_settings(settings)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for event in events:
            value = orjson.dumps({"schema_version": 2, "events": [event]})
            partition = partition_for(event["identifier"], settings.partitions)
            await producer.send(names.segment_events, value, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


def identifier_of(record: Any) -> str:
    """The identifier of a one-event ``SegmentEvents`` record."""
    [event] = orjson.loads(record.value)["events"]
    return str(event["identifier"])


async def live(settings: Settings, topic: str) -> dict[int, dict[bytes, Any]]:
    """Partition -> key -> latest value (parsed), tombstoned keys left out: what a reader rebuilds."""
    out: dict[int, dict[bytes, Any]] = defaultdict(dict)
    for r in await read_topic(settings.kafka_bootstrap_servers, topic):
        if r.value is None:
            out[r.partition].pop(r.key, None)
        else:
            out[r.partition][r.key] = orjson.loads(r.value)
    return {p: d for p, d in out.items() if d}


async def wait_changes(settings: Settings, workers: list[Component], count: int) -> None:
    names = TopicNames.from_settings(settings)

    async def done() -> bool:
        for w in workers:
            assert w.alive(), f"worker died; see {w.log}:\n{w.log.read_text()[-3000:]}"
        return await topic_size(settings.kafka_bootstrap_servers, names.membership_changes) >= count

    await until_async(done, 400, what=f"{count} membership changes")
    await wait_caught_up(settings, workers)  # committed, so the table writes reached the changelog


def rocksdb_tables(data_dir: Path) -> dict[int, dict[bytes, Any]]:
    """The worker's local table, partition by partition, read from its RocksDB files (worker stopped)."""
    from rocksdict import AccessType, Options, Rdict

    out: dict[int, dict[bytes, Any]] = {}
    for path in data_dir.rglob("membership-*.db"):
        partition = int(path.name.removesuffix(".db").rsplit("-", 1)[1])
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            rows = {bytes(k): orjson.loads(v) for k, v in db.items() if not bytes(k).startswith(b"__faust")}
        finally:
            db.close()
        if rows:
            out[partition] = rows
    return out


async def changes_since(settings: Settings, since: dict[int, int]) -> dict[int, list[Any]]:
    names = TopicNames.from_settings(settings)
    out: dict[int, list[Any]] = defaultdict(list)
    for r in await read_topic(settings.kafka_bootstrap_servers, names.membership_changes, since):
        out[r.partition].append(orjson.loads(r.value))
    return dict(out)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", *args],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- 100,000 identifiers, 4 → 12 partitions --------------------------------------------------------


@pytest.mark.timeout(900)  # ~6 min on a shared, loaded 2-core box; see the report for CI figures
async def test_4_to_12_partitions_matches_a_fresh_12_partition_deployment(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    moved = make_settings(kafka_bootstrap, partitions=4, processor_batch=5000, standby_replicas=0)
    # The fresh deployment's table is only read through its changelog: an in-memory store is enough.
    fresh = make_settings(
        kafka_bootstrap, partitions=12, processor_batch=5000, standby_replicas=0, table_store="memory"
    )
    await create_topics(moved)
    await create_topics(fresh)
    history = segment_events(range(IDENTIFIERS))
    w_moved, w_fresh = start_worker(moved, tmp_path, "moved"), start_worker(fresh, tmp_path, "fresh")
    restarted: Component | None = None
    try:
        await wait_group(moved, 1)
        await wait_group(fresh, 1)
        await send_events(moved, history)
        await send_events(fresh, history)
        await wait_changes(moved, [w_moved], IDENTIFIERS)
        w_moved.stop()
        await wait_group(moved, 0)

        # Follow-up: exits for members (a change each), repeats of enters (none), new members (a change
        # each), over keys that move and keys that stay. Half of it arrives while the workers are
        # stopped (a backlog that apply moves to the new partitions), half after the restart.
        follow = (
            segment_events(range(0, 2000), "exit", 30)
            + segment_events(range(2000, 3000), "enter", 1)
            + segment_events(range(IDENTIFIERS, IDENTIFIERS + 1000), "enter", 40)
        )
        backlog, live_follow = follow[::2], follow[1::2]
        await send_events(moved, backlog)
        since_m = await end_offsets(kafka_bootstrap, TopicNames.from_settings(moved).membership_changes)

        out = io.StringIO()
        assert await parts.apply(moved, 12, out, progress=False) == 0, out.getvalue()
        assert "unprocessed segment-events records moved to their new partitions" in out.getvalue()
        names_m, names_f = TopicNames.from_settings(moved), TopicNames.from_settings(fresh)
        changelog = names_m.membership
        await wait_changes(fresh, [w_fresh], IDENTIFIERS)
        # Lookups: the state topic (the table's changelog, what every worker recovers from) holds,
        # partition by partition, exactly what a deployment born with 12 partitions holds.
        table_m = await live(moved, changelog)
        assert sum(map(len, table_m.values())) == IDENTIFIERS
        assert table_m == await live(fresh, names_f.membership)
        # A worker still configured for 4 partitions refuses to start, with the fix in the message.
        refused = start_worker(moved, tmp_path, "moved")
        assert refused.proc.wait(60) == 78
        assert "set RELAY_PARTITIONS=12" in refused.log.read_text()
        refused.stop()

        moved_keys = {
            e["identifier"]
            for e in follow
            if partition_for(e["identifier"], 4) != partition_for(e["identifier"], 12)
        }
        assert 0 < len(moved_keys) < 3000
        moved12 = moved.model_copy(update={"partitions": 12})
        since_f = await end_offsets(kafka_bootstrap, names_f.membership_changes)
        restarted = start_worker(moved12, tmp_path, "moved")
        await wait_group(moved12, 1)
        await send_events(moved12, live_follow)  # while the restarted worker recovers its table
        await send_events(fresh, follow)
        await wait_changes(moved12, [restarted], IDENTIFIERS + 3000)
        await wait_changes(fresh, [w_fresh], IDENTIFIERS + 3000)
        emitted = await changes_since(moved12, {p: since_m.get(p, 0) for p in range(12)})
        # Each identifier has one follow-up event; the backlog is processed before the rest, so only the
        # order *between* identifiers of a partition may differ from the fresh deployment's.
        fresh_emitted = await changes_since(fresh, since_f)
        assert {p: sorted(c["change_id"] for c in cs) for p, cs in emitted.items()} == {
            p: sorted(c["change_id"] for c in cs) for p, cs in fresh_emitted.items()
        }
        by_id = {c["change_id"]: c for cs in fresh_emitted.values() for c in cs}
        assert all(c == by_id[c["change_id"]] for cs in emitted.values() for c in cs)
        kinds = [c["change"] for p in emitted.values() for c in p]
        assert kinds.count("exited") == 2000 and kinds.count("entered") == 1000
        assert {c["identifier"] for p in emitted.values() for c in p} & moved_keys
        table_m = await live(moved12, changelog)
        assert table_m == await live(fresh, names_f.membership)
        restarted.stop()
        log = restarted.log.read_text()
        assert "built for 4 partitions, the topics have 12: rebuilding" in log
        # The restarted worker's own table (its RocksDB, rebuilt from the moved changelog) agrees.
        assert rocksdb_tables(tmp_path / "moved-data" / app_id(moved)) == {
            p: {k: v for k, v in rows.items()} for p, rows in table_m.items()
        }
    finally:
        for w in (w_moved, w_fresh, restarted):
            if w is not None:
                w.stop()


# --- plan, refusals, resume -------------------------------------------------------------------------


async def small_deployment(kafka_bootstrap: str, partitions: int = 3, users: int = 300) -> Settings:
    """Topics and a membership topic holding ``users`` identifiers, as a worker leaves them."""
    settings = make_settings(kafka_bootstrap, partitions=partitions)
    await create_topics(settings)
    names = TopicNames.from_settings(settings)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        states, _ = fold(segment_events(range(users)))
        for key, state in states.items():
            p = partition_for(state["identifier"], partitions)
            await producer.send(names.membership, orjson.dumps(state), key=key, partition=p)
        await producer.flush()
    finally:
        await producer.stop()
    return settings


async def sizes(settings: Settings) -> dict[str, tuple[int, int]]:
    out = {}
    for t in parts.managed_topics(settings):
        out[t.name] = (
            len(await end_offsets(settings.kafka_bootstrap_servers, t.name)),
            await topic_size(settings.kafka_bootstrap_servers, t.name),
        )
    return out


async def test_plan_prints_the_move_and_changes_nothing(kafka_bootstrap: str) -> None:
    settings = await small_deployment(kafka_bootstrap)
    before = await sizes(settings)
    result = cli(settings, "partitions", "plan", "--to", "6", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    idents = [f"user{n}@example.com" for n in range(300)]
    expected = sum(1 for k in idents if partition_for(k, 3) != partition_for(k, 6))
    assert f"keys to move in {TopicNames.from_settings(settings).membership}: {expected}" in result.stdout
    for t in parts.managed_topics(settings):
        assert t.name in result.stdout
    assert "RELAY_PARTITIONS=6" in result.stdout
    assert await sizes(settings) == before
    admin = kafka.admin(settings)
    await admin.start()
    try:
        assert parts.state_topic(settings) not in await admin.list_topics()
    finally:
        await admin.close()


async def test_apply_refuses_bad_input_and_busy_groups(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = await small_deployment(kafka_bootstrap, users=20)
    names = TopicNames.from_settings(settings)
    before = await sizes(settings)

    result = cli(settings, "partitions", "apply", "--to", "3", "--quiet")
    assert (
        result.returncode == parts.EXIT_REFUSED
        and "not larger than the current partition count" in result.stdout
    )
    result = cli(settings, "partitions", "apply", "--to", "1")
    assert result.returncode == 2 and "from 2 to 10000" in result.stderr
    nowhere = settings.model_copy(update={"topic_prefix": settings.topic_prefix + "-none"})
    result = cli(nowhere, "partitions", "plan", "--to", "6", "--quiet")
    assert result.returncode == parts.EXIT_REFUSED and "does not exist" in result.stdout

    # A sink reading, and behind.
    await send_events(settings, segment_events(range(1)))  # unprocessed: a note, not a refusal
    await produce_all(kafka_bootstrap, names.membership_changes, [(b"k", b"{}", [])])
    sink = kafka.consumer(settings, names.membership_changes, group_id=f"{settings.topic_prefix}.sink.pushly")
    await sink.start()
    try:
        await until_async(lambda: _assigned(sink), 60, what="the sink consumer's assignment")
        result = cli(settings, "partitions", "apply", "--to", "6", "--quiet")
    finally:
        await sink.stop()
    assert result.returncode == parts.EXIT_REFUSED
    assert f"{settings.topic_prefix}.sink.pushly has 1 active member(s)" in result.stdout
    assert "1 unprocessed segment-events records: apply moves those" in result.stdout
    assert f"{settings.topic_prefix}.sink.pushly is 1 records behind" in result.stdout
    after = await sizes(settings)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # counts unchanged


async def _assigned(consumer: AIOKafkaConsumer) -> bool:
    return bool(consumer.assignment())


async def test_apply_resumes_after_an_interruption_and_workers_wait_for_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = await small_deployment(kafka_bootstrap, users=500)
    topics = parts.managed_topics(settings)
    names = TopicNames.from_settings(settings)
    expected = {p: rows for p, rows in (await live(settings, names.membership)).items()}
    # A run that died half-way: move recorded, counts raised, some values copied, no tombstones yet.
    state = await parts.read_state(settings, topics)
    await parts._write_state(
        settings, {"state": "started", "to": 6, "from": state.counts, "started_at": "t0"}
    )
    await parts.raise_partitions(settings, state.counts, 6)
    changelog = next(t for t in topics if t.name == names.membership)
    consumer = parts._consumer(settings)
    await consumer.start()
    try:
        from tqdm import tqdm

        half = await parts.scan_partition(consumer, changelog, 0, 6, tqdm(disable=True))
    finally:
        await consumer.stop()
    assert half
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for key, (target, value) in half.items():
            await producer.send(changelog.name, value, key=key, partition=target)
        await producer.flush()
    finally:
        await producer.stop()
    result = start_worker(settings.model_copy(update={"partitions": 6}), tmp_path)
    assert result.proc.wait(60) == 78 and "has not finished" in result.log.read_text()
    result.stop()

    out = cli(settings, "partitions", "apply", "--to", "6", "--quiet")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming the interrupted move to 6" in out.stdout
    table = await live(settings, names.membership)
    want: dict[int, dict[bytes, Any]] = defaultdict(dict)
    for rows in expected.values():
        for key, value in rows.items():
            want[partition_for(parts.state_identifier(key), 6)][key] = value
    assert table == dict(want)
    again = cli(settings, "partitions", "apply", "--to", "6", "--quiet")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_local_table_is_rebuilt_for_another_partition_count(tmp_path: Path) -> None:
    from processors.worker import prepare_data_dir

    data = tmp_path / "app"
    assert prepare_data_dir(data, 4) is False  # first start
    (data / "membership-0.db").mkdir()
    assert prepare_data_dir(data, 4) is True  # same count: kept (also after a crash)
    assert prepare_data_dir(data, 12) is False  # built for 4 partitions: rebuilt
    assert not (data / "membership-0.db").exists() and (data / "partitions").read_text() == "12\n"
    (data / "membership-0.db").mkdir()
    assert prepare_data_dir(data, 12) is True


async def test_unprocessed_segment_events_move_to_their_new_partitions(kafka_bootstrap: str) -> None:
    settings = await small_deployment(kafka_bootstrap, users=10)
    names = TopicNames.from_settings(settings)
    group = GroupNames.from_settings(settings).membership
    # 600 events of 200 identifiers; the processors committed the first 100 records of each partition.
    pending = (
        segment_events(range(200))
        + segment_events(range(200), "exit", 9)
        + segment_events(range(200), "enter", 20)
    )
    await send_events(settings, pending)
    committer = kafka.consumer(settings, group_id=group)
    await committer.start()
    try:
        tps = [TopicPartition(names.segment_events, p) for p in range(3)]
        committer.assign(tps)
        await committer.commit({tp: 100 for tp in tps})
    finally:
        await committer.stop()
    old_ends = await end_offsets(kafka_bootstrap, names.segment_events)
    before = await read_topic(kafka_bootstrap, names.segment_events)
    unprocessed = [r for r in before if r.offset >= 100]

    out = io.StringIO()
    assert await parts.apply(settings, 6, out, progress=False) == 0, out.getvalue()
    moved = f"unprocessed segment-events records moved to their new partitions: {len(unprocessed)}"
    assert moved in out.getvalue()
    committed = await committed_offsets(kafka_bootstrap, group)
    since = {p: committed[TopicPartition(names.segment_events, p)] for p in range(3)}
    assert since == old_ends  # the old copies count as processed
    # What the workers will read now: every unprocessed event once, on its key's new partition, and
    # one key's events in their original order.
    after = await read_topic(kafka_bootstrap, names.segment_events, since)
    assert sorted(r.value for r in after) == sorted(r.value for r in unprocessed)
    order: dict[str, list[bytes]] = defaultdict(list)
    for r in after:
        assert r.partition == partition_for(identifier_of(r), 6)
        order[identifier_of(r)].append(r.value)
    for r in sorted(unprocessed, key=lambda r: (r.partition, r.offset)):
        assert order[identifier_of(r)].pop(0) == r.value
