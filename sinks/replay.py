"""``audience-relay dead-letter replay --sink NAME``: deliver again what a sink gave up.

Rules (README, "The sinks"):

- the replay reads the dead-letter topic from where the last replay stopped (consumer group
  ``<prefix>.dead-letter-replay.<name>``) up to the end it saw when it started, and only the records
  that sink dead-lettered;
- a change a newer change of the same identifier and audience superseded (the compacted
  ``membership`` topic says so, see ``sinks.state.superseded``) is skipped and counted: delivering it
  would make an old word the destination's last one;
- a change the destination still refuses is never lost: a copy goes back to the dead-letter topic
  with ``replay-attempts`` counted up and the new answer, so the next replay tries it again; only
  then does the replay commit past the original;
- when the destination keeps failing (not refusing), the replay stops without committing past the
  change it was trying: run it again later.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import orjson
from aiokafka import ConsumerRecord, TopicPartition
from tqdm import tqdm

from audience_relay import kafka
from audience_relay.exits import ExitCode, Fatal
from audience_relay.kafkautil import end_offsets
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from sinks.deliver import Deliverer, DestinationFailing, Entry
from sinks.destinations import build
from sinks.scrub import secrets_of
from sinks.state import membership_key, read_states, superseded

log = logging.getLogger("sinks.replay")

#: Dead-letter records looked at per round (their states are read from the membership topic at once).
CHUNK = 10_000
#: Failed (not refused) attempts of one request before the replay stops.
MAX_ATTEMPTS = 8


@dataclass
class ReplayReport:
    """What a replay did with the dead-letter records of one sink."""

    delivered: int = 0
    #: Still refused (or still without the identifier to send): appended again to the dead-letter
    #: topic with ``replay-attempts`` counted up, so the next replay tries them again.
    refused: int = 0
    #: Skipped: a newer change of the same identifier and audience superseded them.
    superseded: int = 0
    #: Skipped: the destination's audience lists exclude them now.
    filtered: int = 0


def replay_group(settings: Settings, name: str) -> str:
    """The consumer group whose committed offsets say how far replays of ``name`` got."""
    return GroupNames.from_settings(settings).replay(name)


async def replay_dead_letters(settings: Settings, name: str, *, progress: bool = True) -> ReplayReport:
    """Deliver again every record the sink ``name`` gave up, from where the last replay stopped."""
    topics = TopicNames.from_settings(settings)
    spec = build(name, settings)
    deliverer = Deliverer(settings, spec, secrets_of(settings), "replay", max_attempts=MAX_ATTEMPTS)
    consumer = kafka.consumer(
        settings,
        group_id=replay_group(settings, name),
        client_id=f"audience-relay-replay-{name}",
        auto_offset_reset="earliest",
    )
    ends = await end_offsets(settings, topics.dead_letter)
    parts = [TopicPartition(topics.dead_letter, p) for p in ends]
    report = ReplayReport()
    await consumer.start()
    await deliverer.start()
    try:
        consumer.assign(parts)
        for tp in parts:
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        total = sum([ends[tp.partition] - await consumer.position(tp) for tp in parts])
        bar = tqdm(total=total, unit="record", desc=f"replay {name}", disable=not progress)
        pending = {tp for tp in parts if await consumer.position(tp) < ends[tp.partition]}
        while pending:
            chunk: list[ConsumerRecord[bytes, bytes]] = []
            while pending and len(chunk) < CHUNK:
                for tp, records in (await consumer.getmany(*pending, timeout_ms=1000)).items():
                    chunk.extend(r for r in records if r.offset < ends[tp.partition])
                pending = {tp for tp in pending if await consumer.position(tp) < ends[tp.partition]}
            try:
                await _replay_chunk(settings, name, deliverer, chunk, report)
            except DestinationFailing as exc:
                raise Fatal(
                    f"{name} keeps failing ({exc}); replay stopped, run it again", ExitCode.FAILURE
                ) from None
            done: dict[TopicPartition, int] = {}
            for record in chunk:
                tp = TopicPartition(record.topic, record.partition)
                done[tp] = max(done.get(tp, 0), record.offset + 1)
            if done:
                await consumer.commit(done)
            bar.update(len(chunk))
        bar.close()
    finally:
        await deliverer.stop()
        await consumer.stop()
    log.info(
        "replay finished",
        extra={
            "sink": name,
            "delivered": report.delivered,
            "refused": report.refused,
            "superseded": report.superseded,
            "filtered": report.filtered,
        },
    )
    return report


async def _replay_chunk(
    settings: Settings,
    name: str,
    deliverer: Deliverer,
    chunk: list[ConsumerRecord[bytes, bytes]],
    report: ReplayReport,
) -> None:
    topics = TopicNames.from_settings(settings)
    mine: list[tuple[Entry, dict[str, object] | None]] = []
    for record in chunk:
        headers = dict(record.headers or ())
        if headers.get("stage") != b"sink" or headers.get("sink") != name.encode():
            continue
        entry = Entry.of(record, field_change=headers.get("field-change") == b"1")
        try:
            change = orjson.loads(record.value) if record.value is not None else None
        except orjson.JSONDecodeError:
            change = None
        mine.append((entry, change if isinstance(change, dict) else None))
    wanted = {
        membership_key(str(c["identifier"]), str(c["audience_id"]))
        for e, c in mine
        if c is not None and not e.field_change and "identifier" in c and "audience_id" in c
    }
    states = await read_states(settings, topics.membership, wanted)
    groups: dict[bytes | None, list[Entry]] = {}
    for entry, change in mine:
        if change is not None and not entry.field_change and "audience_id" in change:
            state = states.get(membership_key(str(change.get("identifier")), str(change["audience_id"])))
            if superseded(change, state):
                report.superseded += 1
                await deliverer.log_superseded(entry, change, "a newer change of this audience superseded it")
                continue
        # One identifier's changes travel in one batch, in dead-letter order.
        groups.setdefault(entry.key, []).append(entry)
    # Batches of different identifiers go at once (the deliverer bounds the requests in flight); an
    # identifier with more changes than a batch holds sends them batch after batch, in order.
    size = deliverer.spec.batch_size
    sequences: list[list[list[Entry]]] = []
    current: list[Entry] = []
    for group in groups.values():
        if len(group) > size:
            sequences.append([group[i : i + size] for i in range(0, len(group), size)])
            continue
        if current and len(current) + len(group) > size:
            sequences.append([current])
            current = []
        current.extend(group)
    if current:
        sequences.append([current])

    async def run(sequence: list[list[Entry]]) -> None:
        for batch in sequence:
            tally = await deliverer.process(batch)
            report.delivered += tally.delivered
            report.refused += tally.dead_lettered + tally.unknown_identifier
            report.filtered += tally.filtered

    await asyncio.gather(*(run(sequence) for sequence in sequences))
