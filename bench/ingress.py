"""Ingress benchmark: N concurrent keep-alive clients on loopback against a real broker.

Prints, per scenario, requests/s, user events/s, p50/p99 latency and the ingress process's CPU
seconds. Scenarios: single-user bodies (~2 KB) and 300-user batches.

    python -m bench.ingress [--clients 20] [--seconds 10]
"""

from __future__ import annotations

import asyncio
import time

import orjson
import psutil

from audience_relay.kafkautil import topic_size
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from bench.common import (
    IngressProcess,
    arguments,
    broker,
    http_post_loop,
    lytics_user,
    new_prefix,
    percentile,
    sized_user,
)

KEY = "bench-key"


async def scenario(
    name: str,
    port: int,
    bodies: list[bytes],
    users_per_body: int,
    clients: int,
    seconds: float,
    pid: int,
    broker_pid: int | None,
    rate: float = 0.0,
) -> dict[str, float]:
    proc = psutil.Process(pid)
    broker_proc = psutil.Process(broker_pid) if broker_pid else None
    me = psutil.Process()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    # Warm up connections and the producer before measuring.
    await asyncio.gather(
        *(
            http_post_loop(port, "/v1/lytics", {"X-API-KEY": KEY}, bodies, time.monotonic() + 1.0, [], {})
            for _ in range(clients)
        )
    )
    interval = clients / rate if rate else 0.0
    cpu0 = sum(proc.cpu_times()[:2])
    broker0 = sum(broker_proc.cpu_times()[:2]) if broker_proc else 0.0
    me0 = sum(me.cpu_times()[:2])
    started = time.monotonic()
    sent = await asyncio.gather(
        *(
            http_post_loop(
                port,
                "/v1/lytics",
                {"X-API-KEY": KEY},
                bodies,
                started + seconds,
                latencies,
                statuses,
                interval,
            )
            for _ in range(clients)
        )
    )
    elapsed = time.monotonic() - started
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    broker_cpu = (sum(broker_proc.cpu_times()[:2]) - broker0) if broker_proc else float("nan")
    client_cpu = sum(me.cpu_times()[:2]) - me0
    total = sum(sent)
    ok = statuses.get(200, 0)
    result = {
        "requests_per_s": total / elapsed,
        "user_events_per_s": ok * users_per_body / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "ingress_cpu_s": cpu,
        "ingress_cpu_per_1k_requests_s": cpu / max(total, 1) * 1000,
        "seconds": elapsed,
    }
    mean_body = sum(map(len, bodies)) / len(bodies)
    if rate:
        name = f"{name} @{rate:.0f}/s"
    print(
        f"{name:22s} clients={clients:<3d} body≈{mean_body / 1024:7.1f} KiB  "
        f"{result['requests_per_s']:8.0f} req/s  {result['user_events_per_s']:9.0f} user events/s  "
        f"p50={result['p50_ms']:6.1f} ms  p99={result['p99_ms']:6.1f} ms  "
        f"CPU s: ingress {cpu:4.1f} broker {broker_cpu:4.1f} load-generator {client_cpu:4.1f} "
        f"over {elapsed:4.1f} s"
        f"  statuses={dict(sorted(statuses.items()))}",
        flush=True,
    )
    return result


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=300)
    parser.add_argument(
        "--batch-rate",
        type=float,
        default=134.0,
        help="requests/s of the paced batch run (134 x 300 users = the 40,000 user events/s target)",
    )
    args = parser.parse_args()

    with broker() as (bootstrap, broker_pid):
        prefix = new_prefix()
        settings = Settings.model_validate(
            {"kafka_bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 8}
        )
        await create_topics(settings)
        ingress = IngressProcess(bootstrap, prefix, KEY)
        try:
            singles = [sized_user(n, 2048) for n in range(200)]
            batches = [
                orjson.dumps([lytics_user(b * args.batch + i, audience=i % 7) for i in range(args.batch)])
                for b in range(8)
            ]
            print(f"broker {bootstrap}; ingress pid {ingress.proc.pid}", flush=True)
            pid = ingress.proc.pid
            await scenario(
                "single-user ~2KB", ingress.port, singles, 1, args.clients, args.seconds, pid, broker_pid
            )
            name = f"{args.batch}-user batches"
            await scenario(
                name, ingress.port, batches, args.batch, args.clients, args.seconds, pid, broker_pid
            )
            await scenario(
                name,
                ingress.port,
                batches,
                args.batch,
                args.clients,
                args.seconds,
                pid,
                broker_pid,
                args.batch_rate,
            )
        finally:
            ingress.stop()
        stored = await topic_size(bootstrap, TopicNames.from_settings(settings).raw)
        print(f"records in {prefix}.webhooks.raw: {stored}")


if __name__ == "__main__":
    asyncio.run(main())
