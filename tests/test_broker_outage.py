"""Stopping the broker turns answers into 503 + Retry-After; restarting it recovers the same ingress."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest
from aiokafka.admin import NewTopic

from audience_relay import kafka
from audience_relay.kafkautil import read_topic
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import LocalKafka, free_port
from devtools.processes import Component, wait_group
from devtools.wait import until, until_async
from ingress.app import PUBLISHER
from ingress.publisher import BrokerUnavailable, Publisher
from tests.conftest import make_settings, start_ingress
from tests.fakes import FakeDestination
from tests.test_sinks import sink_settings

KEY = {"X-API-KEY": "key-current"}


@pytest.mark.parametrize("kill", [False, True], ids=["graceful", "kill-9"])
async def test_broker_outage_answers_503_at_once_then_recovers(local_kafka: LocalKafka, kill: bool) -> None:
    """While the broker is away the ingress answers 503 + Retry-After at once (at most the request
    that finds out waits its produce timeout) and writes none of those bodies later; once the
    broker is back the same ingress stores again by itself."""
    settings = make_settings(local_kafka.bootstrap, produce_timeout_seconds=2.0, retry_after_seconds=3)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    running = await start_ingress(settings)
    publisher = running.app[PUBLISHER]
    stored: list[bytes] = []
    refused_at_once: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def post(n: int) -> tuple[int, dict[str, str]]:
                body = orjson.dumps({"data": {"email": f"user{n}@example.com"}, "n": n})
                knew = not publisher.reachable
                started = time.monotonic()
                async with http.post(running.url + "/v1/lytics", data=body, headers=KEY) as resp:
                    await resp.read()
                    if resp.status == 200:
                        stored.append(body)
                    elif knew:
                        # The ingress knew the broker was away: no wait for the produce timeout.
                        assert time.monotonic() - started < 0.5
                        refused_at_once.append(body)
                    return resp.status, dict(resp.headers)

            assert (await post(0))[0] == 200
            local_kafka.stop(kill=kill)
            for n in range(1, 6):
                status, headers = await post(n)
                assert status == 503, status
                assert headers["Retry-After"] == "3"
            assert not publisher.reachable
            assert len(refused_at_once) >= 4
            local_kafka.start()
            # Lytics keeps retrying; the same ingress process must answer 200 again on its own.
            deadline = time.monotonic() + 90
            status = 0
            n = 6
            while status != 200:
                assert time.monotonic() < deadline, "the ingress did not recover after the broker came back"
                status, headers = await post(n)
                assert status in (200, 503), status
                if status == 503:
                    assert headers["Retry-After"] == "3"
                n += 1
            for m in range(n, n + 5):
                assert (await post(m))[0] == 200
    finally:
        await running.runner.cleanup()
    landed = {r.value for r in await read_topic(local_kafka.bootstrap, topics.raw)}
    # Every body that was answered 200 is in Kafka; none refused at once was written behind the
    # client's back (only the one in flight when the broker went away may be: Lytics retries it).
    assert set(stored) <= landed
    assert not set(refused_at_once) & landed
    assert len(stored) >= 6


# --- a graceful stop under load, every component a real process ------------------------------------

CLIENTS = 2
USERS_PER_BODY = 20
#: Seconds of measurement while the broker is away (the outage itself lasts longer: it starts when
#: the stop is confirmed and the ingress refuses, and ends when the broker is back).
MEASURE_SECONDS = 10.0
#: Bounds over the measurement, per component: CPU as a fraction of one core, log lines per second.
MAX_CPU = 0.10
MAX_LINES_PER_S = 1.0
#: An answer while the ingress knows the broker is away: at once, not after RELAY_PRODUCE_TIMEOUT_SECONDS.
MAX_REFUSAL_SECONDS = 0.5


@dataclass
class Answered:
    at: float
    seconds: float
    status: int
    body: bytes


@dataclass
class Load:
    """Lytics-like clients: unique bodies of users entering an audience, each retried after Retry-After
    until it is stored (as Lytics does)."""

    url: str
    answers: list[Answered] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    next_user: int = 0

    def body(self) -> bytes:
        first, self.next_user = self.next_user, self.next_user + USERS_PER_BODY
        return orjson.dumps(
            [
                {
                    "data": {
                        "email": f"user{n}@example.com",
                        "segment_events": [
                            {"id": "aud1", "event": "enter", "slug": "aud_1", "enter": "2026-11-01T00:00:00Z"}
                        ],
                    },
                    "meta": {"timestamp": "2026-11-01T00:00:00Z"},
                }
                for n in range(first, first + USERS_PER_BODY)
            ]
        )

    async def client(self, http: aiohttp.ClientSession) -> None:
        body = self.body()
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                async with http.post(self.url + "/v1/lytics", data=body, headers=KEY) as resp:
                    await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
            except aiohttp.ClientError:
                status, retry_after = 0, None
            now = time.monotonic()
            self.answers.append(Answered(now, now - started, status, body))
            if status == 200:
                body = self.body()
                await asyncio.sleep(0.05)  # pacing: a client posts ~20 bodies a second at most
            else:
                assert status == 503, status
                assert retry_after == "1"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), float(retry_after))

    def stored(self) -> list[bytes]:
        return [a.body for a in self.answers if a.status == 200]

    def since(self, t: float) -> list[Answered]:
        return [a for a in self.answers if a.at >= t]


@dataclass
class Usage:
    """CPU seconds and log lines of one component process."""

    cpu: float
    lines: int

    @staticmethod
    def of(component: Component) -> Usage:
        times = psutil.Process(component.proc.pid).cpu_times()
        with component.log.open("rb") as fh:
            lines = sum(1 for _ in fh)
        return Usage(times.user + times.system, lines)


async def _status(url: str) -> int:
    """A probe's status, on a connection of its own (as the kubelet does: a kept-alive connection
    idle past the ingress's header timeout is answered 408 by its guard)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status
    except aiohttp.ClientError:
        return 0


async def test_graceful_broker_stop_under_load(local_kafka: LocalKafka, tmp_path: Path) -> None:
    """No component spins or floods its log while the broker is away; everything stored arrives.

    The broker is stopped with SIGTERM: its partitions first lose their leader, which is what made
    aiokafka's sender and fetcher force metadata updates in a tight loop (issue 15).
    """
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = sink_settings(
        local_kafka.bootstrap, pushly, odp, retry_after_seconds=1, produce_timeout_seconds=5.0
    )
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    port, ops_port, worker_port, sink_port = free_port(), free_port(), free_port(), free_port()
    ingress = Component(
        settings,
        ["ingress"],
        tmp_path / "ingress.log",
        RELAY_INGRESS_HOST="127.0.0.1",
        RELAY_INGRESS_PORT=str(port),
        RELAY_INGRESS_METRICS_PORT=str(ops_port),
    )
    worker = Component(
        settings,
        ["worker"],
        tmp_path / "worker.log",
        RELAY_WORKER_DATA_DIR=str(tmp_path / "worker-data"),
        RELAY_WORKER_WEB_HOST="127.0.0.1",
        RELAY_WORKER_WEB_PORT=str(worker_port),
        RELAY_TABLE_STORE="memory",
    )
    sink = Component(
        settings,
        ["sink", "pushly"],
        tmp_path / "sink.log",
        RELAY_SINK_WEB_PORT=str(sink_port),
        RELAY_WORKER_WEB_HOST="127.0.0.1",
    )
    components = {"ingress": ingress, "worker": worker, "sink": sink}
    probes = {
        "ingress": f"http://127.0.0.1:{ops_port}",
        "worker": f"http://127.0.0.1:{worker_port}",
        "sink": f"http://127.0.0.1:{sink_port}",
    }
    load = Load(f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as http:

            async def all_ready() -> bool:
                for name, c in components.items():
                    assert c.alive(), f"{name} died: {c.log.read_text()[-3000:]}"
                return all([await _status(url + "/readyz") == 200 for url in probes.values()])

            await until_async(all_ready, 120, "every component to be ready", interval=0.5)
            await wait_group(settings, 1)
            clients = [asyncio.create_task(load.client(http)) for _ in range(CLIENTS)]
            await until(lambda: len(pushly.delivered()) >= 100, 120, "changes flowing to pushly")

            await asyncio.to_thread(local_kafka.stop)  # SIGTERM, returns once the broker has exited
            stopped = time.monotonic()

            async def ingress_refuses() -> bool:
                refused = [a for a in load.since(stopped) if a.status == 503]
                return len(refused) >= 3 and await _status(probes["ingress"] + "/readyz") == 503

            await until_async(ingress_refuses, 60, "the ingress to refuse while the broker is away", 0.2)

            before = {name: Usage.of(c) for name, c in components.items()}
            window = time.monotonic()
            await asyncio.sleep(MEASURE_SECONDS)  # the measurement window itself (rates are asserted)
            elapsed = time.monotonic() - window
            after = {name: Usage.of(c) for name, c in components.items()}
            during = load.since(window)
            # Readiness while the broker is away: workers and sinks stay ready (README, *Probes*).
            outage_probes = {
                name: (await _status(url + "/healthz"), await _status(url + "/readyz"))
                for name, url in probes.items()
            }

            await asyncio.to_thread(local_kafka.start)
            restarted = time.monotonic()
            await until(
                lambda: sum(a.status == 200 for a in load.since(restarted)) >= 20,
                120,
                "the ingress to store again by itself",
            )
            load.stop.set()
            await asyncio.gather(*clients)
            expected = {record["data"]["email"] for body in load.stored() for record in orjson.loads(body)}

            def arrived() -> bool:
                return expected <= {r.body["data"]["email"] for r in pushly.delivered()}

            await until(arrived, 240, "every stored user's change at pushly")
    finally:
        for c in components.values():
            c.stop()
        await pushly.stop()
        await odp.stop()

    usage = {
        name: (
            (after[name].cpu - before[name].cpu) / elapsed,
            (after[name].lines - before[name].lines) / elapsed,
        )
        for name in components
    }
    print(
        "\nbroker away (graceful stop): "
        + "; ".join(f"{name} {cpu:.1%} CPU, {lines:.1f} lines/s" for name, (cpu, lines) in usage.items())
        + f"; {len(during)} answers, slowest of those asked in the window "
        + f"{max((a.seconds for a in during if a.at - a.seconds >= window), default=0):.3f}s"
    )
    refused = [a for a in during if a.status == 503]
    assert refused and len(refused) == len(during), "the ingress stored while the broker was away"
    # Requests sent while the ingress knew (those in flight when the broker went away may wait out
    # their produce timeout, and end inside the window).
    asked_knowing = [a for a in during if a.at - a.seconds >= window]
    assert len(asked_knowing) >= CLIENTS * MEASURE_SECONDS / 2
    assert max(a.seconds for a in asked_knowing) < MAX_REFUSAL_SECONDS
    assert outage_probes == {"ingress": (200, 503), "worker": (200, 200), "sink": (200, 200)}
    for name, (cpu, lines) in usage.items():
        assert cpu < MAX_CPU, f"{name} used {cpu:.0%} of a core while the broker was away"
        assert lines < MAX_LINES_PER_S, f"{name} logged {lines:.1f} lines/s; see {components[name].log}"
    # A refused body is not written behind the client's back, except those in flight when the
    # broker went away (at most one per client): Lytics retries them, and downstream recognises
    # the repeated content.
    raw = Counter(r.value for r in await read_topic(local_kafka.bootstrap, topics.raw))
    assert set(load.stored()) <= set(raw)
    assert sum(n - 1 for n in raw.values()) <= CLIENTS, "refused bodies were written anyway"


async def test_a_failed_record_gets_the_ingress_a_new_producer(kafka_bootstrap: str) -> None:
    """aiokafka's idempotent producer counts a failed batch's sequence number, so the broker would
    refuse every later batch of that partition; the publisher replaces the producer first."""
    settings = make_settings(kafka_bootstrap, produce_timeout_seconds=5.0)
    small = f"{settings.topic_prefix}.small"
    admin = kafka.admin(settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "2000"})])
    finally:
        await admin.close()
    publisher = Publisher(settings)
    await publisher.start()
    try:
        assert await publisher.wait_connected(60)
        await publisher.send(small, b"fits", [])
        first = publisher._producer
        with pytest.raises(BrokerUnavailable):
            # The broker refuses it, too large even compressed (random bytes do not shrink).
            await publisher.send(small, os.urandom(5000), [])
        assert not publisher.reachable
        with pytest.raises(BrokerUnavailable, match="unreachable"):
            await publisher.send(small, b"refused at once", [])
        await until(lambda: publisher.reachable, 30, "the publisher to accept again")
        await publisher.send(small, b"fits again", [])  # the old producer would fail it as out of order
        assert publisher._producer is not first
    finally:
        await publisher.stop()
    assert [r.value for r in await read_topic(kafka_bootstrap, small)] == [b"fits", b"fits again"]
