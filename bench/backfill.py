"""Backfill benchmark: a Lytics "Existing Users" backfill through the whole pipeline.

N users x M audiences are posted as 300-user batches by 20 concurrent clients to the ingress; one
worker and the three sinks deliver to local fake Pushly/ODP servers and the analytics topic. Shows
progress, then prints end-to-end memberships/s, time to drain, the CPU seconds each component used,
and per destination its batch size, when it had everything, its changes/s, duplicates and losses.

Pushly runs at its default batch size (PUSHLY_BATCH_SIZE, 1: one request per change) unless
``--pushly-batch`` says otherwise; the figure printed says which. The fake ODP answers each request
after ``--odp-latency-ms`` (50), like a real one, so the time ODP takes shows what its 20 calls at
once achieve. Every user carries a Lytics ID (``_id``), which the processors keep and ODP is sent
by default (``--odp-identifier-source`` chooses another field).

With ``--sinks-only`` the changes are written straight into ``membership-changes`` (the records the
worker would make, identifiers included) and only the sinks run: it measures the sinks themselves;
``--destinations odp`` limits the run to some of them.

    python -m bench.backfill [--users 250000] [--audiences 4] [--clients 20] [--pushly-batch N]
                             [--odp-latency-ms 50] [--odp-identifier-source FIELD]
                             [--sinks-only] [--destinations pushly,odp,analytics]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from audience_relay import kafka
from audience_relay.kafkautil import partition_count, produce_all
from audience_relay.names import SINKS
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from bench.common import IngressProcess, arguments, bench_settings, broker, http_post_loop
from devtools.localkafka import free_port
from devtools.up import LocalReceiver
from schemas.records import MembershipChange, content_id

KEY = "bench-key"
STAMP = "2026-11-01T10:00:00.000000000Z"


class Receiver(LocalReceiver):
    """A local destination that counts records and distinct memberships instead of printing them,
    answering each request after ``latency`` seconds."""

    def __init__(self, name: str, latency: float = 0.0) -> None:
        super().__init__(name, self._count)
        self.latency = latency
        self.records = 0
        self.memberships: set[tuple[str, str]] = set()
        self.first_at: float | None = None
        self.last_at: float | None = None

    def _count(self, destination: str, identifier: str, segment_event: dict[str, Any]) -> None:
        self.records += 1
        self.memberships.add((identifier, segment_event["id"]))
        self.last_at = time.monotonic()
        if self.first_at is None:
            self.first_at = self.last_at

    async def _handle(self, request: web.Request) -> web.Response:
        if self.latency:
            await asyncio.sleep(self.latency)  # the destination's own answer time
        return await super()._handle(request)

    def own_rate(self) -> str:
        """Records per second from the first record received to the last (the sink's own pace)."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return "n/a"
        return f"{self.records / (self.last_at - self.first_at):,.0f}/s from its first record to its last"


def batches(users: int, audiences: int, per_body: int) -> list[bytes]:
    out = []
    for start in range(0, users, per_body):
        records = []
        for n in range(start, min(start + per_body, users)):
            records.append(
                {
                    "id": str(n),
                    "data": {
                        "_id": f"4f1b{n:012x}",
                        "email": f"user{n}@example.com",
                        "segment_events": [
                            {"id": f"aud{a:04d}", "event": "enter", "slug": f"audience_{a}", "enter": STAMP}
                            for a in range(audiences)
                        ],
                    },
                    "meta": {"timestamp": STAMP},
                }
            )
        out.append(orjson.dumps(records))
    return out


async def post_all(port: int, bodies: list[bytes], clients: int) -> dict[int, int]:
    """Every body posted once, by ``clients`` keep-alive connections; a 429/503 is retried."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    statuses: dict[int, int] = {}

    async def client() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            answer: dict[int, int] = {}
            await http_post_loop(
                port, "/v1/lytics", {"X-API-KEY": KEY}, [body], float("inf"), [], answer, max_requests=1
            )
            for status, count in answer.items():
                statuses[status] = statuses.get(status, 0) + count
            if 200 not in answer:
                queue.put_nowait(body)  # Lytics retries what was not stored
                await asyncio.sleep(0.5)

    await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


async def preload_changes(settings: Settings, users: int, audiences: int) -> None:
    """The enter changes the worker would emit for the backfill, written straight to the topic."""
    topic = TopicNames.from_settings(settings).membership_changes
    chunk: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
    for n in range(users):
        ident = f"user{n}@example.com"
        for a in range(audiences):
            audience = f"aud{a:04d}"
            event_id = content_id(ident, audience, "enter", STAMP)
            change_id = MembershipChange.make_id(ident, audience, "entered", event_id)
            change = {
                "schema_version": 1,
                "change_id": change_id,
                "identifier": ident,
                "match_field": "email",
                "identifiers": {"_id": f"4f1b{n:012x}", "email": ident},
                "audience_id": audience,
                "audience_slug": f"audience_{a}",
                "change": "entered",
                "member": True,
                "event_time": STAMP,
                "entered_at": STAMP,
                "exited_at": None,
                "seconds_in_audience": None,
                "event_id": event_id,
                "lytics_user_id": str(n),
                "source": "default",
                "request_id": "bench",
            }
            chunk.append((ident.encode(), orjson.dumps(change), [("change-id", change_id.encode())]))
            if len(chunk) >= 50_000:
                await produce_all(settings, topic, chunk)
                chunk = []
    if chunk:
        await produce_all(settings, topic, chunk)


class TopicSizes:
    """Records held by topics, through one consumer kept open: the progress check runs every second,
    and a client made per check would cost the broker (and the run measured) more than the check."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: dict[str, list[TopicPartition]] = {}

    async def of(self, topic: str) -> int:
        if self._consumer is None:
            self._consumer = kafka.consumer(self.bootstrap)
            await self._consumer.start()
        if topic not in self._parts:
            count = await partition_count(self.bootstrap, topic)
            self._parts[topic] = [TopicPartition(topic, p) for p in range(count)]
        parts = self._parts[topic]
        ends = await self._consumer.end_offsets(parts)
        starts = await self._consumer.beginning_offsets(parts)
        return sum(ends[tp] - starts[tp] for tp in parts)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


def cpu_spent(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (those still running)."""
    spent = {}
    for role, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        spent[role] = times.user + times.system
    return spent


def spawn(settings: Settings, args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "audience_relay.cli", *args],
        env={**os.environ, **settings.to_env(), **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--users", type=int, default=250_000)
    parser.add_argument("--audiences", type=int, default=4)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--batch", type=int, default=300)
    parser.add_argument(
        "--pushly-batch",
        type=int,
        default=None,
        help="Pushly's batch size (default: PUSHLY_BATCH_SIZE's default, 1 = one request per change)",
    )
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--odp-latency-ms", type=float, default=50.0, help="the fake ODP's answer time")
    parser.add_argument(
        "--odp-identifier-source",
        default=None,
        help="ODP_IDENTIFIER_SOURCE (default: its default, _id, the Lytics ID)",
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--sinks-only",
        action="store_true",
        help="write the changes straight into membership-changes and run only the sinks",
    )
    parser.add_argument("--destinations", default=",".join(SINKS), help="the sinks to run (comma-separated)")
    args = parser.parse_args()
    expected = args.users * args.audiences
    chosen = [d.strip() for d in args.destinations.split(",") if d.strip()]

    pushly, odp = Receiver("pushly"), Receiver("odp", args.odp_latency_ms / 1000)
    await pushly.start()
    await odp.start()
    with broker() as (bootstrap, broker_pid):
        settings = bench_settings(
            bootstrap,
            partitions=args.partitions,
            ingress_api_keys=[KEY],
            pushly_webhook_url=pushly.url,
            pushly_api_key="bench",
            **({"pushly_batch_size": args.pushly_batch} if args.pushly_batch else {}),
            odp_webhook_url=odp.url,
            odp_auth_token="bench",
            **({"odp_identifier_source": args.odp_identifier_source} if args.odp_identifier_source else {}),
        )
        names = TopicNames.from_settings(settings)
        await create_topics(settings)
        work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
        procs: list[subprocess.Popen[bytes]] = []
        sizes = TopicSizes(bootstrap)
        roles: list[str] = []
        cpu: dict[str, float] = {}
        ingress: IngressProcess | None = None
        bodies: list[bytes] = []
        posting: asyncio.Task[dict[int, int]] | None = None
        posted_at = None
        analytics = 0
        complete_at: dict[str, float] = {}
        tick = 0
        started = time.monotonic()
        try:
            if args.sinks_only:
                loading = time.monotonic()
                await preload_changes(settings, args.users, args.audiences)
                print(f"  {expected:,} changes written in {time.monotonic() - loading:.1f} s", flush=True)
            else:
                roles.append("worker")
                procs.append(
                    spawn(
                        settings,
                        ["worker"],
                        work / "worker.log",
                        RELAY_WORKER_DATA_DIR=str(work / "worker"),
                        RELAY_WORKER_WEB_PORT=str(free_port()),
                    )
                )
                ingress = IngressProcess(bootstrap, settings.topic_prefix, KEY)
                bodies = batches(args.users, args.audiences, args.batch)
            roles += [f"sink {s}" for s in chosen]
            procs += [
                spawn(settings, ["sink", s], work / f"sink-{s}.log", RELAY_SINK_WEB_PORT=str(free_port()))
                for s in chosen
            ]
            default_batch = Settings.model_fields["pushly_batch_size"].default
            how = (
                "written to membership-changes, sinks only"
                if args.sinks_only
                else (f"in {len(bodies):,} bodies of {args.batch} users")
            )
            print(
                f"backfill: {args.users:,} users x {args.audiences} audiences = {expected:,} memberships "
                f"{how}; {args.partitions} partitions; sinks {', '.join(chosen)}; pushly batch "
                f"size {settings.pushly_batch_size}"
                f"{' (its default)' if settings.pushly_batch_size == default_batch else ''}, concurrency "
                f"{settings.pushly_concurrency}; odp batch size {settings.odp_batch_size}, concurrency "
                f"{settings.odp_concurrency}, answers after {args.odp_latency_ms:.0f} ms, identifier "
                f"{settings.odp_identifier_source}; logs in {work}",
                flush=True,
            )
            watched = {
                **dict(zip(roles, (p.pid for p in procs), strict=True)),
                **({"ingress": ingress.proc.pid} if ingress else {}),
                **({"broker": broker_pid} if broker_pid else {}),
                "bench (posting, fake destinations)": os.getpid(),
            }
            cpu_before = cpu_spent(watched)
            started = time.monotonic()
            posting = asyncio.create_task(post_all(ingress.port, bodies, args.clients)) if ingress else None
            while True:
                await asyncio.sleep(1)  # completion check cadence (a progress line every 5 s)
                tick += 1
                for p in procs:
                    assert p.poll() is None, f"a component died; see {work}"
                if posting is not None and posting.done() and posted_at is None:
                    posted_at = time.monotonic() - started
                    print(
                        f"  all bodies stored after {posted_at:.1f} s; answers {posting.result()}", flush=True
                    )
                analytics = await sizes.of(names.analytics)
                elapsed = time.monotonic() - started
                changes = await sizes.of(names.membership_changes)
                if tick % 5 == 0:
                    print(
                        f"  {elapsed:6.1f} s  changes {changes:>9,}  "
                        f"pushly {len(pushly.memberships):>9,}  odp {len(odp.memberships):>9,}  "
                        f"analytics {analytics:>9,}  / {expected:,}",
                        flush=True,
                    )
                for name, count in (
                    ("pushly", len(pushly.memberships)),
                    ("odp", len(odp.memberships)),
                    ("analytics", analytics),
                ):
                    if count >= expected and name in chosen:
                        complete_at.setdefault(name, elapsed)
                if len(complete_at) == len(chosen):
                    break
                if elapsed > args.timeout:
                    print("  timed out", flush=True)
                    break
            drained = time.monotonic() - started
            cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_spent(watched).items()}
        finally:
            await sizes.close()
            if ingress is not None:
                ingress.stop()
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
        print(
            f"drained {expected:,} memberships in {drained:.1f} s: {expected / drained:,.0f} memberships/s "
            f"({args.users / drained:,.0f} users/s); bodies stored in {posted_at or float('nan'):.1f} s"
        )
        if cpu:
            cores = os.cpu_count() or 1
            print(
                f"  CPU seconds in the run ({sum(cpu.values()):,.0f} of {drained * cores:,.0f} on {cores} "
                "cores): " + ", ".join(f"{k} {v:,.1f}" for k, v in cpu.items())
            )
        for r in (pushly, odp):
            if r.name not in chosen:
                continue
            done_at = complete_at.get(r.name)
            rate = f"{expected / done_at:,.0f} changes/s" if done_at else "not complete"
            print(
                f"  {r.name}: everything after {done_at or float('nan'):.1f} s ({rate}, progress checked "
                f"every second; {r.own_rate()}), {r.requests:,} requests, {r.records:,} records, "
                f"{len(r.memberships):,} distinct, "
                f"duplicates {r.records - len(r.memberships):,}, lost {expected - len(r.memberships):,}"
            )
        if "analytics" in chosen:
            print(
                f"  analytics: {analytics:,} records, lost {max(0, expected - analytics):,} "
                f"(duplicates {max(0, analytics - expected):,})"
            )
    await pushly.stop()
    await odp.stop()


if __name__ == "__main__":
    asyncio.run(main())
