"""Components run as real processes for end-to-end tests (so they can be killed like in production)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka.errors import KafkaError

from audience_relay import kafka
from audience_relay.kafkautil import group_lag, read_topic
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from devtools.localkafka import free_port
from devtools.wait import until_async


class Component:
    """``audience-relay <args>`` in its own process, logging to a file."""

    def __init__(self, settings: Settings, args: list[str], log: Path, **overrides: str) -> None:
        env = {**os.environ, **settings.to_env(), **overrides}
        #: The environment it runs with (e.g. the web port ``start_worker`` chose).
        self.env = env
        self.log = log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "audience_relay.cli", *args],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crashed host."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._fh.close()

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_worker(settings: Settings, tmp: Path, name: str = "w1", **env: str) -> Component:
    """A processors worker with its own data dir and web port."""
    return Component(
        settings,
        ["worker"],
        tmp / f"{name}.log",
        RELAY_WORKER_DATA_DIR=str(tmp / f"{name}-data"),
        RELAY_WORKER_WEB_PORT=str(free_port()),
        RELAY_WORKER_WEB_HOST="127.0.0.1",
        **env,
    )


async def wait_caught_up(settings: Settings, workers: list[Component], timeout: float = 180) -> None:
    """Until the split has committed all of the raw topic and the membership stage all segment events."""
    names, groups = TopicNames.from_settings(settings), GroupNames.from_settings(settings)
    lag = -1

    async def done() -> bool:
        nonlocal lag
        for w in workers:
            assert w.alive(), f"worker died; see {w.log}:\n{w.log.read_text()[-3000:]}"
        try:
            lag = await group_lag(settings, groups.split, [names.raw])
            lag += await group_lag(settings, groups.membership, [names.segment_events])
        except KafkaError:  # e.g. the group coordinator is still being elected
            return False
        return lag == 0

    try:
        await until_async(done, timeout, what="the processors to catch up")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; {lag} records behind; worker logs: {[str(w.log) for w in workers]}"
        ) from None


async def wait_for_outputs(
    settings: Settings,
    workers: list[Component],
    expected_changes: set[str],
    expected_table: dict[bytes, Any],
    timeout: float = 240,
) -> list[dict[str, Any]]:
    """Until every expected change id is in membership-changes and the changelog holds the expected table.

    Waits on the outputs rather than on committed offsets, which may trail them.
    """
    names = TopicNames.from_settings(settings)
    changes: list[dict[str, Any]] = []
    table: dict[bytes, Any] = {}

    async def done() -> bool:
        nonlocal changes, table
        for w in workers:
            assert w.alive(), f"worker died; see {w.log}:\n{w.log.read_text()[-3000:]}"
        changes = await read_json(settings, names.membership_changes)
        if not expected_changes <= {c["change_id"] for c in changes}:
            return False
        table = await changelog_table(settings)
        return table == expected_table

    try:
        await until_async(done, timeout, what="the expected changes and table", interval=2.0)
    except AssertionError as exc:
        missing = len(expected_changes - {c["change_id"] for c in changes})
        wrong = sum(1 for k, v in expected_table.items() if table.get(k) != v)
        raise AssertionError(
            f"{exc}: {missing} changes missing, {wrong} table keys differ; logs "
            f"{[str(w.log) for w in workers]}"
        ) from None
    return changes


async def changelog_table(settings: Settings) -> dict[bytes, Any]:
    """The membership table as its changelog, ``<prefix>.membership``, holds it (last value per key).

    Tombstones (a key moved away by a partition change) are dropped.
    """
    topic = TopicNames.from_settings(settings).membership
    out: dict[bytes, Any] = {}
    for r in await read_topic(settings, topic):
        if r.value is None:
            out.pop(r.key, None)
        else:
            out[r.key] = orjson.loads(r.value)
    return out


async def group_state(settings: Settings, group: str | None = None) -> tuple[str, int]:
    """(state, member count) of a consumer group, by default the workers' table group."""
    admin = kafka.admin(settings)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups(
            [group or GroupNames.from_settings(settings).tables]
        )
    finally:
        await admin.close()
    _, _, state, _, _, members, *_ = response.groups[0]
    return str(state), len(members)


async def wait_group(settings: Settings, members: int, timeout: float = 120) -> None:
    """Until both worker groups (table assignment and split) are settled with ``members`` members.

    Tests that are not about rebalancing start their data once the groups have settled, so that what
    they check does not depend on when a rebalance happens (the rebalance tests do the opposite).
    """
    groups = GroupNames.from_settings(settings)

    async def settled() -> bool:
        for group in (groups.tables, groups.split):
            try:
                state, count = await group_state(settings, group)
            except KafkaError:
                return False
            ok = state == "Stable" or (members == 0 and state in ("Empty", "Dead"))
            if count != members or not ok:
                return False
        return True

    await until_async(settled, timeout, what=f"the group to settle with {members} member(s)")


async def read_json(settings: Settings, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in await read_topic(settings, topic)]


async def read_segment_events(settings: Settings) -> list[dict[str, Any]]:
    """Every segment event on ``<prefix>.segment-events`` (records hold groups of them), in order."""
    topic = TopicNames.from_settings(settings).segment_events
    return [event for group in await read_json(settings, topic) for event in group["events"]]


def raw_headers(request_id: str) -> list[tuple[str, bytes]]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return [
        ("received-at", now.encode()),
        ("source", b"default"),
        ("request-id", request_id.encode()),
        ("content-type", b"application/json"),
    ]
