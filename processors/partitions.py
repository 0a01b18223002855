"""``audience-relay partitions plan|apply --to N``: more partitions, each key where its new hash puts it.

Kafka can only add partitions, and adding them changes ``hash(key) % N`` for most keys. The membership
state lives in ``<prefix>.membership`` (compacted, keyed ``identifier\x1faudience``), which is also the
membership table's changelog: a state sits on the partition of its identifier, ``murmur2(identifier)
% N``, the partition of that identifier's segment events. A worker owning partition ``p`` recovers only
partition ``p``, so a key left on its old partition would be invisible to the worker that now receives
its events, and readers would see two values once the processors write the new partition.

So ``apply`` raises the partition counts and then moves every live key of that topic to its new
partition: the latest value is written to the new partition first (header ``relay-moved-from``) and,
once acknowledged, a tombstone to the old one (header ``relay-moved-to``; it means "moved", not
"deleted").

Segment events the processors have not processed yet were placed by the old hash and would be applied
against the wrong partition's state: ``apply`` re-groups them by their identifiers' new partitions and
copies them, in order, there (one ``SegmentEvents`` record per source record and target partition),
then commits the old offsets for the membership stage's group (a copy made twice by an interrupted run
is a duplicate event, which the table ignores). So workers may be stopped at any moment, without
draining.

The rest is refused rather than handled:

- any active member of the processors' groups or of a group reading the changed keyed topics;
- every consumer group reading ``membership-changes``, ``field-changes`` (the sinks) or ``membership``
  must have read everything: history stays on the old partitions, new changes of a key go to its new
  partition, and a reader still behind on the old one would see that key's changes out of order (each
  sink group has its own position, so moving unread changes would repeat them for the others). Once
  drained, nothing is reordered (readers start new partitions at the earliest offset).

Raw webhooks and dead letters carry no key and no per-key order, so nothing moves there; they are
raised too (``raw``: the split agent scales with workers only up to its partition count; both: every
topic ``topics create`` makes keeps ``RELAY_PARTITIONS``). Lag on ``raw`` is fine: it is split after
the move, under the new hash — so the ingress may keep accepting webhooks throughout. The analytics
topic is an output other teams read, keyed for their consumers: it is left as it is.

Crash safety: each step can be repeated. A record in the compacted ``<prefix>.partitions`` topic says
a move to N has started (workers refuse to start while it has not finished); the partition counts are
raised only where still lower; the key move is recomputed from the topics themselves each time (a key
already tombstoned on its old partition no longer needs moving; one copied but not yet tombstoned is
copied again — the same value — and then tombstoned).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from tqdm import tqdm

from audience_relay import kafka
from audience_relay.exits import ExitCode
from audience_relay.names import SINKS, GroupNames
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, replica_configs

MOVED_TO = "relay-moved-to"
MOVED_FROM = "relay-moved-from"
EXIT_REFUSED = ExitCode.PARTITIONS_REFUSED
_STATE_KEY = b"partitions"


class PartitionsError(Exception):
    """A worker's settings disagree with the topics, or a partition move has not finished."""


# --- names ----------------------------------------------------------------------------------------


def state_topic(settings: Settings) -> str:
    """The compacted topic recording an unfinished or finished partition move."""
    return TopicNames.from_settings(settings).partition_moves


# --- pure functions -------------------------------------------------------------------------------


def state_identifier(key: bytes) -> str:
    """What places a state record: its identifier, the key before the ``\x1f``."""
    return key.split(b"\x1f", 1)[0].decode(errors="replace")


def regroup(value: bytes | None, partitions: int) -> dict[int, bytes] | None:
    """A ``SegmentEvents`` record split by its events' new partitions (order kept); None if unreadable."""
    try:
        events = orjson.loads(value or b"")["events"]
        grouped: dict[int, list[Any]] = {}
        for event in events:
            grouped.setdefault(partition_for(event["identifier"], partitions), []).append(event)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return {p: orjson.dumps({"schema_version": 2, "events": evs}) for p, evs in grouped.items()}


@dataclass(frozen=True)
class Topic:
    """A topic the tool raises, its role and why it is handled that way."""

    name: str
    role: str  # "state": keys moved; "keyed": readers must be drained; "unkeyed": nothing to move
    why: str
    partition_key: Callable[[bytes], str] | None = None


def managed_topics(settings: Settings) -> list[Topic]:
    """Every topic ``apply`` raises, in the order it raises them."""
    names = TopicNames.from_settings(settings)
    return [
        Topic(names.raw, "unkeyed", "no key; lag is fine (split runs after the move, under the new hash)"),
        Topic(names.segment_events, "keyed", "the table's input: unprocessed events move too"),
        Topic(names.dead_letter, "unkeyed", "no key, no order: raised to keep RELAY_PARTITIONS"),
        Topic(names.membership_changes, "keyed", "history stays; its readers must be drained first"),
        Topic(names.field_changes, "keyed", "history stays; its readers must be drained first"),
        Topic(
            names.membership,
            "state",
            "compacted, the table's changelog: each key's latest value moves",
            state_identifier,
        ),
        Topic(
            names.deliveries,
            "state",
            "compacted delivery log (the deliveries table's changelog): each key's latest outcome moves",
            state_identifier,
        ),
    ]


class MoveFinder:
    """Finds, record by record, the live keys of one partition that belong elsewhere under a new count.

    Records arrive in offset order; the last one per key is the key's state here (a tombstone means
    "not here": deleted, or moved already by an earlier run). Keys whose new partition is this one are
    not kept, so memory follows the keys that move.
    """

    def __init__(self, partition: int, partitions: int, partition_key: Callable[[bytes], str]) -> None:
        self.partition = partition
        self.partitions = partitions
        self.partition_key = partition_key
        self._latest: dict[bytes, bytes | None] = {}
        self._targets: dict[bytes, int] = {}

    def add(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the partition, in offset order."""
        if key is None:
            return
        target = self._targets.get(key)
        if target is None:
            target = partition_for(self.partition_key(key), self.partitions)
            if target == self.partition:
                return  # a key that stays: not kept (seen again, it is recomputed)
            self._targets[key] = target
        self._latest[key] = value

    def moves(self) -> dict[bytes, tuple[int, bytes]]:
        """Key -> (new partition, latest value) for every live key that must move."""
        return {k: (self._targets[k], v) for k, v in self._latest.items() if v is not None}


def collect_moves(
    records: Iterable[tuple[bytes | None, bytes | None]],
    partition: int,
    partitions: int,
    partition_key: Callable[[bytes], str],
) -> dict[bytes, tuple[int, bytes]]:
    """``MoveFinder`` over one partition's (key, value) records in offset order."""
    finder = MoveFinder(partition, partitions, partition_key)
    for key, value in records:
        finder.add(key, value)
    return finder.moves()


@dataclass(frozen=True)
class Group:
    """A consumer group that reads a topic the tool changes."""

    name: str
    members: int
    lag: dict[str, int]  # topic -> records not yet committed


@dataclass
class ClusterState:
    """What ``plan`` and ``apply`` check, read from the broker."""

    counts: dict[str, int]  # topic -> partitions (0: missing)
    groups: list[Group]
    move: dict[str, Any] | None  # the last record of the state topic
    left_alone: dict[str, int] = field(default_factory=dict)  # topics deliberately not changed


@dataclass
class Verdict:
    """The checks' outcome: errors refuse; ``resume``: finish an interrupted move; ``done``: nothing to do."""

    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resume: bool = False
    done: bool = False


def check(settings: Settings, topics: list[Topic], state: ClusterState, to: int) -> Verdict:
    """Every reason to refuse a move to ``to`` partitions, and what to say about the rest."""
    v = Verdict()
    missing = [t.name for t in topics if state.counts.get(t.name, 0) == 0]
    for name in missing:
        v.errors.append(
            f"topic {name} does not exist: check RELAY_TOPIC_PREFIX={settings.topic_prefix} "
            f"and KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}"
        )
    move = state.move
    if move is not None and move.get("state") == "started":
        if move.get("to") != to:
            v.errors.append(
                f"a move to {move.get('to')} partitions started at {move.get('started_at')} and did not "
                f"finish: run `audience-relay partitions apply --to {move.get('to')}` to complete it first"
            )
        else:
            v.resume = True
            v.notes.append(
                f"resuming the interrupted move to {to} partitions started at {move['started_at']}"
            )
    present = {t.name: state.counts[t.name] for t in topics if state.counts.get(t.name, 0) > 0}
    above = ", ".join(f"{name}={n}" for name, n in present.items() if n > to)
    if above:
        v.errors.append(
            f"--to {to} is smaller than the current partition count ({above}): Kafka cannot remove partitions"
        )
    source = TopicNames.from_settings(settings).segment_events
    if not v.resume and not above and source in present:
        if all(n == to for n in present.values()) and move is not None and move.get("to") == to:
            v.done = True
            v.notes.append(
                f"already at {to} partitions (move finished {move.get('finished_at')}): nothing to do"
            )
        elif present[source] >= to:
            v.errors.append(
                f"--to {to} is not larger than the current partition count of {source} "
                f"({present[source]}): choose a larger count"
            )
    groups = GroupNames.from_settings(settings)
    workers = {groups.split, groups.tables, groups.membership}
    names = TopicNames.from_settings(settings)
    for g in state.groups:
        if g.members:
            what = "workers" if g.name in workers else "its consumers (sinks or other readers)"
            v.errors.append(f"consumer group {g.name} has {g.members} active member(s): stop {what} first")
        for topic, lag in sorted(g.lag.items()):
            if lag == 0:
                continue
            if topic == names.raw:
                v.notes.append(
                    f"{g.name} has {lag} raw webhooks to split: fine, they are split after the move"
                )
            elif g.name == groups.membership and v.done:
                v.notes.append(
                    f"{g.name} has {lag} segment-events records to process: the workers do so on start"
                )
            elif g.name == groups.membership:
                v.notes.append(
                    f"{g.name} has {lag} unprocessed segment-events records: apply moves those not on their "
                    "key's new partition there and commits their old offsets (a copy made twice by an "
                    "interrupted run is a duplicate event, which the membership table ignores)"
                )
            else:
                v.errors.append(
                    f"consumer group {g.name} is {lag} records behind on {topic}: run it until it has "
                    "read everything, stop it, then try again (otherwise a key's records could be read "
                    "out of order)"
                )
    for name, n in state.left_alone.items():
        v.notes.append(f"{name} ({n} partitions) is left as it is: an output other consumers read")
    return v


# --- broker I/O -----------------------------------------------------------------------------------


def _admin(settings: Settings) -> AIOKafkaAdminClient:
    return kafka.admin(settings, client_id="audience-relay-partitions")


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    return kafka.consumer(
        settings,
        client_id="audience-relay-partitions",
        max_partition_fetch_bytes=16 << 20,
        fetch_max_bytes=64 << 20,
        # One partition is read at a time; a fetch waiting for data that will never come (the
        # default 500 ms) would be paid on every switch to the next partition.
        fetch_max_wait_ms=20,
    )


async def _counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    # describe_topics would auto-create a missing topic on brokers that allow it: list first.
    existing = set(await admin.list_topics())
    wanted = [n for n in names if n in existing]
    counts = dict.fromkeys(names, 0)
    if wanted:
        for d in await admin.describe_topics(wanted):
            if not d["error_code"]:
                counts[d["topic"]] = len(d["partitions"])
    return counts


async def _read_move(settings: Settings, exists: bool) -> dict[str, Any] | None:
    if not exists:
        return None
    consumer = _consumer(settings)
    await consumer.start()
    try:
        tp = TopicPartition(state_topic(settings), 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        if end == 0:
            return None
        consumer.seek(tp, end - 1)
        record = await consumer.getone(tp)
        value = orjson.loads(record.value) if record.value else None
        return value if isinstance(value, dict) else None
    finally:
        await consumer.stop()


async def read_state(settings: Settings, topics: list[Topic]) -> ClusterState:
    """Partition counts, the consumer groups reading changed topics, and any move on record."""
    names, groups = TopicNames.from_settings(settings), GroupNames.from_settings(settings)
    keyed = {
        names.segment_events,
        names.membership_changes,
        names.field_changes,
        names.membership,
        names.deliveries,
    }
    admin = _admin(settings)
    await admin.start()
    try:
        counts = await _counts(admin, [t.name for t in topics] + [names.analytics, state_topic(settings)])
        analytics = counts.pop(names.analytics)
        has_state = counts.pop(state_topic(settings)) > 0
        sinks = [groups.sink(s) for s in SINKS]
        known = [groups.split, groups.tables, groups.membership, *sinks]
        listed = [g[0] for g in await admin.list_consumer_groups()]
        candidates = list(dict.fromkeys(known + listed))
        offsets = await asyncio.gather(*(admin.list_consumer_group_offsets(g) for g in candidates))
        reads: dict[str, set[str]] = {}
        for g, committed in zip(candidates, offsets, strict=True):
            topics_read = {tp.topic for tp in committed if tp.topic in keyed or tp.topic == names.raw}
            if g == groups.split:
                topics_read |= {names.raw}
            if g == groups.membership:
                topics_read |= {names.segment_events}
            if topics_read:
                reads[g] = topics_read
        members: dict[str, int] = {}
        relevant = list(dict.fromkeys(known + list(reads)))
        # One group per request: aiokafka 0.14 fails to decode a response describing several.
        described = await asyncio.gather(*(admin.describe_consumer_groups([g]) for g in relevant))
        for responses in described:
            for response in responses:
                for _, group_id, _, _, _, group_members, *_ in response.groups:
                    members[group_id] = len(group_members)
        for sink in sinks:
            if members.get(sink):  # a running sink that has not committed yet still reads it all
                reads.setdefault(sink, set()).add(names.membership_changes)
        committed_by = dict(zip(candidates, offsets, strict=True))
    finally:
        await admin.close()
    parts = [
        TopicPartition(name, p)
        for name in {names.raw, *keyed}
        if counts.get(name, 0)
        for p in range(counts[name])
    ]
    ends: dict[TopicPartition, int] = {}
    starts: dict[TopicPartition, int] = {}
    if parts:
        consumer = _consumer(settings)
        await consumer.start()
        try:
            ends = await consumer.end_offsets(parts)
            starts = await consumer.beginning_offsets(parts)
        finally:
            await consumer.stop()
    found = []
    for g in relevant:
        lag: dict[str, int] = {}
        for topic in sorted(reads.get(g, set())):
            total = 0
            for tp in (tp for tp in parts if tp.topic == topic):
                meta = committed_by[g].get(tp)
                done = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
                total += max(0, ends[tp] - done)
            lag[topic] = total
        if lag or members.get(g, 0):
            found.append(Group(g, members.get(g, 0), lag))
    move = await _read_move(settings, has_state)
    left = {names.analytics: analytics} if analytics else {}
    return ClusterState(counts, found, move, left)


async def scan_partition(
    consumer: AIOKafkaConsumer,
    topic: Topic,
    partition: int,
    to: int,
    bar: tqdm,
    scanned: list[int] | None = None,
    until: int | None = None,
) -> dict[bytes, tuple[int, bytes]]:
    """Read one partition up to its current end; the keys that must move (see ``MoveFinder``)."""
    assert topic.partition_key is not None
    tp = TopicPartition(topic.name, partition)
    consumer.assign([tp])
    start = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp] if until is None else until
    finder = MoveFinder(partition, to, topic.partition_key)
    scanned = scanned if scanned is not None else [0]  # records read, for the caller's summary
    consumer.seek(tp, start)
    position = start
    while position < end:
        got = await consumer.getmany(tp, timeout_ms=1000, max_records=20_000)
        records = [r for r in got.get(tp, []) if r.offset < end]
        for r in records:
            finder.add(r.key, r.value)
        bar.update(len(records))
        scanned[0] += len(records)
        position = await consumer.position(tp)
    return finder.moves()


async def count_moves(
    settings: Settings, topics: list[Topic], state: ClusterState, to: int, progress: bool
) -> dict[str, int]:
    """Keys of each state topic that a move to ``to`` partitions would move (reads, changes nothing)."""
    out: dict[str, int] = {}
    consumer = _consumer(settings)
    await consumer.start()
    try:
        for topic in topics:
            if topic.role != "state" or not state.counts.get(topic.name):
                continue
            with tqdm(unit="record", desc=f"scan {topic.name}", disable=not progress, leave=False) as bar:
                out[topic.name] = 0
                for p in range(state.counts[topic.name]):
                    out[topic.name] += len(await scan_partition(consumer, topic, p, to, bar))
    finally:
        await consumer.stop()
    return out


async def _write_state(settings: Settings, record: dict[str, Any]) -> None:
    admin = _admin(settings)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    state_topic(settings),
                    1,
                    settings.replication_factor,
                    topic_configs={"cleanup.policy": "compact", **replica_configs(settings)},
                )
            ]
        )
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()
    producer = kafka.producer(settings, client_id="audience-relay-partitions")
    await producer.start()
    try:
        await producer.send_and_wait(state_topic(settings), orjson.dumps(record), key=_STATE_KEY, partition=0)
    finally:
        await producer.stop()


async def raise_partitions(settings: Settings, counts: Mapping[str, int], to: int) -> list[str]:
    """Give every topic below ``to`` partitions ``to`` partitions; wait until metadata shows them."""
    below = [name for name, n in counts.items() if 0 < n < to]
    if not below:
        return []
    admin = _admin(settings)
    await admin.start()
    try:
        await admin.create_partitions({name: NewPartitions(total_count=to) for name in below})
        deadline = time.monotonic() + 60
        while True:
            now = await _counts(admin, below)
            if all(n == to for n in now.values()):
                return below
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not show {to} partitions in time: {now}")
            await asyncio.sleep(0.2)  # the controller propagates metadata asynchronously
    finally:
        await admin.close()


async def _send_all(
    producer: AIOKafkaProducer,
    items: Iterable[tuple[str, int, bytes | None, bytes | None, list[tuple[str, bytes]]]],
    bar: tqdm,
) -> int:
    """Send (topic, partition, key, value, headers) and wait for every acknowledgement."""
    pending: list[asyncio.Future[Any]] = []
    sent = 0
    for topic, partition, key, value, headers in items:
        pending.append(await producer.send(topic, value=value, key=key, partition=partition, headers=headers))
        sent += 1
        if len(pending) >= 20_000:
            await asyncio.gather(*pending)
            bar.update(len(pending))
            pending = []
    await asyncio.gather(*pending)
    bar.update(len(pending))
    return sent


@dataclass
class Moved:
    """What ``apply`` did to one state topic."""

    keys: int = 0
    scanned: int = 0


async def move_keys(settings: Settings, topic: Topic, partitions: int, progress: bool) -> Moved:
    """Move every live key of ``topic`` to its identifier's partition under ``partitions``.

    Per source partition, the values are written and acknowledged before the old copies are tombstoned.
    """
    moved = Moved()
    scanned = [0]
    consumer = _consumer(settings)
    producer = kafka.producer(
        settings,
        client_id="audience-relay-partitions",
        linger_ms=10,
        max_batch_size=1 << 20,
        max_request_size=16 << 20,
    )
    await consumer.start()
    await producer.start()
    try:
        with (
            tqdm(unit="record", desc=f"read  {topic.name}", disable=not progress) as read_bar,
            tqdm(unit="record", desc=f"write {topic.name}", disable=not progress) as write_bar,
        ):
            # Records this run appends are on their new partition already: read only what was there.
            tps = [TopicPartition(topic.name, p) for p in range(partitions)]
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                p = tp.partition
                moves = await scan_partition(consumer, topic, p, partitions, read_bar, scanned, ends[tp])
                if not moves:
                    continue
                await _send_all(
                    producer,
                    (
                        (topic.name, target, key, value, [(MOVED_FROM, str(p).encode())])
                        for key, (target, value) in moves.items()
                    ),
                    write_bar,
                )
                await _send_all(
                    producer,
                    (
                        (topic.name, p, key, None, [(MOVED_TO, str(t).encode())])
                        for key, (t, _) in moves.items()
                    ),
                    write_bar,
                )
                moved.keys += len(moves)
            moved.scanned = scanned[0]
    finally:
        await producer.stop()
        await consumer.stop()
    return moved


async def move_pending_events(settings: Settings, partitions: int, progress: bool) -> int:
    """Re-place segment events the processors have not processed yet; returns how many records were written.

    For each partition with uncommitted ``SegmentEvents`` records of which some events belong
    elsewhere now, every uncommitted record is re-grouped by its events' new partitions and written,
    in order, there (possibly to this same partition, at its end, so one identifier's events keep
    their order); then the membership stage's group commits the partition's old end. A crash between
    the two copies some events twice: a repeated event changes nothing in the table
    (``processors.membership.decide``), so it emits nothing either. An unreadable record stays.
    """
    topic = TopicNames.from_settings(settings).segment_events
    group = GroupNames.from_settings(settings).membership
    admin = _admin(settings)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    reader, committer = (
        _consumer(settings),
        kafka.consumer(settings, group_id=group, client_id="audience-relay-partitions"),
    )
    producer = kafka.producer(settings, client_id="audience-relay-partitions", linger_ms=10)
    moved = 0
    await reader.start()
    await committer.start()
    await producer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await reader.end_offsets(tps)
        starts = await reader.beginning_offsets(tps)
        with tqdm(unit="record", desc=f"move unprocessed {topic}", disable=not progress) as bar:
            for tp in tps:
                meta = committed.get(tp)
                begin = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
                if begin >= ends[tp]:
                    continue
                reader.assign([tp])
                reader.seek(tp, begin)
                pending: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
                while await reader.position(tp) < ends[tp]:
                    got = await reader.getmany(tp, timeout_ms=1000)
                    for r in got.get(tp, []):
                        if r.offset >= ends[tp]:
                            continue
                        headers = list(r.headers or ())
                        groups = regroup(r.value, partitions)
                        if groups is None:
                            pending.append((tp.partition, r.key, r.value, headers))
                            continue
                        pending.extend((target, None, value, headers) for target, value in groups.items())
                if all(target == tp.partition for target, *_ in pending):
                    continue  # already where their identifiers belong: processed in place
                await _send_all(producer, ((topic, t, k, v, h) for t, k, v, h in pending), bar)
                committer.assign([tp])
                await committer.commit({tp: ends[tp]})
                moved += len(pending)
    finally:
        await producer.stop()
        await committer.stop()
        await reader.stop()
    return moved


# --- the commands ---------------------------------------------------------------------------------


def _header(out: IO[str], settings: Settings, state: ClusterState, topics: list[Topic], to: int) -> None:
    print(
        f"prefix {settings.topic_prefix} on {settings.kafka_bootstrap_servers}: move to {to} partitions",
        file=out,
    )
    print(f"  {'topic':52s} {'now':>5s} {'new':>5s}  role", file=out)
    for t in topics:
        n = state.counts.get(t.name, 0)
        print(f"  {t.name:52s} {n if n else 'none':>5} {max(n, to):>5d}  {t.role}: {t.why}", file=out)


def _groups(out: IO[str], state: ClusterState) -> None:
    if not state.groups:
        print("consumer groups reading these topics: none", file=out)
        return
    print("consumer groups reading these topics (must be stopped and drained):", file=out)
    for g in state.groups:
        lag = ", ".join(f"{topic} lag {n}" for topic, n in sorted(g.lag.items())) or "no commits"
        print(f"  {g.name:52s} members {g.members}  {lag}", file=out)


async def plan(settings: Settings, to: int, out: IO[str], progress: bool = True) -> int:
    """Print what ``apply --to`` would do and every check that fails; changes nothing."""
    topics = managed_topics(settings)
    state = await read_state(settings, topics)
    verdict = check(settings, topics, state, to)
    _header(out, settings, state, topics, to)
    _groups(out, state)
    if not any(e.startswith("topic ") for e in verdict.errors):
        # After a finished move this is the check that every key is where its hash puts it (0).
        moves = await count_moves(settings, topics, state, to, progress)
        for name, n in moves.items():
            print(f"keys to move in {name}: {n}", file=out)
    for note in verdict.notes:
        print(f"note: {note}", file=out)
    for error in verdict.errors:
        print(f"refused: {error}", file=out)
    if verdict.errors:
        return EXIT_REFUSED
    if not verdict.done:
        print(
            f"apply would: record the move, raise the topics above to {to} partitions, move the keys, "
            f"record it done. Then set RELAY_PARTITIONS={to} for every worker and start them: each "
            "rebuilds its local table from the changelog.",
            file=out,
        )
    return 0


async def apply(settings: Settings, to: int, out: IO[str], progress: bool = True) -> int:
    """Raise the partition counts to ``to`` and move every key; safe to run again after a crash."""
    started = time.monotonic()
    topics = managed_topics(settings)
    state = await read_state(settings, topics)
    verdict = check(settings, topics, state, to)
    for note in verdict.notes:
        print(f"note: {note}", file=out)
    if verdict.errors:
        _groups(out, state)
        for error in verdict.errors:
            print(f"refused: {error}", file=out)
        return EXIT_REFUSED
    if verdict.done:
        return 0
    before = dict(state.counts)
    if verdict.resume:
        assert state.move is not None
        before = {**before, **state.move.get("from", {})}
        began = state.move["started_at"]
    else:
        began = _now()
        await _write_state(settings, {"state": "started", "to": to, "from": before, "started_at": began})
    raised = await raise_partitions(settings, state.counts, to)
    print(f"partitions raised to {to}: {', '.join(raised) if raised else 'already done'}", file=out)
    moved: dict[str, Moved] = {}
    events = await move_pending_events(settings, to, progress)
    if events:
        print(f"unprocessed segment-events records moved to their new partitions: {events}", file=out)
    for topic in topics:
        if topic.role == "state":
            moved[topic.name] = await move_keys(settings, topic, to, progress)
    summary = {name: m.keys for name, m in moved.items()}
    await _write_state(
        settings,
        {
            "state": "done",
            "to": to,
            "from": before,
            "started_at": began,
            "finished_at": _now(),
            "moved": summary,
        },
    )
    seconds = time.monotonic() - started
    print(f"done in {seconds:.1f} s", file=out)
    print(f"  {'topic':52s} {'before':>6s} {'after':>6s}  keys moved (records read)", file=out)
    for t in topics:
        m = moved.get(t.name)
        what = f"{m.keys} ({m.scanned})" if m else "-"
        print(f"  {t.name:52s} {before.get(t.name, 0):>6d} {to:>6d}  {what}", file=out)
    print(
        f"next: set RELAY_PARTITIONS={to} for every worker (and `topics create`), then start the workers "
        "and sinks; workers rebuild their local tables from the membership topic.",
        file=out,
    )
    return 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def check_worker(settings: Settings) -> int:
    """Before a worker starts: the topics' partition count, which must equal ``RELAY_PARTITIONS``.

    Raises ``PartitionsError`` when a partition move has not finished or the setting disagrees with
    the segment-events or membership topic (the table's changelog: faust would otherwise stop later
    with PartitionsMismatch, or the split would place events by the wrong hash). Topics that do not
    exist yet are no disagreement: the worker creates them with ``RELAY_PARTITIONS``.
    """
    names = TopicNames.from_settings(settings)
    admin = _admin(settings)
    await admin.start()
    try:
        counts = await _counts(admin, [names.segment_events, names.membership, state_topic(settings)])
    finally:
        await admin.close()
    move = await _read_move(settings, counts.pop(state_topic(settings)) > 0)
    if move is not None and move.get("state") == "started":
        raise PartitionsError(
            f"a move to {move.get('to')} partitions started at {move.get('started_at')} has not finished: "
            f"run `audience-relay partitions apply --to {move.get('to')}` before starting workers"
        )
    for name, n in counts.items():
        if n and n != settings.partitions:
            raise PartitionsError(
                f"RELAY_PARTITIONS={settings.partitions} but {name} has {n} partitions "
                f"(see `audience-relay partitions`): set RELAY_PARTITIONS={n} for every worker"
            )
    return settings.partitions
