"""faust 0.15 drops records a rebalance caught in its fetch loop; processors/offsets.py closes the hole.

Reproduction (tests/offset_window_app.py): a worker with a slow agent and a full stream buffer holds a
fetched record in its fetch loop (parked at the loop's periodic commit) while a second worker joins
and leaves the group. The rebalances clear the buffer and seek back to the committed offset; then the
held record is handed off and its offset marked read, so faust drops every refetched record below it
as "already read". With faust's own consumer those records are never processed (and the partition's
commit stalls); with the guarded consumer every record is processed and everything is committed (by
its rewind check, which keeps the held record's read mark from moving past the seek;
bench/offset_guard.py also runs it with only the commit check, which finds the hole the dropped
records leave and seeks back to them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import NewTopic
from aiokafka.structs import TopicPartition
from faust.types import TP

from audience_relay import kafka
from audience_relay.kafkautil import committed_offsets, produce_all, read_topic
from devtools.wait import until_async

RECORDS = 3000


class Worker:
    def __init__(
        self, bootstrap: str, app_id: str, names: tuple[str, str], tmp: Path, guard: str, park: bool
    ):
        self.log = tmp / f"{'parker' if park else 'joiner'}.log"
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.offset_window_app",
                bootstrap,
                app_id,
                *names,
                str(tmp),
                guard,
                "1" if park else "0",
            ],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=os.environ.copy(),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()

    def says(self, text: str) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return text in self.log.read_text(errors="replace")


async def _members(bootstrap: str, group: str) -> tuple[str, int]:
    admin = kafka.admin(bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    _, _, state, _, _, members, *_ = response.groups[0]
    return str(state), len(members)


async def _committed(bootstrap: str, group: str, topic: str) -> int:
    return (await committed_offsets(bootstrap, group)).get(TopicPartition(topic, 0), -1)


async def _processed(bootstrap: str, topic: str) -> set[int]:
    return {int(orjson.loads(r.value)) for r in await read_topic(bootstrap, topic)}


async def run_window(bootstrap: str, tmp: Path, guard: str) -> tuple[set[int], int, Path]:
    """The reproduction; (offsets processed, offset committed, logs)."""
    app_id = f"t{uuid.uuid4().hex[:10]}-window"
    names = (f"{app_id}.in", f"{app_id}.out")
    admin = kafka.admin(bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, 1, 1) for n in names])
    finally:
        await admin.close()
    await produce_all(bootstrap, names[0], [(None, b"x" * 100, []) for _ in range(RECORDS)])
    parker = Worker(bootstrap, app_id, names, tmp, guard, park=True)
    joiner: Worker | None = None
    try:

        async def started() -> bool:
            return len(await _processed(bootstrap, names[1])) >= 20

        await until_async(started, 120, what="the first records processed")
        (tmp / "arm").touch()

        async def parked() -> bool:
            return parker.says("PARKED")

        await until_async(parked, 60, what="the fetch loop to hold a record")
        joiner = Worker(bootstrap, app_id, names, tmp, guard, park=False)

        async def members(n: int) -> bool:
            try:
                state, count = await _members(bootstrap, app_id)
            except Exception:
                return False
            return state == "Stable" and count == n

        await until_async(lambda: members(2), 120, what="the second worker to join")
        joiner.stop()
        await until_async(lambda: members(1), 120, what="the second worker to leave")
        (tmp / "release").touch()
        await until_async(lambda: _released(parker), 60, what="the held record to be handed off")

        async def reached_end() -> bool:
            return RECORDS - 1 in await _processed(bootstrap, names[1])

        await until_async(reached_end, 120, what="the last record processed")
        if guard != "off":

            async def all_committed() -> bool:
                return await _committed(bootstrap, app_id, names[0]) == RECORDS

            await until_async(all_committed, 60, what="every offset committed")
        processed = await _processed(bootstrap, names[1])
        committed = await _committed(bootstrap, app_id, names[0])
    finally:
        parker.stop()
        if joiner is not None:
            joiner.stop()
    return processed, committed, tmp


async def _released(worker: Worker) -> bool:
    return worker.says("RELEASED")


@pytest.mark.timeout(400)
# "commit" (the guard's commit check alone) runs in bench/offset_guard.py, outside the CI budget.
@pytest.mark.parametrize("guard", ["off", "on"], ids=["faust", "guarded"])
async def test_record_held_across_a_rebalance(kafka_bootstrap: str, tmp_path: Path, guard: str) -> None:
    processed, committed, logs = await run_window(kafka_bootstrap, tmp_path, guard)
    missing = sorted(set(range(RECORDS)) - processed)
    print(
        f"guard {guard}: {len(missing)} of {RECORDS} records never processed "
        f"({missing[:1]}..{missing[-1:]}), committed offset {committed}; logs {logs}"
    )
    if guard != "off":
        assert missing == []
        assert committed == RECORDS
    else:
        # faust dropped the refetched records below the held one as "already read" ...
        assert missing, "the window did not reproduce faust's drop; the test proves nothing"
        # ... and its commit stops short of them (faust's own check; they come back after a restart)
        assert committed <= missing[0]


def test_a_hole_is_an_unprocessed_offset_below_a_processed_one() -> None:
    from processors.offsets import find_hole, first_unprocessed

    assert first_unprocessed({5, 6, 8}, 5) == 7
    assert find_hole({5, 6, 8}, 5) == 7  # 8 was processed, 7 never: seek back to 7
    assert find_hole({5, 6, 7}, 5) is None  # a run from the start: commit up to 8
    assert find_hole(set(), 5) is None
    assert find_hole({7}, 5) == 5  # the committed offset itself was skipped (faust commits over it)


def test_records_fetched_but_not_handed_on_are_given_back_from_the_first_one() -> None:
    from processors.offsets import not_handed_on

    a, b, c = TP("s", 0), TP("s", 1), TP("s", 2)
    fetched = {a: [10, 11, 12, 13], b: [0, 1, 2], c: [5, 6]}
    # a: the flow stopped after 11; b: its partition left the active set (nothing handed); c: all handed
    assert not_handed_on(fetched, {a: 11, c: 6}) == {a: 12, b: 0}
    assert not_handed_on({a: []}, {}) == {}
