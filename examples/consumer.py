"""Reading what audience-relay publishes: a runnable example for downstream teams.

    python examples/consumer.py [--bootstrap HOST:PORT] [--prefix lytics] [--group NAME]
                                [--until-end] [--list-members] [--schemas DIR]

It needs only aiokafka (with its lz4 codec: ``pip install "aiokafka[lz4]"``; the relay compresses its
records with lz4 by default), orjson and jsonschema, and reads three topics:

- ``<prefix>.membership`` (compacted; key ``identifier`` + ``\\x1f`` + ``audience_id``, value a
  MembershipState) into the current members of every audience. The topic is a table: it is read from
  its beginning at every start, never with committed offsets. A null value (tombstone) removes the key
  *from that partition only*: after ``audience-relay partitions apply`` a key's value is copied to its
  new partition (header ``relay-moved-from``) and then tombstoned on the old one (``relay-moved-to``),
  which means "moved", not "left the audience". Partitions are read in no particular order, so for a
  moment a key may be live on two partitions; the copy on the partition its identifier hashes to now
  (Kafka's default partitioner, murmur2) is the current one.
- ``<prefix>.membership-changes`` (MembershipChange, keyed by identifier) and
  ``<prefix>.field-changes`` (FieldChange): each record is printed once; a repeat (same ``change_id``,
  which is deterministic: the relay emits a change again after a worker crash) is dropped. With
  ``--group`` the positions are committed to that consumer group after each batch is handled, and the
  next start first reads back up to ``--lookback`` records per partition before the committed
  position, only to remember their change ids: a repeat written just after a restart is still
  recognised.

Every record is validated against the committed JSON Schema for its ``schema_version``
(``schemas/json/<name>.v<version>.schema.json``, found by its ``$id``, checked with the dialect its
``$schema`` names, ``date-time`` formats included). A record that does not validate is reported and
skipped; it never stops the reader.

Output, one JSON object per line on stdout: ``membership-change``, ``field-change``, ``repeat`` and
``invalid`` lines as records arrive, ``caught-up`` once every partition has been read to where it
ended at start, and a ``snapshot`` (members per audience and counts) at exit: after catching up with
``--until-end``, else on SIGTERM or Ctrl-C. Partitions added while it runs are picked up within
``--refresh-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeAlias

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from jsonschema import FormatChecker
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

#: The committed schemas, when this file is run from a checkout of audience-relay.
DEFAULT_SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "json"
#: Topic suffix -> the name of the schema its records follow (the version comes with each record).
SCHEMA_OF = {
    "membership": "membership-state",
    "membership-changes": "membership-change",
    "field-changes": "field-change",
}
MOVED_TO = "relay-moved-to"
#: Kafka's default partitioner (murmur2 of the key), which places every identifier-keyed record.
_PARTITIONER = DefaultPartitioner()
#: At most this many problems are reported per invalid record.
MAX_PROBLEMS = 5

Record: TypeAlias = ConsumerRecord[bytes, bytes]


def schema_id(name: str, version: int) -> str:
    """The ``$id`` of a published schema, e.g. ``urn:audience-relay:schema:membership-change.v2``."""
    return f"urn:audience-relay:schema:{name}.v{version}"


# --- validation ------------------------------------------------------------------------------------

#: Only the format the schemas use, checked with the standard library (jsonschema's own date-time
#: check needs an optional package).
FORMATS = FormatChecker(formats=())


def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True  # the "type" keyword reports it
    # RFC 3339: a date, "T", a time and an offset (fromisoformat alone also takes a space or no offset).
    return "T" in value.upper() and datetime.fromisoformat(value).tzinfo is not None


FORMATS.checks("date-time", raises=ValueError)(_is_date_time)


class Schemas:
    """The published JSON Schemas, by ``$id``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._by_id: dict[str, Validator] = {}
        for path in sorted(directory.glob("*.schema.json")):
            schema = orjson.loads(path.read_bytes())
            sid = schema.get("$id")
            if sid != f"urn:audience-relay:schema:{path.name.removesuffix('.schema.json')}":
                raise ValueError(f"{path}: $id {sid!r} does not match the file name")
            cls = validator_for(schema)  # the dialect its "$schema" names
            cls.check_schema(schema)
            self._by_id[sid] = cls(schema, format_checker=FORMATS)
        if not self._by_id:
            raise ValueError(f"no *.schema.json in {directory}")

    def problems(self, name: str, record: Any) -> list[str]:
        """Why ``record`` is not a valid ``name`` record of its ``schema_version``; [] when it is."""
        if not isinstance(record, dict):
            return ["not a JSON object"]
        version = record.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            return [f"schema_version is {version!r}, not an integer"]
        validator = self._by_id.get(schema_id(name, version))
        if validator is None:
            return [f"no schema {schema_id(name, version)} in {self.directory}"]
        return [
            f"{'/'.join(map(str, error.absolute_path)) or '(record)'}: {error.message}"
            for error in validator.iter_errors(record)
        ][:MAX_PROBLEMS]


# --- the membership table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """What the view keeps of one key's state on one partition."""

    member: bool
    updated_at: datetime


class MembershipView:
    """The current state of every (identifier, audience) key, rebuilt from ``<prefix>.membership``.

    Each partition is a table of its own: a value sets the key *on that partition*, a tombstone
    removes it from that partition. A key is live on one partition, except while a partition move is
    half read (its copy on the new partition seen, the old partition's tombstone not yet): then the
    copy on the partition its identifier hashes to under the topic's current partition count wins.
    """

    def __init__(self) -> None:
        self._live: dict[int, dict[bytes, Entry]] = {}
        self.partitions = 0  # the topic's current partition count

    def apply(self, partition: int, key: bytes, state: Mapping[str, Any] | None) -> None:
        """One record of the topic (``state`` None: a tombstone), in offset order per partition."""
        rows = self._live.setdefault(partition, {})
        if state is None:
            rows.pop(key, None)
        else:
            rows[key] = Entry(bool(state["member"]), datetime.fromisoformat(state["updated_at"]))

    def home(self, key: bytes) -> int:
        """The partition the relay writes ``key`` to now: murmur2 of its identifier, like Kafka's default."""
        every = list(range(max(self.partitions, 1)))
        return int(_PARTITIONER(key.split(b"\x1f", 1)[0], every, every))

    def current(self) -> dict[bytes, Entry]:
        """Key -> its current state."""
        out: dict[bytes, Entry] = {}
        chosen_home: set[bytes] = set()
        every = list(range(max(self.partitions, 1)))
        for partition, rows in self._live.items():
            for key, entry in rows.items():
                if key in chosen_home:
                    continue
                if _PARTITIONER(key.split(b"\x1f", 1)[0], every, every) == partition:
                    out[key] = entry
                    chosen_home.add(key)
                elif key not in out or entry.updated_at > out[key].updated_at:
                    out[key] = entry  # no copy on its home partition read (yet): the newest elsewhere
        return out

    def members(self) -> dict[str, list[str]]:
        """Audience id -> its current members (identifiers, sorted)."""
        out: dict[str, list[str]] = {}
        for key, entry in self.current().items():
            if entry.member:
                identifier, _, audience = key.decode().partition("\x1f")
                out.setdefault(audience, []).append(identifier)
        return {audience: sorted(ids) for audience, ids in sorted(out.items())}


# --- repeats --------------------------------------------------------------------------------------------


class SeenIds:
    """The last ``capacity`` change ids seen (a repeat follows its original closely)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first

    def add(self, change_id: str) -> bool:
        """Remember ``change_id``; False when it was seen already (a repeat)."""
        if change_id in self._ids:
            return False
        self._ids[change_id] = None
        if len(self._ids) > self.capacity:
            del self._ids[next(iter(self._ids))]
        return True


# --- reading --------------------------------------------------------------------------------------------


@dataclass
class Options:
    """What to read and how (the command line)."""

    bootstrap: str
    prefix: str
    group: str | None = None
    until_end: bool = False
    list_members: bool = False
    schemas: Path = DEFAULT_SCHEMAS
    lookback: int = 10_000
    window: int = 1_000_000
    refresh_seconds: float = 30.0


@dataclass
class Counts:
    """What was read from one topic."""

    records: int = 0
    handled: int = 0
    repeats: int = 0
    invalid: int = 0
    moved_tombstones: int = 0
    other_tombstones: int = 0


@dataclass
class Reader:
    """The state of one run: the view, the ids seen, the counts; prints as it goes."""

    options: Options
    schemas: Schemas
    out: TextIO
    view: MembershipView = field(default_factory=MembershipView)
    counts: dict[str, Counts] = field(default_factory=dict)
    seen: SeenIds = field(init=False)
    #: Per change partition, the committed position of the previous run: records before it are only
    #: remembered (their change ids), never printed again.
    replay_until: dict[TopicPartition, int] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seen = SeenIds(self.options.window)
        self.counts = {self.topic(suffix): Counts() for suffix in SCHEMA_OF}

    def topic(self, suffix: str) -> str:
        return f"{self.options.prefix}.{suffix}"

    def emit(self, line: Mapping[str, Any]) -> None:
        self.out.write(orjson.dumps(line).decode() + "\n")
        self.out.flush()

    def _parse(self, record: Record, schema: str) -> dict[str, Any] | None:
        """The record's value when it validates; else reported (and None)."""
        try:
            value = orjson.loads(record.value or b"")
            problems = self.schemas.problems(schema, value)
        except orjson.JSONDecodeError as exc:
            problems = [f"not JSON: {exc}"]
        if not problems:
            return value  # type: ignore[no-any-return]
        self.invalid(record, problems)
        return None

    def invalid(self, record: Record, problems: list[str]) -> None:
        """Report a record that cannot be used (and skip it)."""
        self.counts[record.topic].invalid += 1
        self.emit(
            {
                "kind": "invalid",
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "key": None if record.key is None else record.key.decode(errors="replace"),
                "problems": problems,
            }
        )

    def on_state(self, record: Record) -> None:
        counts = self.counts[record.topic]
        counts.records += 1
        if record.key is None:
            self.invalid(record, ["no key: a state's key is identifier + \\x1f + audience_id"])
            return
        if record.value is None:
            moved = any(name == MOVED_TO for name, _ in record.headers or ())
            if moved:
                counts.moved_tombstones += 1
            else:
                counts.other_tombstones += 1  # the relay writes none; a deletion, should one come
            self.view.apply(record.partition, record.key, None)
            return
        state = self._parse(record, "membership-state")
        if state is None:
            return
        if record.key != f"{state['identifier']}\x1f{state['audience_id']}".encode():
            self.invalid(record, ["the key is not identifier + \\x1f + audience_id of the value"])
            return
        counts.handled += 1
        self.view.apply(record.partition, record.key, state)

    def on_change(self, record: Record, schema: str) -> None:
        tp = TopicPartition(record.topic, record.partition)
        if record.offset < self.replay_until.get(tp, 0):
            # Handled by an earlier run: only its id, to recognise a repeat of it.
            try:
                change_id = orjson.loads(record.value or b"").get("change_id")
            except (orjson.JSONDecodeError, AttributeError):
                return
            if isinstance(change_id, str):
                self.seen.add(change_id)
            return
        counts = self.counts[record.topic]
        counts.records += 1
        change = self._parse(record, schema)
        if change is None:
            return
        if not self.seen.add(change["change_id"]):
            counts.repeats += 1
            self.emit({"kind": "repeat", "topic": record.topic, "change_id": change["change_id"]})
            return
        counts.handled += 1
        if schema == "membership-change":
            self.emit(
                {
                    "kind": "membership-change",
                    "change": change["change"],
                    "identifier": change["identifier"],
                    "audience_id": change["audience_id"],
                    "audience_slug": change.get("audience_slug"),
                    "event_time": change["event_time"],
                    "change_id": change["change_id"],
                }
            )
        else:
            self.emit(
                {
                    "kind": "field-change",
                    "identifier": change["identifier"],
                    "trigger_slug": change.get("trigger_slug"),
                    "fields": sorted(change["fields"]),
                    "event_time": change["event_time"],
                    "change_id": change["change_id"],
                }
            )

    def _counted(self, topic: str) -> dict[str, int]:
        counted = dict(vars(self.counts[topic]))
        if topic == self.topic("membership"):
            del counted["repeats"]  # a table has no repeats, only newer states
        else:
            del counted["moved_tombstones"], counted["other_tombstones"]
        return counted

    def snapshot(self) -> dict[str, Any]:
        members = self.view.members()
        audiences: dict[str, Any] = {}
        for audience, identifiers in members.items():
            audiences[audience] = {"members": len(identifiers)}
            if self.options.list_members:
                audiences[audience]["identifiers"] = identifiers
        return {
            "kind": "snapshot",
            "audiences": audiences,
            "partitions": dict(sorted(self.partitions.items())),
            "topics": {topic: self._counted(topic) for topic in self.counts},
        }


async def partition_counts(options: Options, topics: Sequence[str]) -> dict[str, int]:
    """Topic -> partition count; a topic that does not exist is an error (the relay creates them)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=options.bootstrap, client_id="relay-consumer-example")
    await admin.start()
    try:
        # Listed first: describing a missing topic would create it on a broker that auto-creates.
        missing = set(topics) - set(await admin.list_topics())
        if missing:
            raise SystemExit(f"error: no topic {', '.join(sorted(missing))} at {options.bootstrap}")
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(list(topics))}
    finally:
        await admin.close()


async def assign(consumer: AIOKafkaConsumer, counts: Mapping[str, int]) -> list[TopicPartition]:
    """Assign every partition of ``counts``' topics, keeping the position of those already assigned.

    A partition new to the consumer starts at its committed offset (with a group), else at its start.
    """
    wanted = {TopicPartition(t, p) for t, n in counts.items() for p in range(n)}
    held = consumer.assignment()
    if wanted == held:
        return []
    positions = {tp: await consumer.position(tp) for tp in held}
    consumer.assign(sorted(wanted))
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
    return sorted(wanted - held)


async def read(options: Options, out: TextIO, stop: asyncio.Event) -> Reader:
    """Read the three topics until caught up (``--until-end``) or ``stop``; returns the final state."""
    reader = Reader(options, Schemas(options.schemas), out)
    state_topic = reader.topic("membership")
    change_topics = {reader.topic("membership-changes"): "membership-change"}
    change_topics[reader.topic("field-changes")] = "field-change"
    common: dict[str, Any] = {
        "bootstrap_servers": options.bootstrap,
        "client_id": "relay-consumer-example",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }
    # The table is always read whole, so its consumer never uses a group; the changes resume from
    # the group's committed positions when there is one.
    table = AIOKafkaConsumer(**common)
    changes = AIOKafkaConsumer(group_id=options.group, **common)
    await table.start()
    await changes.start()
    try:
        counts = await partition_counts(options, [state_topic, *change_topics])
        reader.partitions = dict(counts)
        reader.view.partitions = counts[state_topic]
        await assign(table, {state_topic: counts[state_topic]})
        await assign(changes, {t: counts[t] for t in change_topics})
        if options.group is not None:
            await _look_back(changes, reader)
        ends = {**await table.end_offsets(list(table.assignment()))}
        ends.update(await changes.end_offsets(list(changes.assignment())))
        caught_up = False
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + options.refresh_seconds
        while not stop.is_set():
            for records in (await table.getmany(timeout_ms=200, max_records=10_000)).values():
                for record in records:
                    reader.on_state(record)
            batch = await changes.getmany(timeout_ms=200, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    reader.on_change(record, change_topics[tp.topic])
            done = {
                tp: records[-1].offset + 1
                for tp, records in batch.items()
                if records[-1].offset + 1 > reader.replay_until.get(tp, 0)
            }
            if options.group is not None and done:
                # After the batch was handled (printed): at least once; a repeat is dropped by change_id.
                await changes.commit(done)
            if not caught_up and await _reached(table, changes, ends):
                caught_up = True
                reader.emit({"kind": "caught-up"})
                if options.until_end:
                    break
            if loop.time() >= next_refresh:
                next_refresh = loop.time() + options.refresh_seconds
                counts = await partition_counts(options, [state_topic, *change_topics])
                reader.partitions = dict(counts)
                reader.view.partitions = counts[state_topic]
                await assign(table, {state_topic: counts[state_topic]})
                await assign(changes, {t: counts[t] for t in change_topics})
    finally:
        await changes.stop()
        await table.stop()
    return reader


async def _look_back(consumer: AIOKafkaConsumer, reader: Reader) -> None:
    """Start each change partition up to ``--lookback`` records before its committed position."""
    assigned = sorted(consumer.assignment())
    starts = await consumer.beginning_offsets(assigned)
    for tp in assigned:
        committed = await consumer.committed(tp)
        if committed is None:
            continue  # never read by this group: from the start (auto_offset_reset)
        reader.replay_until[tp] = committed
        consumer.seek(tp, max(starts[tp], committed - reader.options.lookback))


async def _reached(
    table: AIOKafkaConsumer, changes: AIOKafkaConsumer, ends: Mapping[TopicPartition, int]
) -> bool:
    for consumer in (table, changes):
        for tp in consumer.assignment():
            if tp in ends and await consumer.position(tp) < ends[tp]:
                return False
    return True


def parse_args(argv: Iterable[str] | None = None) -> Options:
    """The command line (defaults from the relay's own variables where they exist)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"))
    p.add_argument("--prefix", default=os.environ.get("RELAY_TOPIC_PREFIX", "lytics"))
    p.add_argument("--group", help="commit the change topics' positions to this consumer group")
    p.add_argument("--until-end", action="store_true", help="stop once caught up (a snapshot)")
    p.add_argument("--list-members", action="store_true", help="the snapshot lists every member")
    p.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS, help="the *.schema.json files")
    p.add_argument("--lookback", type=int, default=10_000, help="records re-read per change partition")
    p.add_argument("--window", type=int, default=1_000_000, help="change ids kept to drop repeats")
    p.add_argument("--refresh-seconds", type=float, default=30.0, help="how often to look for partitions")
    a = p.parse_args(list(argv) if argv is not None else None)
    return Options(
        bootstrap=a.bootstrap,
        prefix=a.prefix,
        group=a.group,
        until_end=a.until_end,
        list_members=a.list_members,
        schemas=a.schemas,
        lookback=a.lookback,
        window=a.window,
        refresh_seconds=a.refresh_seconds,
    )


async def main(options: Options) -> int:
    """Run until caught up or stopped; print the snapshot; exit 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = await read(options, sys.stdout, stop)
    reader.emit(reader.snapshot())
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
