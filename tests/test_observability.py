"""Observability against a real broker: consumer lag, JSON logs with ids, real /metrics and probes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY

from audience_relay import kafka
from audience_relay.kafkautil import read_topic
from audience_relay.lag import LagMonitor, partition_lag
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from devtools.localkafka import free_port
from devtools.processes import Component, wait_group
from devtools.wait import until_async
from tests.conftest import SAMPLES, start_ingress
from tests.fakes import Answer, FakeDestination


def lag_sample(group: str, topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "relay_consumer_lag", {"group": group, "topic": topic, "partition": str(partition)}
    )


def test_partition_lag_counts_from_log_start_when_never_committed() -> None:
    a, b, c = (TopicPartition("t", p) for p in range(3))
    ends = {a: 10, b: 10, c: 10}
    starts = {a: 0, b: 4, c: 8}
    # a: committed 7 → 3 left; b: never committed → from its start 4; c: committed below the log
    # start (retention deleted records) → from the start.
    assert partition_lag(ends, starts, {a: 7, c: 2}) == {a: 3, b: 6, c: 2}


async def _commit(settings: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = kafka.consumer(settings, group_id=group)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def test_lag_follows_the_groups_commits_whoever_owns_the_partition(kafka_settings: Settings) -> None:
    topics = TopicNames.from_settings(kafka_settings)
    group = f"{kafka_settings.topic_prefix}.sink.lagtest"
    producer = kafka.producer(kafka_settings)
    await producer.start()
    try:
        for partition, count in enumerate((5, 3, 0)):
            for n in range(count):
                await producer.send_and_wait(topics.membership_changes, b"x%d" % n, partition=partition)
    finally:
        await producer.stop()
    monitor = LagMonitor(kafka_settings, group, [topics.membership_changes], interval=60)
    p0, p1 = TopicPartition(topics.membership_changes, 0), TopicPartition(topics.membership_changes, 1)
    try:
        lag = await _poll(monitor)
        assert lag[p0] == 5 and lag[p1] == 3, lag  # nothing committed yet: everything is lag
        # One member commits part of partition 0; the partition then moves and another member
        # (a new consumer of the same group) finishes partition 1.
        await _commit(kafka_settings, group, {p0: 2})
        await _commit(kafka_settings, group, {p1: 3})
        lag = await _poll(monitor)
    finally:
        await monitor.close()
    assert lag[p0] == 3 and lag[p1] == 0, lag
    assert lag_sample(group, topics.membership_changes, 0) == 3
    assert lag_sample(group, topics.membership_changes, 1) == 0
    assert lag_sample(group, topics.membership_changes, 2) == 0
    assert REGISTRY.get_sample_value("relay_consumer_lag_updated_timestamp_seconds", {"group": group})


async def _poll(monitor: LagMonitor) -> dict[TopicPartition, int]:
    """One reading, retried while the broker answers a retriable error (e.g. coordinator moving)."""
    result: dict[TopicPartition, int] = {}

    async def read() -> bool:
        nonlocal result
        try:
            result = await monitor.poll_once()
        except KafkaError as exc:
            if not exc.retriable:
                raise
            await monitor.close()
            return False
        return True

    await until_async(read, 60, "a lag reading", interval=0.5)
    return result


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a component's log, each of which must be one JSON object."""
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON log line in {path}: {line[:300]!r}") from None
    return out


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


async def test_logs_metrics_and_probes_of_running_components(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """A request id travels ingress → split logs and dead letters → membership change → sink logs.

    The worker and a sink run as real processes at DEBUG: every line of their output is JSON
    (faust's and aiokafka's loggers included); their probes and /metrics answer on their ports.
    """
    topics = TopicNames.from_settings(kafka_settings)
    pushly = await FakeDestination().start()
    pushly.default = Answer(status=400, body='{"error": "bad field"}')  # given up → dead letter
    ingress = await start_ingress(kafka_settings)
    worker_port, sink_port = free_port(), free_port()
    worker = Component(
        kafka_settings,
        ["worker"],
        tmp_path / "w1.log",
        RELAY_WORKER_DATA_DIR=str(tmp_path / "w1-data"),
        RELAY_WORKER_WEB_HOST="127.0.0.1",
        RELAY_LOG_LEVEL="DEBUG",
        RELAY_TABLE_STORE="memory",
        RELAY_LAG_INTERVAL_SECONDS="1",
        RELAY_WORKER_WEB_PORT=str(worker_port),
    )
    sink = Component(
        kafka_settings,
        ["sink", "pushly"],
        tmp_path / "sink.log",
        RELAY_LOG_LEVEL="DEBUG",
        RELAY_LAG_INTERVAL_SECONDS="1",
        RELAY_SINK_WEB_PORT=str(sink_port),
        RELAY_WORKER_WEB_HOST="127.0.0.1",
        PUSHLY_WEBHOOK_URL=pushly.url,
        PUSHLY_API_KEY="pushly-secret-key",
    )
    try:
        await wait_group(kafka_settings, 1)
        body = orjson.loads((SAMPLES / "default-format-enter.json").read_bytes())
        nobody = {**body, "data": {k: v for k, v in body["data"].items() if k != "email"}}
        async with aiohttp.ClientSession(
            headers={"X-API-KEY": "key-current", "X-Request-Id": "req-obs-1"}
        ) as http:
            async with http.post(ingress.url + "/v1/lytics", data=orjson.dumps([body, nobody])) as resp:
                assert resp.status == 200

        def sink_gave_up() -> bool:
            return any(line.get("event") == "batch given up" for line in json_lines(tmp_path / "sink.log"))

        async def gave_up() -> bool:
            assert worker.alive() and sink.alive(), (tmp_path / "w1.log").read_text()[-2000:]
            return sink_gave_up()

        await until_async(gave_up, 120, "the sink to give the change up", interval=0.5)

        async def lag_exported() -> bool:
            w = (await _get(f"http://127.0.0.1:{worker_port}/metrics"))[1]
            s = (await _get(f"http://127.0.0.1:{sink_port}/metrics"))[1]
            return (
                f'group="{kafka_settings.topic_prefix}-processors"' in w
                and f'group="{kafka_settings.topic_prefix}.sink.pushly"' in s
            )

        await until_async(lag_exported, 60, "lag of both groups on /metrics", interval=0.5)
        worker_metrics = (await _get(f"http://127.0.0.1:{worker_port}/metrics"))[1]
        sink_metrics = (await _get(f"http://127.0.0.1:{sink_port}/metrics"))[1]
        probes = {
            (port, path): (await _get(f"http://127.0.0.1:{port}{path}"))[0]
            for port in (worker_port, sink_port)
            for path in ("/healthz", "/readyz")
        }
    finally:
        sink.stop()
        worker.stop()
        await ingress.runner.cleanup()
        await pushly.stop()

    assert set(probes.values()) == {200}, probes
    assert "relay_processor_table_keys{" in worker_metrics
    assert 'relay_processor_records_in_total{agent="split"}' in worker_metrics
    assert 'relay_sink_deliveries_total{destination="pushly",outcome="dead_lettered"}' in sink_metrics

    worker_lines = json_lines(tmp_path / "w1.log")
    sink_lines = json_lines(tmp_path / "sink.log")
    assert any(line["logger"].startswith("faust") for line in worker_lines)
    split = [line for line in worker_lines if line.get("event") == "webhook split"]
    assert split and split[0]["request_id"] == "req-obs-1" and split[0]["events"] == 1
    assert split[0]["rejected"] == 1
    dead = [line for line in worker_lines if line.get("event") == "record dead-lettered"]
    assert dead and dead[0]["request_id"] == "req-obs-1"

    changes = [
        orjson.loads(r.value)
        for r in await read_topic(kafka_settings.kafka_bootstrap_servers, topics.membership_changes)
    ]
    assert len(changes) == 1 and changes[0]["request_id"] == "req-obs-1"
    # (a rebalance could make the sink give the same batch up twice: every such line names it)
    given_up = [line for line in sink_lines if line.get("event") == "batch given up"]
    assert given_up and all(line["change_ids"] == [changes[0]["change_id"]] for line in given_up)
    assert all(line["request_ids"] == ["req-obs-1"] for line in given_up)
    assert "pushly-secret-key" not in (tmp_path / "sink.log").read_text()

    letters = await read_topic(kafka_settings.kafka_bootstrap_servers, topics.dead_letter)
    by_stage = {dict(r.headers)["stage"]: dict(r.headers) for r in letters}
    assert by_stage[b"split"]["request-id"] == b"req-obs-1"
    assert by_stage[b"sink"]["change-id"] == changes[0]["change_id"].encode()
