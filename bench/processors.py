"""Processors benchmark: a backlog of raw 300-user batches through one worker, then a paced stream.

Prints user events/s from the raw topic to membership-changes, end-to-end latency p50/p99 (raw
record timestamp → change record timestamp) at a paced rate, worker peak RSS, and on-disk table
bytes per membership.

    python -m bench.processors [--memberships 1000000] [--batch 300] [--paced-rate 2000]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
from aiokafka import TopicPartition

from audience_relay import kafka
from audience_relay.kafkautil import end_offsets, produce_all, topic_size
from audience_relay.topics import TopicNames, create_topics
from bench.common import arguments, bench_settings, broker, percentile
from devtools.localkafka import free_port


def lean_user(n: int, audience: int) -> dict[str, object]:
    stamp = "2026-11-01T10:00:00.000000000Z"
    return {
        "id": str(n),
        "data": {
            "email": f"user{n}@example.com",
            "segment_events": [
                {"id": f"aud{audience:04d}", "event": "enter", "slug": f"audience_{audience}", "enter": stamp}
            ],
        },
        "meta": {"timestamp": stamp},
    }


def raw_records(
    start: int, count: int, batch: int, audiences: int
) -> list[tuple[None, bytes, list[tuple[str, bytes]]]]:
    out = []
    for b in range(start, start + count, batch):
        users = [lean_user(n // audiences, n % audiences) for n in range(b, min(b + batch, start + count))]
        received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
        out.append(
            (
                None,
                orjson.dumps(users),
                [("received-at", received), ("source", b"bench"), ("request-id", f"bench-{b}".encode())],
            )
        )
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def change_latencies(
    bootstrap: str, raw_topic: str, changes_topic: str, since: dict[int, int]
) -> list[float]:
    """For changes after ``since``: change timestamp minus its raw record's timestamp (by request id)."""
    consumer = kafka.consumer(bootstrap)
    await consumer.start()
    try:
        raw_ts: dict[str, int] = {}
        for topic in (raw_topic, changes_topic):
            parts = [TopicPartition(topic, p) for p in range(len(await end_offsets(bootstrap, topic)))]
            ends = await consumer.end_offsets(parts)
            consumer.assign(parts)
            for tp in parts:
                consumer.seek(tp, since.get(tp.partition, 0) if topic == changes_topic else 0)
            lat: list[float] = []
            remaining = {tp for tp in parts if await consumer.position(tp) < ends[tp]}
            while remaining:
                for records in (await consumer.getmany(*remaining, timeout_ms=1000)).values():
                    for r in records:
                        if topic == raw_topic:
                            headers = dict(r.headers)
                            raw_ts[headers["request-id"].decode()] = r.timestamp
                        else:
                            rid = orjson.loads(r.value)["request_id"]
                            if rid in raw_ts:
                                lat.append((r.timestamp - raw_ts[rid]) / 1000)
                remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
        return lat
    finally:
        await consumer.stop()


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--memberships", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=300)
    parser.add_argument("--audiences", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--paced-rate", type=int, default=2000, help="user events/s for the latency phase")
    parser.add_argument("--paced-seconds", type=float, default=10)
    parser.add_argument("--store", choices=["rocksdb", "memory"], default="rocksdb")
    args = parser.parse_args()

    with broker() as (bootstrap, _):
        settings = bench_settings(bootstrap, partitions=args.partitions, table_store=args.store)
        names = TopicNames.from_settings(settings)
        await create_topics(settings)
        n = args.memberships
        t0 = time.monotonic()
        for start in range(0, n, 100_000):
            await produce_all(
                bootstrap, names.raw, raw_records(start, min(100_000, n - start), args.batch, args.audiences)
            )
            print(f"  preloaded {min(start + 100_000, n):,} user events", flush=True)
        print(
            f"preloaded {n:,} user events in {await topic_size(bootstrap, names.raw):,} raw records "
            f"({time.monotonic() - t0:.1f} s)",
            flush=True,
        )

        data_dir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
        env = {
            **os.environ,
            **settings.to_env(),
            "RELAY_WORKER_DATA_DIR": str(data_dir),
            "RELAY_WORKER_WEB_PORT": str(free_port()),
            "RELAY_WORKER_WEB_HOST": "127.0.0.1",
        }
        started = time.monotonic()
        worker = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
            [sys.executable, "-m", "audience_relay.cli", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(data_dir / "worker.log").open("wb"),
        )
        proc = psutil.Process(worker.pid)
        peak_rss = 0
        first_change_at = None
        done = 0
        last_report = 0.0
        try:
            while done < n:
                assert worker.poll() is None, (data_dir / "worker.log").read_text()[-3000:]
                peak_rss = max(peak_rss, proc.memory_info().rss)
                done = await topic_size(bootstrap, names.membership_changes)
                now = time.monotonic()
                if done and first_change_at is None:
                    first_change_at = now
                if now - last_report > 5:
                    print(f"  {done:,}/{n:,} changes, RSS {peak_rss / 2**20:.0f} MiB", flush=True)
                    last_report = now
                await asyncio.sleep(0.5)
            drained = time.monotonic()
            assert first_change_at is not None
            rate = n / (drained - first_change_at)
            print(
                f"backlog: {n:,} user events → {done:,} changes in {drained - started:.1f} s from worker "
                f"start ({drained - first_change_at:.1f} s from the first change): {rate:,.0f} user events/s",
                flush=True,
            )

            # Latency at a paced rate: raw record timestamp → change record timestamp.
            since = await end_offsets(bootstrap, names.membership_changes)
            per_tick = max(1, args.paced_rate // 10)
            sent = 0
            base = n
            phase_end = time.monotonic() + args.paced_seconds
            while time.monotonic() < phase_end:
                tick = time.monotonic()
                await produce_all(
                    bootstrap,
                    names.raw,
                    raw_records(base + sent, per_tick, min(args.batch, per_tick), args.audiences),
                )
                sent += per_tick
                peak_rss = max(peak_rss, proc.memory_info().rss)
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
            while await topic_size(bootstrap, names.membership_changes) < n + sent:
                assert worker.poll() is None
                await asyncio.sleep(0.2)
            lat = await change_latencies(bootstrap, names.raw, names.membership_changes, since)
            print(
                f"paced {sent / args.paced_seconds:,.0f} user events/s: "
                f"latency p50 {percentile(lat, 0.5) * 1000:.0f} ms, "
                f"p99 {percentile(lat, 0.99) * 1000:.0f} ms over {len(lat):,} changes",
                flush=True,
            )
            table_bytes = dir_bytes(data_dir)
            print(
                f"worker peak RSS {peak_rss / 2**20:.0f} MiB for {n + sent:,} memberships; table on disk "
                f"{table_bytes / 2**20:.0f} MiB = {table_bytes / (n + sent):.0f} bytes/membership "
                f"(store {args.store})",
                flush=True,
            )
        finally:
            worker.terminate()
            worker.wait(60)


if __name__ == "__main__":
    asyncio.run(main())
