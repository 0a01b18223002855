"""No silent state loss: state fits any topic's record limit, and a refused write stops progress.

Against topics with Kafka's default ``max.message.bytes`` (1,048,588), as a managed cluster or a
topic made by someone else has them: one user in 10,000 audiences (one webhook) must come through a
kill -9 with all 10,000 memberships, and a write the broker refuses must stop the worker before it
commits past the input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from audience_relay import kafka
from audience_relay.kafkautil import produce_all, topic_size
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.processes import changelog_table, raw_headers, read_json, start_worker, wait_group
from devtools.wait import until_async
from tests.conftest import make_settings

DEFAULT_LIMIT = "1048588"  # Kafka's default max.message.bytes
USER = "many@example.com"
AUDIENCES = 10_000


async def _set_topic_config(settings: Settings, topic: str, name: str, value: str) -> None:
    admin = kafka.admin(settings)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs={name: value})])
    finally:
        await admin.close()


def _body(kind: str, second: int) -> bytes:
    """One webhook: one user, every audience, in records of 100 segment events (Lytics-sized)."""
    stamp = f"2026-01-01T00:00:{second:02d}Z"
    records = [
        {
            "data": {
                "email": USER,
                "segment_events": [
                    {"id": f"aud-{a:05d}", "event": kind, "slug": f"audience-{a}", kind: stamp}
                    for a in range(first, first + 100)
                ],
            }
        }
        for first in range(0, AUDIENCES, 100)
    ]
    return orjson.dumps(records)


async def _changes(settings: Settings, kind: str) -> list[dict[str, Any]]:
    names = TopicNames.from_settings(settings)
    return [c for c in await read_json(settings, names.membership_changes) if c["change"] == kind]


@pytest.mark.timeout(600)
async def test_one_user_in_10000_audiences_survives_a_kill_with_default_record_limits(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = make_settings(kafka_bootstrap, partitions=2, standby_replicas=0)
    await create_topics(settings)
    names = TopicNames.from_settings(settings)
    for topic in (names.segment_events, names.membership, names.membership_changes):
        await _set_topic_config(settings, topic, "max.message.bytes", DEFAULT_LIMIT)
    worker = start_worker(settings, tmp_path)
    try:
        await wait_group(settings, 1)
        await produce_all(settings, names.raw, [(None, _body("enter", 1), raw_headers("enter-all"))])

        async def entered() -> bool:
            assert worker.alive(), worker.log.read_text()[-3000:]
            return len(await _changes(settings, "entered")) >= AUDIENCES

        await until_async(entered, 240, what="10,000 entered changes", interval=1.0)
        worker.kill()  # the state must be in the changelog already: nothing to flush
    finally:
        if worker.alive():
            worker.kill()
    await wait_group(settings, 0, timeout=180)
    restarted = start_worker(settings, tmp_path)  # same data dir
    try:
        await wait_group(settings, 1)
        await produce_all(settings, names.raw, [(None, _body("exit", 2), raw_headers("exit-all"))])

        async def exited() -> bool:
            assert restarted.alive(), restarted.log.read_text()[-3000:]
            return len(await _changes(settings, "exited")) >= AUDIENCES

        await until_async(exited, 240, what="10,000 exited changes", interval=1.0)
    finally:
        restarted.stop()
    exits = await _changes(settings, "exited")
    assert len({c["audience_id"] for c in exits}) == len(exits) == AUDIENCES  # every one, once
    table = await changelog_table(settings)
    assert len(table) == AUDIENCES and not any(state["member"] for state in table.values())
    # No record was ever refused for its size.
    for name in ("w1.log",):
        assert "MessageSizeTooLarge" not in (tmp_path / name).read_text()


@pytest.mark.timeout(300)
async def test_a_refused_output_stops_the_worker_before_its_input_is_committed(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = make_settings(kafka_bootstrap, partitions=1, standby_replicas=0)
    await create_topics(settings)
    names = TopicNames.from_settings(settings)
    # A topic whose limit is below one change record: every change write is refused.
    await _set_topic_config(settings, names.membership_changes, "max.message.bytes", "200")
    worker = start_worker(settings, tmp_path)
    try:
        await wait_group(settings, 1)
        await produce_all(settings, names.raw, [(None, _body("enter", 1), raw_headers("refused"))])
        assert worker.proc.wait(120) == 70, worker.log.read_text()[-3000:]
    finally:
        worker.stop()
    assert "an output write failed" in worker.log.read_text()
    # Nothing past the refused batch was committed, and no state was written for it.
    groups = GroupNames.from_settings(settings)
    from audience_relay.kafkautil import committed_offsets

    committed = await committed_offsets(settings, groups.membership)
    assert all(offset == 0 for offset in committed.values()), committed
    assert await topic_size(settings, names.membership) == 0
    # Fixed, the worker picks the same events up again: nothing was lost.
    await _set_topic_config(settings, names.membership_changes, "max.message.bytes", DEFAULT_LIMIT)
    again = start_worker(settings, tmp_path, "w2")
    try:

        async def delivered() -> bool:
            assert again.alive(), again.log.read_text()[-3000:]
            return len(await _changes(settings, "entered")) >= AUDIENCES

        await until_async(delivered, 240, what="the changes once the topic accepts them", interval=1.0)
    finally:
        again.stop()
