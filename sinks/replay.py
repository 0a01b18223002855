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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from tqdm import tqdm

from audience_relay.kafkautil import end_offsets
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from sinks.base import Delivered, GiveUp
from sinks.destinations import build
from sinks.engine import retry_delay
from sinks.scrub import excerpt, scrub, secrets_of
from sinks.state import membership_key, read_states, superseded

log = logging.getLogger("sinks.replay")

#: Dead-letter records looked at per round (their states are read from the membership topic at once).
CHUNK = 10_000
#: Failed (not refused) attempts of one change before the replay stops.
MAX_ATTEMPTS = 8


@dataclass
class ReplayReport:
    """What a replay did with the dead-letter records of one sink."""

    delivered: int = 0
    #: Still refused by the destination: appended again to the dead-letter topic (replayable).
    refused: int = 0
    #: Skipped: a newer change of the same identifier and audience superseded them.
    superseded: int = 0


def replay_group(settings: Settings, name: str) -> str:
    """The consumer group whose committed offsets say how far replays of ``name`` got."""
    return f"{settings.topic_prefix}.dead-letter-replay.{name}"


def requeued_headers(
    record: ConsumerRecord[bytes, bytes], reason: str, status: int | None, excerpt: str
) -> list[tuple[str, bytes]]:
    """The headers of a still-refused record's new dead-letter copy: the new answer, one more attempt."""
    old = list(record.headers or ())
    attempts = int(dict(old).get("replay-attempts", b"0") or 0) + 1
    replaced = {"reason", "response-status", "response-excerpt", "replay-attempts"}
    headers = [(k, v) for k, v in old if k not in replaced]
    headers += [
        ("reason", reason.encode()),
        ("response-status", str(status or "").encode()),
        ("response-excerpt", excerpt.encode()),
        ("replay-attempts", str(attempts).encode()),
    ]
    return headers


async def replay_dead_letters(settings: Settings, name: str, *, progress: bool = True) -> ReplayReport:
    """Deliver again every record the sink ``name`` gave up, from where the last replay stopped."""
    topics = TopicNames.from_settings(settings)
    destination, _, _, _ = build(name, settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=replay_group(settings, name),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=True)
    ends = await end_offsets(settings.kafka_bootstrap_servers, topics.dead_letter)
    parts = [TopicPartition(topics.dead_letter, p) for p in ends]
    report = ReplayReport()
    await consumer.start()
    await producer.start()
    await destination.start()
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
            await _replay_chunk(settings, name, destination, producer, consumer, chunk, report, bar)
        bar.close()
    finally:
        await destination.stop()
        await producer.stop()
        await consumer.stop()
    log.info(
        "replay finished",
        extra={
            "sink": name,
            "delivered": report.delivered,
            "refused": report.refused,
            "superseded": report.superseded,
        },
    )
    return report


async def _replay_chunk(
    settings: Settings,
    name: str,
    destination: object,
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer,
    chunk: list[ConsumerRecord[bytes, bytes]],
    report: ReplayReport,
    bar: tqdm,
) -> None:
    topics = TopicNames.from_settings(settings)
    mine = []
    for record in chunk:
        headers = dict(record.headers or ())
        if headers.get("stage") == b"sink" and headers.get("sink") == name.encode():
            mine.append((record, orjson.loads(record.value)))
    wanted = {membership_key(c["identifier"], c["audience_id"]) for _, c in mine}
    states = await read_states(settings.kafka_bootstrap_servers, topics.membership, wanted)
    todo = {id(r) for r, _ in mine}
    changes = {id(r): c for r, c in mine}
    for record in chunk:
        bar.update(1)
        if id(record) in todo:
            change = changes[id(record)]
            state = states.get(membership_key(change["identifier"], change["audience_id"]))
            if superseded(change, state):
                report.superseded += 1
            else:
                await _deliver_one(settings, name, destination, producer, record, change, report)
        await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})


async def _deliver_one(
    settings: Settings,
    name: str,
    destination: object,
    producer: AIOKafkaProducer,
    record: ConsumerRecord[bytes, bytes],
    change: dict[str, object],
    report: ReplayReport,
) -> None:
    write = destination.write  # type: ignore[attr-defined]
    attempt = 0
    while True:
        result = await write([change])
        if isinstance(result, Delivered):
            report.delivered += 1
            return
        if isinstance(result, GiveUp):
            report.refused += 1
            await producer.send_and_wait(
                TopicNames.from_settings(settings).dead_letter,
                value=record.value,
                key=record.key,
                headers=requeued_headers(
                    record,
                    scrub(result.reason, secrets_of(settings)),
                    result.status,
                    excerpt(result.response_text, secrets_of(settings)),
                ),
            )
            return
        attempt += 1
        if attempt > MAX_ATTEMPTS:
            raise SystemExit(f"{name} keeps failing ({result.reason}); replay stopped, run it again")
        await asyncio.sleep(
            retry_delay(
                attempt, result.seconds, settings.sink_min_retry_seconds, settings.sink_max_backoff_seconds
            )
        )
