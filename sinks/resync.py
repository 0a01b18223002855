"""``audience-relay sink resync NAME [--audience ID …]``: send current members to one destination.

A destination that is new, or lost data, only sees changes from the moment its sink starts
(``membership-changes`` keeps 7 days). The current members are in the compacted ``membership``
topic (key ``identifier`` + ``\\x1f`` + ``audience_id``, value ``MembershipState``); a resync sends
each member of the chosen audiences to the one destination as an *enter*, in its format, with its
identifier and audience lists, through the same deliverer as the stream (retries, splitting refused
batches, dead letters, the delivery log with ``origin: resync``). Other destinations are untouched.

- **Snapshot.** A run reads each partition up to the end offset it saw when the run began, keeps
  the newest state per key and sends the members among them (tombstones and ``member: false``
  states send nothing). Changes after the snapshot reach the destination through its sink.
- **Deterministic batches.** A partition's members are taken in the offset order of their newest
  state and cut into batches of the destination's batch size; a batch's ``Idempotency-Key`` is
  derived from its change ids in the ``resync`` namespace (a resynced enter keeps the change id of
  the enter it repeats). The same snapshot therefore gives the same batches and keys — when a run
  resumes, and when it is repeated — and compaction does not move the newest states.
- **Resumable.** Progress is committed per partition for the consumer group
  ``<prefix>.resync.<name>`` as the offset after the last batch done in order, with the run's
  snapshot end and audience choice in the commit metadata. Running the same command again resumes
  an unfinished run (batches before the committed offset are not sent again); once every partition
  is finished, or with other ``--audience`` values, or with ``--restart``, it starts a new run
  from a new snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from tqdm import tqdm

from audience_relay import kafka
from audience_relay.exits import ExitCode, Fatal
from audience_relay.kafkautil import end_offsets
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from schemas.records import MembershipChange
from sinks.deliver import Deliverer, DestinationFailing, Entry
from sinks.destinations import build
from sinks.scrub import secrets_of
from sinks.state import scan

log = logging.getLogger("sinks.resync")

TAG = "resync1"
#: Failed (not refused) attempts of one request before the resync stops (run it again to resume).
MAX_ATTEMPTS = 10


@dataclass
class ResyncReport:
    """What one resync run did."""

    members: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    filtered: int = 0
    unknown_identifier: int = 0
    #: Members in batches an interrupted earlier run of the same snapshot had already sent.
    already_sent: int = 0
    resumed: bool = False


@dataclass(frozen=True)
class Progress:
    """What a partition's commit says about a run."""

    offset: int
    end: int
    selection: str
    #: The membership topic's partition count when the run began (a partition move voids the run).
    partitions: int

    def encode(self) -> str:
        return f"{TAG}|end={self.end}|sel={self.selection}|parts={self.partitions}"

    @staticmethod
    def decode(offset: int, text: str | None) -> Progress | None:
        if not text or not text.startswith(TAG + "|"):
            return None
        try:
            fields = dict(part.split("=", 1) for part in text.split("|")[1:])
            return Progress(offset, int(fields["end"]), fields["sel"], int(fields["parts"]))
        except (KeyError, ValueError):
            return None

    def same_run(self, selection: str, partitions: int) -> bool:
        return self.selection == selection and self.partitions == partitions


def resync_group(settings: Settings, name: str) -> str:
    """The consumer group whose commits hold a resync's progress for ``name``."""
    return GroupNames.from_settings(settings).resync(name)


def selection_id(audiences: list[str]) -> str:
    """A short stable id of an ``--audience`` choice (order and repeats do not matter)."""
    return hashlib.blake2b("\x1f".join(sorted(set(audiences))).encode(), digest_size=6).hexdigest()


def chosen(audiences: list[str], audience_id: str, slug: str | None) -> bool:
    """True when the audience is among the chosen ones (ids or slugs, globs); no choice: all."""
    if not audiences:
        return True
    names = [audience_id] + ([slug] if slug else [])
    return any(fnmatchcase(n, g) for n in names for g in audiences)


def enter_of(state: dict[str, Any], match_field: str) -> dict[str, Any]:
    """The enter change a member's state stands for (the change id of the enter that decided it)."""
    identifier, audience_id = state["identifier"], state["audience_id"]
    return {
        "schema_version": 1,
        "change_id": MembershipChange.make_id(identifier, audience_id, "entered", state["event_id"]),
        "identifier": identifier,
        "match_field": state.get("match_field") or match_field,
        "identifiers": state.get("identifiers") or {},
        "audience_id": audience_id,
        "audience_slug": state.get("audience_slug"),
        "change": "entered",
        "member": True,
        "event_time": state.get("updated_at") or state.get("entered_at"),
        "entered_at": state.get("entered_at"),
        "exited_at": state.get("exited_at"),
        "seconds_in_audience": None,
        "event_id": state["event_id"],
        "lytics_user_id": state.get("lytics_user_id"),
        "source": "resync",
        "request_id": "resync",
    }


async def members_of(
    settings: Settings, partition: int, end: int, audiences: list[str]
) -> list[tuple[int, dict[str, Any]]]:
    """(offset, state) of every member of the chosen audiences in one partition's snapshot, in the
    offset order of each key's newest state."""
    topic = TopicNames.from_settings(settings).membership
    newest: dict[bytes, tuple[int, bytes | None]] = {}
    async for record in scan(settings, topic, [partition], ends={partition: end}):
        if record.key is not None:
            newest[record.key] = (record.offset, record.value)
    out = []
    for offset, value in sorted((v for v in newest.values() if v[1] is not None), key=lambda v: v[0]):
        assert value is not None
        state = orjson.loads(value)
        if state.get("member") and chosen(audiences, state["audience_id"], state.get("audience_slug")):
            out.append((offset, state))
    return out


async def _progress(settings: Settings, group: str, parts: list[TopicPartition]) -> dict[int, Progress]:
    admin = kafka.admin(settings, client_id=f"audience-relay-resync-{group}")
    await admin.start()
    try:
        for attempt in range(10):
            try:
                committed = await admin.list_consumer_group_offsets(group, partitions=parts)
                break
            except KafkaError as exc:
                # A group nobody used yet has no coordinator for a moment (retriable).
                if attempt == 9 or not exc.retriable:
                    raise
                await asyncio.sleep(0.2 * 2 ** min(attempt, 4))
    finally:
        await admin.close()
    out = {}
    for tp, meta in committed.items():
        progress = Progress.decode(meta.offset, meta.metadata) if meta.offset >= 0 else None
        if progress is not None:
            out[tp.partition] = progress
    return out


async def resync(
    settings: Settings,
    name: str,
    audiences: list[str] | None = None,
    *,
    restart: bool = False,
    progress: bool = True,
) -> ResyncReport:
    """Send the current members of ``audiences`` (all when empty) to the destination ``name``."""
    audiences = list(audiences or [])
    topics = TopicNames.from_settings(settings)
    group = resync_group(settings, name)
    selection = selection_id(audiences)
    ends = await end_offsets(settings, topics.membership)
    parts = [TopicPartition(topics.membership, p) for p in sorted(ends)]
    before = {} if restart else await _progress(settings, group, parts)
    count = len(ends)
    unfinished = {p: pr for p, pr in before.items() if pr.same_run(selection, count) and pr.offset < pr.end}
    report = ResyncReport(resumed=bool(unfinished))
    plan: dict[int, Progress | None]
    if unfinished:
        # Resume the run: its snapshot ends, from where each partition got to.
        plan = {p: before[p] if p in before and before[p].same_run(selection, count) else None for p in ends}
    else:
        plan = {p: Progress(0, ends[p], selection, count) for p in sorted(ends)}
    spec = build(name, settings)
    deliverer = Deliverer(
        settings, spec, secrets_of(settings), "resync", key_namespace="resync", max_attempts=MAX_ATTEMPTS
    )
    consumer = kafka.consumer(settings, group_id=group, client_id=f"audience-relay-resync-{name}")
    await consumer.start()
    await deliverer.start()
    bar = tqdm(total=0, unit="member", desc=f"resync {name}", disable=not progress)
    try:
        consumer.assign(parts)
        if not unfinished and plan:
            # A new run: every partition's snapshot end is on record before anything is sent, so an
            # interrupted run resumes the same snapshot.
            await consumer.commit(
                {
                    TopicPartition(topics.membership, p): OffsetAndMetadata(pr.offset, pr.encode())
                    for p, pr in plan.items()
                    if pr is not None
                }
            )
        for partition, planned in plan.items():
            if planned is None or planned.offset >= planned.end:
                continue  # a partition this run finished already (or had nothing to send)
            tp = TopicPartition(topics.membership, partition)
            members = await members_of(settings, partition, planned.end, audiences)
            bar.total += len(members)
            bar.refresh()
            report.members += len(members)
            await _send_partition(consumer, deliverer, tp, planned, members, report, bar)
    except DestinationFailing as exc:
        raise Fatal(
            f"{name} keeps failing ({exc}); resync stopped, run it again to resume", ExitCode.FAILURE
        ) from None
    finally:
        bar.close()
        await deliverer.stop()
        await consumer.stop()
    log.info(
        "resync finished",
        extra={
            "sink": name,
            "members": report.members,
            "delivered": report.delivered,
            "dead_lettered": report.dead_lettered,
            "filtered": report.filtered,
            "unknown_identifier": report.unknown_identifier,
            "already_sent": report.already_sent,
        },
    )
    return report


async def _send_partition(
    consumer: AIOKafkaConsumer,
    deliverer: Deliverer,
    tp: TopicPartition,
    planned: Progress,
    members: list[tuple[int, dict[str, Any]]],
    report: ResyncReport,
    bar: tqdm,
) -> None:
    size = deliverer.spec.batch_size
    match_field = deliverer.settings.match_field
    batches = [members[i : i + size] for i in range(0, len(members), size)]
    todo = {i for i, b in enumerate(batches) if b[-1][0] >= planned.offset}
    skipped = sum(len(b) for i, b in enumerate(batches) if i not in todo)
    report.already_sent += skipped
    bar.update(skipped)
    done: set[int] = set()
    committed_upto = -1  # index of the last batch whose end is committed
    lock = asyncio.Lock()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in sorted(todo):
        queue.put_nowait(i)

    async def commit_in_order() -> None:
        nonlocal committed_upto
        upto = committed_upto
        while upto + 1 < len(batches) and (upto + 1 in done or upto + 1 not in todo):
            upto += 1
        if upto == committed_upto:
            return
        committed_upto = upto
        offset = planned.end if upto == len(batches) - 1 else batches[upto][-1][0] + 1
        progress = Progress(offset, planned.end, planned.selection, planned.partitions)
        await consumer.commit({tp: OffsetAndMetadata(offset, progress.encode())})

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            entries = [
                Entry(
                    None,
                    s["identifier"].encode(),
                    tp.topic,
                    tp.partition,
                    offset,
                    change=enter_of(s, match_field),
                )
                for offset, s in batches[i]
            ]
            tally = await deliverer.process(entries)
            report.delivered += tally.delivered
            report.dead_lettered += tally.dead_lettered
            report.filtered += tally.filtered
            report.unknown_identifier += tally.unknown_identifier
            bar.update(len(entries))
            async with lock:
                done.add(i)
                await commit_in_order()

    await asyncio.gather(*(worker() for _ in range(max(1, deliverer.spec.concurrency))))
    async with lock:
        if not batches:
            await consumer.commit({tp: OffsetAndMetadata(planned.end, planned.encode())})
        else:
            await commit_in_order()
