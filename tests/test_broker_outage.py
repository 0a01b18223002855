"""Stopping the broker turns answers into 503 + Retry-After; restarting it recovers the same ingress."""

from __future__ import annotations

import time

import aiohttp
import orjson

from audience_relay.kafkautil import read_topic
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import LocalKafka
from tests.conftest import make_settings, start_ingress

KEY = {"X-API-KEY": "key-current"}


async def test_broker_outage_answers_503_then_recovers(local_kafka: LocalKafka) -> None:
    settings = make_settings(local_kafka.bootstrap, produce_timeout_seconds=2.0, retry_after_seconds=3)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    running = await start_ingress(settings)
    stored: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def post(n: int) -> tuple[int, dict[str, str]]:
                body = orjson.dumps({"data": {"email": f"user{n}@example.com"}, "n": n})
                async with http.post(running.url + "/v1/lytics", data=body, headers=KEY) as resp:
                    await resp.read()
                    if resp.status == 200:
                        stored.append(body)
                    return resp.status, dict(resp.headers)

            assert (await post(0))[0] == 200
            local_kafka.stop()
            for n in range(1, 4):
                status, headers = await post(n)
                assert status == 503, status
                assert headers["Retry-After"] == "3"
            local_kafka.start()
            # Lytics keeps retrying; the same ingress process must answer 200 again on its own.
            deadline = time.monotonic() + 90
            status = 0
            n = 4
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
    # Every body that was answered 200 is in Kafka (a 503'd one may be too: Lytics retries it anyway).
    assert set(stored) <= landed
    assert len(stored) >= 6
