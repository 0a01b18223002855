"""Recovery after a worker dies (kill -9), with 1,000,000 memberships in the table, with and without standbys.

How the table is filled: the segment events the split agent would emit for N/4 users x 4 audiences
(built with the same ``SegmentEvent.make_id`` and serialized with orjson like the agent does) are
produced in bulk to ``<prefix>.segment-events`` as the split stage groups them; two workers'
membership stages then build the table (its changelog is the membership topic) and the changes
exactly as in production. Only the split step
is skipped (it costs ~200 µs per user here and does not touch the table).

Then, per variant:

* ``standby 1``: the two workers that built the table (RELAY_STANDBY_REPLICAS=1, each keeps a copy of
  the other's partitions). Once both are idle and their standby copies stopped growing, one is
  killed with SIGKILL;
* ``standby 0``: two fresh workers (RELAY_STANDBY_REPLICAS=0, empty data dirs) first restore their
  halves from the changelog (that time is printed as the cold start), then one is killed.

Right after the kill one probe segment event (a new identifier) is produced to every partition.
Printed: when the group noticed (the session timeout, RELAY_WORKER_SESSION_TIMEOUT_SECONDS, set by
``--session-timeout``), and until each probe's change came out on the survivor: the slowest
partition is one the dead worker owned, whose table the survivor had to restore (from its standby
copy plus the changelog tail, or from the whole changelog). Then the killed worker is restarted (it
keeps its local copy: the copy never holds more than the changelog) and the time until it serves
again (group settled and a new probe per partition answered) is printed.

    python -m bench.recovery [--memberships 1000000] [--partitions 8] [--session-timeout 10]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka.partitioner import DefaultPartitioner

from audience_relay.kafkautil import end_offsets, produce_all, read_topic, topic_size
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from bench.common import arguments, bench_settings, broker
from devtools.processes import Component, group_state, start_worker
from processors.stages import segment_records
from schemas.records import SegmentEvent

EVENT_TIME = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
STAMP = EVENT_TIME.isoformat().replace("+00:00", "Z")


def segment_event(identifier: str, audience: int, received: datetime) -> dict[str, Any]:
    """The SegmentEvent the split agent emits for one 'enter' of ``identifier`` (default format)."""
    audience_id = f"aud{audience:04d}"
    return {
        "schema_version": 2,
        "event_id": SegmentEvent.make_id(identifier, audience_id, "enter", EVENT_TIME),
        "identifier": identifier,
        "match_field": "email",
        "audience_id": audience_id,
        "audience_slug": f"audience_{audience}",
        "event": "enter",
        "event_time": EVENT_TIME,
        "event_time_source": "segment_event",
        "lytics_user_id": identifier.split("@")[0].removeprefix("user"),
        "identifiers": {},
        "source": "bench",
        "request_id": "bench-preload",
        "received_at": received,
    }


def grouped(events: list[dict[str, Any]], partitions: int) -> tuple[list[Any], list[int]]:
    """``SegmentEvents`` records (and their partitions) as the split stage makes them, 300 users a body."""
    out: list[Any] = []
    places: list[int] = []
    for body in range(0, len(events), 300):
        for partition, value in segment_records(events[body : body + 300], partitions):
            out.append((None, value, []))
            places.append(partition)
    return out, places


def records(start: int, count: int, audiences: int, partitions: int) -> tuple[list[Any], list[int]]:
    received = datetime.now(UTC)
    events = [
        segment_event(f"user{n // audiences}@example.com", n % audiences, received)
        for n in range(start, start + count)
    ]
    return grouped(orjson.loads(orjson.dumps(events)), partitions)


def probe_identifiers(tag: str, partitions: int) -> dict[int, str]:
    """One new identifier per partition (routed by the producer's default partitioner, as in production)."""
    partitioner = DefaultPartitioner()
    parts = list(range(partitions))
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        ident = f"probe-{tag}-{n}@example.com"
        found.setdefault(partitioner(ident.encode(), parts, parts), ident)
        n += 1
    return found


async def probe(settings: Settings, tag: str, started: float) -> dict[int, float]:
    """Send a probe per partition; seconds from ``started`` until each probe's change came out."""
    names = TopicNames.from_settings(settings)
    bootstrap = settings.kafka_bootstrap_servers
    idents = probe_identifiers(tag, settings.partitions)
    since = await end_offsets(bootstrap, names.membership_changes)
    received = datetime.now(UTC)
    events = orjson.loads(orjson.dumps([segment_event(i, 0, received) for i in idents.values()]))
    await produce_all(bootstrap, names.segment_events, *grouped(events, settings.partitions))
    by_ident = {i: p for p, i in idents.items()}
    answered: dict[int, float] = {}
    deadline = time.monotonic() + 900
    while len(answered) < len(idents):
        assert time.monotonic() < deadline, f"probes unanswered after 900 s: {sorted(answered)}"
        for r in await read_topic(bootstrap, names.membership_changes, since):
            since[r.partition] = max(since.get(r.partition, 0), r.offset + 1)
            ident = orjson.loads(r.value)["identifier"]
            if ident in by_ident and by_ident[ident] not in answered:
                answered[by_ident[ident]] = r.timestamp / 1000 - started
        await asyncio.sleep(0.2)
    return answered


async def wait_members(settings: Settings, members: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            state, count = await group_state(settings)
            if state == "Stable" and count == members:
                return
        except Exception:  # the coordinator may be moving; ask again
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"the group never settled with {members} members")


async def wait_idle(workers: list[Component], data_dirs: list[Path], quiet: float = 10) -> None:
    """Until the workers' local table copies (actives and standbys) stopped growing for ``quiet`` s.

    (Committed offsets cannot tell: faust leaves a partition that moved uncommitted until new records.)
    """
    sizes: list[int] = []
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < quiet:
        assert all(w.alive() for w in workers)
        now = [dir_bytes(d) for d in data_dirs]
        if now != sizes:
            sizes, stable_since = now, time.monotonic()
        await asyncio.sleep(1)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


async def group_noticed(settings: Settings, started: float) -> float:
    """Seconds from ``started`` until the group no longer counts two settled members."""
    while True:
        try:
            state, count = await group_state(settings)
            if state != "Stable" or count != 2:
                return time.time() - started
        except Exception:
            pass
        await asyncio.sleep(0.1)


async def kill_and_measure(
    settings: Settings, workers: dict[str, Component], victim: str, tmp: Path, label: str
) -> None:
    survivor = next(name for name in workers if name != victim)
    started = time.time()
    workers[victim].kill()
    noticed_task = asyncio.create_task(group_noticed(settings, started))
    answered = await probe(settings, f"{label}-kill", started)
    noticed = await noticed_task
    slowest = max(answered.values())
    print(
        f"[{label}] kill -9 of {victim}: group noticed after {noticed:.1f} s (session timeout "
        f"{settings.worker_session_timeout_seconds:.0f} s); every partition answered on {survivor} after "
        f"{slowest:.1f} s = {slowest - noticed:.1f} s after the group noticed "
        f"(fastest partition {min(answered.values()):.1f} s)",
        flush=True,
    )
    restarted_at = time.time()
    workers[victim] = start_worker(settings, tmp, victim)  # same data dir: wiped, like after any crash
    await wait_members(settings, 2)
    answered = await probe(settings, f"{label}-restart", restarted_at)
    print(
        f"[{label}] restarted {victim}: serving again (group settled, every partition answered) after "
        f"{max(answered.values()):.1f} s",
        flush=True,
    )


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--memberships", type=int, default=1_000_000)
    parser.add_argument("--audiences", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--session-timeout", type=float, default=10.0)
    args = parser.parse_args()

    with broker() as (bootstrap, _):
        with_standby = bench_settings(
            bootstrap,
            partitions=args.partitions,
            worker_session_timeout_seconds=args.session_timeout,
            log_level="INFO",
            standby_replicas=1,
        )
        names = TopicNames.from_settings(with_standby)
        await create_topics(with_standby)
        tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
        n = args.memberships
        t0 = time.monotonic()
        for start in range(0, n, 100_000):
            count = min(100_000, n - start)
            await produce_all(
                bootstrap, names.segment_events, *records(start, count, args.audiences, args.partitions)
            )
        print(
            f"preloaded {n:,} segment events ({n // args.audiences:,} identifiers x {args.audiences} "
            f"audiences) to {names.segment_events} in {time.monotonic() - t0:.1f} s; logs in {tmp}",
            flush=True,
        )

        # --- standby 1: the two workers that build the table keep each other's partitions -----------
        workers = {name: start_worker(with_standby, tmp, name) for name in ("a1", "b1")}
        try:
            t0 = time.monotonic()
            while await topic_size(bootstrap, names.membership_changes) < n:
                assert all(w.alive() for w in workers.values()), f"a worker died; logs in {tmp}"
                await asyncio.sleep(1)
            built = time.monotonic() - t0
            await wait_idle(list(workers.values()), [tmp / "a1-data", tmp / "b1-data"])
            sizes = {name: dir_bytes(tmp / f"{name}-data") / 2**20 for name in workers}
            print(
                f"table built by two workers: {n:,} memberships in {built:.1f} s ({n / built:,.0f}/s); "
                f"local RocksDB (actives + standbys): "
                + ", ".join(f"{k} {v:.0f} MiB" for k, v in sizes.items()),
                flush=True,
            )
            await kill_and_measure(with_standby, workers, "a1", tmp, "standby 1")
        finally:
            for w in workers.values():
                w.stop()

        # --- standby 0: fresh workers restore from the changelog, then one dies ----------------------
        without = with_standby.model_copy(update={"standby_replicas": 0})
        started = time.time()
        workers = {name: start_worker(without, tmp, name) for name in ("a0", "b0")}
        try:
            await wait_members(without, 2)
            answered = await probe(without, "cold", started)
            print(
                f"[standby 0] cold start of two workers with empty data dirs: serving after "
                f"{max(answered.values()):.1f} s (each restores its half of the changelog)",
                flush=True,
            )
            await wait_idle(list(workers.values()), [tmp / "a0-data", tmp / "b0-data"])
            await kill_and_measure(without, workers, "a0", tmp, "standby 0")
        finally:
            for w in workers.values():
                w.stop()


if __name__ == "__main__":
    asyncio.run(main())
