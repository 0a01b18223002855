"""Membership-query benchmark: member lookups against two workers, via the owner and via the other one.

Preloads ``--users`` users in ``--audiences`` audiences, starts two workers, then for ``--seconds``
each keeps ``--clients`` concurrent lookups going against worker 1: first for identifiers worker 1
owns (answered from its table), then for identifiers worker 2 owns (forwarded once). Prints
lookups/s and p50/p99 latency for both, the same for audience counts (a fan-out to both workers),
and how long worker 1 takes to rebuild the audience counters of the partitions it takes over when
worker 2 stops.

    python -m bench.queries [--users 50000] [--audiences 2] [--clients 16] [--seconds 10]
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from audience_relay.kafkautil import produce_all
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from bench.common import arguments, bench_settings, broker, percentile
from bench.processors import raw_records
from devtools.localkafka import free_port

KEY = "bench-query-key"
HEADERS = {"X-API-KEY": KEY}
REBUILT = re.compile(r"audience counters ready: (\d+) partition\(s\) rebuilt in ([0-9.]+) s")


def start_worker(settings: Settings, data_dir: Path, name: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = data_dir / f"{name}.log"
    env = {
        **os.environ,
        **settings.to_env(),
        "RELAY_WORKER_DATA_DIR": str(data_dir / name),
        "RELAY_WORKER_WEB_PORT": str(port),
        "RELAY_WORKER_WEB_HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "audience_relay.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    return proc, f"http://127.0.0.1:{port}", log


async def count(http: aiohttp.ClientSession, url: str, audience: str) -> int | None:
    try:
        async with http.get(f"{url}/v1/audiences/{audience}/count", headers=HEADERS) as resp:
            return int((await resp.json())["members"]) if resp.status == 200 else None
    except aiohttp.ClientError:
        return None


async def load(
    http: aiohttp.ClientSession, urls: list[str], clients: int, seconds: float
) -> tuple[int, list[float], dict[int, int]]:
    """``clients`` loops GETting ``urls`` round-robin for ``seconds``: (answers, latencies, statuses)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            started = time.perf_counter()
            async with http.get(urls[i % len(urls)], headers=HEADERS) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            latencies.append(time.perf_counter() - started)
            i += clients

    await asyncio.gather(*(client(c) for c in range(clients)))
    return len(latencies), latencies, statuses


def report(
    title: str, answers: int, latencies: list[float], statuses: dict[int, int], seconds: float
) -> None:
    print(
        f"{title}: {answers / seconds:,.0f} lookups/s, p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms (statuses {statuses})",
        flush=True,
    )


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--audiences", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--store", choices=["rocksdb", "memory"], default="rocksdb")
    args = parser.parse_args()

    with broker() as (bootstrap, _):
        settings = bench_settings(
            bootstrap,
            partitions=args.partitions,
            table_store=args.store,
            ingress_api_keys=[KEY],
            log_level="INFO",
        )
        await create_topics(settings)
        names = TopicNames.from_settings(settings)
        events = args.users * args.audiences
        for start in range(0, events, 100_000):
            await produce_all(
                bootstrap, names.raw, raw_records(start, min(100_000, events - start), 300, args.audiences)
            )
        print(f"preloaded {args.users:,} users x {args.audiences} audiences", flush=True)

        data_dir = Path(tempfile.mkdtemp(prefix="bench-queries-"))
        w1, url1, log1 = start_worker(settings, data_dir, "w1")
        w2, url2, _ = start_worker(settings, data_dir, "w2")
        connector = aiohttp.TCPConnector(limit=args.clients * 2)
        try:
            async with aiohttp.ClientSession(connector=connector) as http:
                t0 = time.monotonic()
                audience = "aud0000"
                while await count(http, url1, audience) != args.users:
                    assert w1.poll() is None and w2.poll() is None, f"a worker died; logs in {data_dir}"
                    await asyncio.sleep(1)
                print(f"both workers loaded and answering after {time.monotonic() - t0:.1f} s", flush=True)

                # Who owns what, from the answers themselves.
                own: list[str] = []
                other: list[str] = []
                for n in range(min(args.users, 4000)):
                    url = f"{url1}/v1/members/user{n}@example.com"
                    async with http.get(url, headers=HEADERS) as resp:
                        assert resp.status == 200, await resp.text()
                        served_by = resp.headers["X-Relay-Served-By"]
                        assert served_by in (url1, url2), served_by
                        (own if served_by == url1 else other).append(url)
                report(
                    "member lookup via the owner    ",
                    *await load(http, own, args.clients, args.seconds),
                    args.seconds,
                )
                report(
                    "member lookup via a non-owner  ",
                    *await load(http, other, args.clients, args.seconds),
                    args.seconds,
                )
                count_urls = [f"{url1}/v1/audiences/aud{a:04d}/count" for a in range(args.audiences)]
                report(
                    "audience count (fan-out to 2)  ",
                    *await load(http, count_urls, args.clients, args.seconds),
                    args.seconds,
                )

                # Worker 2 leaves: worker 1 takes its partitions over and rebuilds their counters.
                before = len(REBUILT.findall(log1.read_text(errors="replace")))
                w2.terminate()
                await asyncio.to_thread(w2.wait, 120)
                t0 = time.monotonic()
                while True:
                    found = REBUILT.findall(log1.read_text(errors="replace"))
                    if len(found) > before and await count(http, url1, audience) == args.users:
                        break
                    assert w1.poll() is None, f"worker 1 died; see {log1}"
                    await asyncio.sleep(0.5)
                partitions, seconds = int(found[-1][0]), float(found[-1][1])
                keys = args.users * partitions // args.partitions
                print(
                    f"take-over: worker 1 answered counts again {time.monotonic() - t0:.1f} s after worker 2 "
                    f"stopped; counter rebuild {partitions} partition(s), ~{keys:,} users in {seconds:.3f} s "
                    f"({keys / max(seconds, 1e-9):,.0f} users/s)",
                    flush=True,
                )
        finally:
            for proc in (w1, w2):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(60)


if __name__ == "__main__":
    asyncio.run(main())
