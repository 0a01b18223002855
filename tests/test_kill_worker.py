"""kill -9 of the worker in the middle of a 50,000-event stream loses no change."""

from __future__ import annotations

from pathlib import Path

import pytest

from audience_relay.kafkautil import topic_size
from audience_relay.topics import TopicNames, create_topics
from devtools.processes import changelog_table, start_worker, wait_for_outputs, wait_group
from devtools.wait import until_async
from tests.conftest import make_settings
from tests.test_processors_e2e import bodies_for, oracle, preload


@pytest.mark.timeout(900)
async def test_kill_9_mid_stream_loses_no_change(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap, partitions=4)
    await create_topics(settings)
    names = TopicNames.from_settings(settings)
    bodies = bodies_for(range(9_400), per_body=300)
    expected_table, expected_changes = oracle(settings, bodies)
    worker = start_worker(settings, tmp_path, "w1")
    try:
        await wait_group(settings, 1)
        await preload(settings, bodies)
        seen = 0

        async def partly_done() -> bool:
            nonlocal seen
            assert worker.alive(), worker.log.read_text()[-3000:]
            seen = await topic_size(kafka_bootstrap, names.membership_changes)
            return seen >= len(expected_changes) // 5

        await until_async(partly_done, timeout=300, what="a fifth of the changes", interval=0.1)
        worker.kill()
        assert seen < len(expected_changes), "the worker finished before the kill: the test proves nothing"
    finally:
        if worker.alive():
            worker.kill()
    # The dead member leaves the group when its session times out; restarting only then keeps a
    # rebalance out of the middle of the replay (see devtools.processes.wait_group).
    await wait_group(settings, 0, timeout=180)
    restarted = start_worker(settings, tmp_path, "w1")  # same data dir, like a restarted pod
    try:
        changes = await wait_for_outputs(settings, [restarted], expected_changes, expected_table, timeout=600)
    finally:
        restarted.stop()
    # The local table copy only ever holds acknowledged changelog records, so it is kept after a
    # crash (recovery continues it from its persisted offset) instead of being rebuilt.
    assert "rebuilding" not in restarted.log.read_text()
    # Nothing unexpected; a change may repeat after the crash, but only with the same id and content.
    by_id: dict[str, dict[str, object]] = {}
    for change in changes:
        assert change["change_id"] in expected_changes
        first = by_id.setdefault(change["change_id"], change)
        assert {k: v for k, v in first.items() if k != "request_id"} == {
            k: v for k, v in change.items() if k != "request_id"
        }
    segment_events = await topic_size(kafka_bootstrap, names.segment_events)
    print(
        f"kill test: {segment_events} segment-events records, {len(expected_changes)} expected changes, "
        f"{seen} emitted before the kill, {len(changes) - len(expected_changes)} repeated after it"
    )
    # The state topic (the table's changelog) ends with every key's expected state (checked by
    # wait_for_outputs), and holds no key the oracle does not know.
    assert set(await changelog_table(settings)) == set(expected_table)
