"""The contract with faust-streaming, mode and aiokafka beyond their public API (no broker).

The processors use faust for the membership table only (assignment, recovery, standby copies) and
move data with plain aiokafka loops. Two places go beyond the public API; each behaviour they rely
on is checked here, so that upgrading one of these packages fails fast, here, when it changes:

1. ``processors/state.py`` reads and writes a partition's RocksDB through ``Store._db_for_partition``
   (faust's public reads find the partition from the current stream event; there is no stream): a
   write is one raw-mode ``WriteBatch`` of the records and the persisted offset under faust's
   ``Store.offset_key``, which faust's recovery must read back (the in-memory store goes through the
   public ``apply_changelog_batch`` with objects shaped like faust's events).
2. ``processors/flow.py`` overrides mode's ``FlowControlEvent.resume``, which empties the changelog
   queue even while the flow runs (standby copies would get holes).

And the public behaviour the design leans on: faust awaits ``on_partitions_revoked`` receivers before
the group moves partitions, and a table's ``on_recover`` callbacks run when recovery completes.

The versions are pinned exactly in pyproject.toml; a new version must pass this file first.
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version
from pathlib import Path

import orjson
import pytest
from faust.types import TP
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from processors.app import create_app
from processors.flow import KeepingFlowControl
from processors.membership import fold, identifier_prefix
from tests.conftest import make_settings

#: Each private name the processors touch, where, and what it is relied on to do.
PRIVATE_NAMES = {
    "faust.stores.rocksdb.Store._db_for_partition": "processors/state.py: a partition's rocksdict Rdict",
    "mode.utils.queues.FlowControlEvent.resume (overridden)": "processors/flow.py: keeps running queues",
}
PINNED = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}


def test_the_pinned_versions_are_installed() -> None:
    assert {name: version(name) for name in PINNED} == PINNED, (
        "a faust/mode/aiokafka upgrade: re-check every behaviour in this file and the names "
        f"{sorted(PRIVATE_NAMES)} before changing the pins"
    )


# --- 1. the table's store, per partition ------------------------------------------------------------


def _processors(tmp_path: Path, store: str = "rocksdb") -> object:
    app = create_app(make_settings("127.0.0.1:1", table_store=store, partitions=4, worker_data_dir=tmp_path))
    return app.processors


def _event(user: int, audience: int) -> dict[str, object]:
    return {
        "identifier": f"u{user}",
        "audience_id": f"a{audience}",
        "audience_slug": None,
        "event": "enter",
        "event_time": "2026-01-01T00:00:01+00:00",
        "event_id": f"e{user}-{audience}",
        "match_field": "email",
        "source": "default",
        "request_id": "r",
    }


def test_the_rocksdb_store_of_a_partition_is_an_rdict(tmp_path: Path) -> None:
    processors = _processors(tmp_path)
    store = processors.store.table.data  # type: ignore[attr-defined]
    db = store._db_for_partition(2)
    # What StateStore uses of it: multi-get by a list, ordered iteration from a key, an estimate.
    db.put(b"b\x1f1", b"x")
    db.put(b"a\x1f1", b"y")
    assert db.get([b"a\x1f1", b"missing", b"b\x1f1"]) == [b"y", None, b"x"]
    assert [k for k, _ in db.items(from_key=b"b")] == [b"b\x1f1"]
    assert int(db.property_int_value("rocksdb.estimate-num-keys") or 0) >= 0
    assert store.offset_key.startswith(b"__faust")


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_applied_writes_read_back_with_their_changelog_offset(store: str, tmp_path: Path) -> None:
    processors = _processors(tmp_path, store)
    state = processors.store  # type: ignore[attr-defined]
    table, _ = fold([_event(1, 0), _event(1, 1), _event(2, 0)])
    partition = state.partition_of(next(iter(table)))
    writes = [(k, orjson.dumps(v)) for k, v in table.items() if state.partition_of(k) == partition]
    state.apply(partition, writes, last_offset=41)
    assert state.get_many(partition, [k for k, _ in writes]) == [v for _, v in writes]
    if store == "rocksdb":
        # faust's recovery continues from here after a restart: its own reading of the offset.
        faust_store = state.table.data
        assert faust_store.persisted_offset(TP(state.topic, partition)) == 41
        assert state.persisted_offset(partition) == 41
    ident = writes[0][0].split(b"\x1f")[0].decode()
    assert all(
        k.startswith(identifier_prefix(ident)) for k, _ in state.items(partition, identifier_prefix(ident))
    )
    state.apply(partition, [(writes[0][0], None)], last_offset=42)  # a tombstone deletes
    assert state.get_many(partition, [writes[0][0]]) == [None]


# --- 2. mode's flow control ----------------------------------------------------------------------------


def _queued_after(event: FlowControlEvent, *steps: str) -> int:
    queue: FlowControlQueue[int] = FlowControlQueue(flow_control=event, clear_on_resume=True)
    event.resume()  # recovery resumes the flow to read the changelogs
    for n in range(5):  # standby records the fetcher delivers while recovery goes on
        queue.put_nowait(n)
    for step in steps:
        getattr(event, step)()
    return queue.qsize()


def test_mode_clears_the_queues_on_every_resume() -> None:
    # Why processors/flow.py exists: if mode stops doing this, the override can go.
    assert _queued_after(FlowControlEvent(initially_suspended=True), "resume") == 0


def test_a_resume_of_a_running_flow_keeps_the_queued_records() -> None:
    assert _queued_after(KeepingFlowControl(initially_suspended=True), "resume") == 5


def test_a_resume_after_a_suspension_still_clears() -> None:
    # A rebalance suspends the flow: what was queued belongs to the old assignment.
    assert _queued_after(KeepingFlowControl(initially_suspended=True), "suspend", "resume") == 0


def test_the_changelog_queue_uses_the_keeping_flow_control(tmp_path: Path) -> None:
    app = create_app(make_settings("127.0.0.1:1", worker_data_dir=tmp_path))
    assert isinstance(app.flow_control, KeepingFlowControl)
    assert app.tables.changelog_queue._flow_control is app.flow_control


# --- public behaviour the design leans on -------------------------------------------------------------


async def test_recover_callbacks_run_when_a_table_completes_recovery(tmp_path: Path) -> None:
    app = create_app(make_settings("127.0.0.1:1", table_store="memory", worker_data_dir=tmp_path))
    table = app.tables["membership"]
    called = asyncio.Event()

    async def recovered() -> None:
        called.set()

    table.on_recover(recovered)
    await table.on_recovery_completed(set(), set())
    assert called.is_set()


def test_revoked_receivers_are_awaited_before_the_rebalance_goes_on() -> None:
    import faust

    # faust sends the signal inside its revocation handler (awaited by aiokafka's rebalance
    # listener before the member rejoins), so a receiver that waits holds the rebalance.
    source = inspect.getsource(faust.App._on_partitions_revoked)
    assert "await T(self.on_partitions_revoked.send)(revoked)" in source


def test_the_worker_can_ask_glibc_for_separate_mappings_of_large_buffers() -> None:
    import platform

    from processors.worker import return_large_buffers_to_the_os

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert return_large_buffers_to_the_os() is True
