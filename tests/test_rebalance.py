"""Scaling by partitions: workers join and leave while data flows; every change comes out exactly once.

The group goes 1 → 3 → 2 workers (two start mid-stream, then one stops gracefully mid-stream) while
raw bodies keep arriving, so partitions move while stream buffers are full. The outputs must equal the
pure oracle (processors.membership.fold over the split events): the same change ids with the same
content, none missing, none doubled, and the changelog table equal to the oracle's table.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from audience_relay.kafkautil import produce_all, topic_size
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.processes import (
    Component,
    changelog_table,
    group_state,
    raw_headers,
    read_json,
    start_worker,
    wait_for_outputs,
    wait_group,
)
from devtools.wait import until_async
from processors.membership import fold
from tests.conftest import make_settings
from tests.test_processors_e2e import bodies_for, split_all


def oracle_changes(
    settings: Settings, bodies: list[bytes]
) -> tuple[dict[bytes, Any], dict[str, dict[str, Any]]]:
    """The final table and every change a correct run emits, by change id (request ids aside)."""
    table, emitted = fold(split_all(settings, bodies))
    return table, {c["change_id"]: _content(c) for c in emitted}


def _content(change: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in change.items() if k != "request_id"}


class Stream:
    """Sends raw bodies at a steady pace from a background task until told to finish."""

    def __init__(self, settings: Settings, pool: list[bytes], per_tick: int, tick: float) -> None:
        self.settings, self.pool, self.per_tick, self.tick = settings, pool, per_tick, tick
        self.sent = 0
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        raw = TopicNames.from_settings(self.settings).raw
        while not self._stop.is_set() and self.sent < len(self.pool):
            chunk = self.pool[self.sent : self.sent + self.per_tick]
            await produce_all(
                self.settings.kafka_bootstrap_servers,
                raw,
                [(None, b, raw_headers(f"req-{self.sent + i}")) for i, b in enumerate(chunk)],
            )
            self.sent += len(chunk)
            try:
                await asyncio.wait_for(self._stop.wait(), self.tick)
            except TimeoutError:
                pass

    async def finish(self) -> list[bytes]:
        """Stop sending; the bodies sent."""
        self._stop.set()
        await self.task
        return self.pool[: self.sent]

    def check_running(self) -> None:
        assert not self.task.done() or self.task.exception() is None, self.task.exception()
        assert self.sent < len(self.pool), "the pool ran out: the stream stopped before the rebalances ended"


async def _group_has(settings: Settings, members: int) -> bool:
    try:
        state, count = await group_state(settings)
    except Exception:
        return False
    return count == members and state == "Stable"


@dataclass
class Outcome:
    """What a join/leave run produced, against the oracle."""

    bodies: int
    segment_events: int
    expected: int
    missing: list[str]
    doubled: list[str]
    wrong: list[str]
    unexpected: list[str]
    table_equal: bool
    logs: Path


async def join_and_leave_mid_stream(kafka_bootstrap: str, tmp_path: Path, *, timeout: float = 240) -> Outcome:
    """Run the 1 → 3 → 2 scenario; compare what came out with the oracle (does not assert)."""
    settings = make_settings(kafka_bootstrap, partitions=6)
    await create_topics(settings)
    names = TopicNames.from_settings(settings)
    pool = bodies_for(range(40_000))
    workers: dict[str, Component] = {"w1": start_worker(settings, tmp_path, "w1")}
    stream: Stream | None = None
    try:
        await wait_group(settings, 1)
        stream = Stream(settings, pool, per_tick=4, tick=0.1)

        async def flowing() -> bool:
            assert stream is not None
            stream.check_running()
            return await topic_size(kafka_bootstrap, names.membership_changes) > 0

        await until_async(flowing, 120, what="changes from the first worker", interval=0.2)
        # 1 → 3: two workers join while records keep arriving.
        workers["w2"] = start_worker(settings, tmp_path, "w2")
        workers["w3"] = start_worker(settings, tmp_path, "w3")

        async def three() -> bool:
            assert stream is not None
            stream.check_running()
            for w in workers.values():
                assert w.alive(), w.log.read_text()[-3000:]
            return await _group_has(settings, 3)

        await until_async(three, 180, what="three workers sharing the partitions")
        sent_at_three = stream.sent
        # 3 → 2: one leaves gracefully while records keep arriving (stopping waits for the process to
        # exit: in a thread, so the stream keeps sending meanwhile).
        await asyncio.to_thread(workers.pop("w2").stop)

        async def two() -> bool:
            assert stream is not None
            stream.check_running()
            return await _group_has(settings, 2)

        await until_async(two, 180, what="two workers after one left")
        assert stream.sent > sent_at_three, "no data was sent during the rebalances"
        # A little more data after the group settled, then the stream ends.
        target = stream.sent + 20
        await until_async(lambda: _sent_at_least(stream, target), 60, what="the tail of the stream")
        bodies = await stream.finish()
        expected_table, expected = oracle_changes(settings, bodies)
        try:
            changes = await wait_for_outputs(
                settings, list(workers.values()), set(expected), expected_table, timeout=timeout
            )
        except AssertionError:  # compared below, with what did come out
            changes = await read_json(settings, names.membership_changes)
        table = await changelog_table(settings)
    finally:
        if stream is not None and not stream.task.done():
            await stream.finish()
        for w in workers.values():
            w.stop()
    seen: dict[str, dict[str, Any]] = {}
    doubled = []
    for change in changes:
        if change["change_id"] in seen:
            doubled.append(change["change_id"])
        seen[change["change_id"]] = _content(change)
    return Outcome(
        bodies=len(bodies),
        segment_events=await topic_size(kafka_bootstrap, names.segment_events),
        expected=len(expected),
        missing=sorted(set(expected) - set(seen)),
        doubled=doubled,
        wrong=sorted(k for k in set(expected) & set(seen) if expected[k] != seen[k]),
        unexpected=sorted(set(seen) - set(expected)),
        table_equal=table == expected_table,
        logs=tmp_path,
    )


@pytest.mark.timeout(600)
async def test_workers_join_and_leave_mid_stream(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = await join_and_leave_mid_stream(kafka_bootstrap, tmp_path)
    print(
        f"rebalance test: {out.bodies} raw bodies, {out.segment_events} segment events, "
        f"{out.expected} changes; logs {out.logs}"
    )
    assert out.missing == [], f"{len(out.missing)} changes missing"
    assert out.doubled == [], f"{len(out.doubled)} changes doubled"
    assert out.wrong == [] and out.unexpected == []
    assert out.table_equal
    # Standby replicas (RELAY_STANDBY_REPLICAS=1, the default) with RocksDB in separate data dirs:
    # each of the two remaining workers keeps every partition, its own as active, the other's as standby.
    for name in ("w1", "w3"):
        tables = out.logs / f"{name}-data"
        assert {p.name for p in tables.rglob("membership-*.db")} == {f"membership-{i}.db" for i in range(6)}


def test_standby_replicas_reach_faust() -> None:
    from processors.app import create_app

    settings = make_settings("127.0.0.1:1", standby_replicas=2, worker_session_timeout_seconds=12)
    app = create_app(settings)
    assert app.conf.table_standby_replicas == 2
    assert app.conf.broker_session_timeout == 12


async def _sent_at_least(stream: Stream, target: int) -> bool:
    stream.check_running()
    return stream.sent >= target
