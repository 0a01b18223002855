"""The ingress against a real broker: every answer of the design's table and what lands in Kafka."""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from audience_relay.auth import Authenticator
from audience_relay.kafkautil import read_topic, topic_size
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import free_port
from devtools.wait import until
from ingress.app import BUDGET, build_app
from ingress.publisher import Headers, Publisher
from tests.conftest import SAMPLES, RunningIngress, make_settings, start_ingress

KEY = {"X-API-KEY": "key-current"}
AUDIENCE_SAMPLES = sorted(p for p in SAMPLES.glob("*.json") if not p.name.startswith("enrichment"))


async def post(
    ingress: RunningIngress,
    body: bytes,
    headers: dict[str, str] | None = None,
    path: str = "/v1/lytics",
    **kw: object,
) -> tuple[int, dict[str, object], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            ingress.url + path, data=body, headers=headers if headers is not None else KEY, **kw
        ) as resp,
    ):
        raw = await resp.read()
        return resp.status, (orjson.loads(raw) if raw else {}), dict(resp.headers)


def header(record: object, name: str) -> bytes:
    return dict(record.headers)[name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("sample", AUDIENCE_SAMPLES, ids=lambda p: p.stem)
async def test_each_sample_round_trips_byte_for_byte(
    sample: object, ingress: RunningIngress, kafka_settings: Settings, topics: TopicNames
) -> None:
    body = sample.read_bytes()  # type: ignore[attr-defined]
    content_type = "application/cloudevents+json" if "cloudevents" in sample.name else "application/json"  # type: ignore[attr-defined]
    status, answer, _ = await post(
        ingress, body, {**KEY, "Content-Type": content_type, "X-Request-Id": "req-1"}
    )
    assert status == 200, answer
    assert answer == {"status": "stored", "request_id": "req-1"}
    records = await read_topic(kafka_settings.kafka_bootstrap_servers, topics.raw)
    assert [r.value for r in records] == [body]
    rec = records[0]
    assert header(rec, "source") == b"default"
    assert header(rec, "request-id") == b"req-1"
    assert header(rec, "content-type") == content_type.encode()
    assert header(rec, "received-at").endswith(b"Z")
    assert header(rec, "auth") == b"x-api-key"
    assert await topic_size(kafka_settings.kafka_bootstrap_servers, topics.dead_letter) == 0


async def test_batches_and_cloudevents_batch_round_trip(
    ingress: RunningIngress, kafka_settings: Settings, topics: TopicNames
) -> None:
    objects = [orjson.loads(p.read_bytes()) for p in AUDIENCE_SAMPLES]
    lytics_batch = orjson.dumps(objects)
    ce_batch = orjson.dumps([o for o in objects if "specversion" in o] * 3)
    assert (await post(ingress, lytics_batch))[0] == 200
    ce_headers = {**KEY, "Content-Type": "application/cloudevents-batch+json"}
    assert (await post(ingress, ce_batch, ce_headers))[0] == 200
    records = await read_topic(kafka_settings.kafka_bootstrap_servers, topics.raw)
    assert sorted(r.value for r in records) == sorted([lytics_batch, ce_batch])


@pytest.mark.parametrize(
    "headers, query",
    [
        ({"X-API-KEY": "key-current"}, None),
        ({"X-API-KEY": "key-previous"}, None),  # rotation: the old key stays live until removed
        ({"Authorization": "key-current"}, None),
        ({"Authorization": "Bearer key-previous"}, None),
        ({}, {"api_key": "key-current"}),
    ],
    ids=["x-api-key", "rotated-key", "authorization-raw", "authorization-bearer", "query-param"],
)
async def test_static_key_modes(
    headers: dict[str, str], query: dict[str, str] | None, ingress: RunningIngress
) -> None:
    status, _, _ = await post(ingress, b"{}", headers, params=query)
    assert status == 200


@pytest.mark.parametrize(
    "headers, query",
    [
        ({}, None),
        ({"X-API-KEY": "wrong"}, None),
        ({"X-API-KEY": "key-current "[:-2]}, None),  # a prefix of a real key
        ({"Authorization": "Bearer wrong"}, None),
        ({"Authorization": "Bearer rt1.forged.signature"}, None),
        ({}, {"api_key": "wrong"}),
        ({}, {"other_param": "key-current"}),
    ],
)
async def test_bad_credentials_get_401_and_store_nothing(
    headers: dict[str, str],
    query: dict[str, str] | None,
    ingress: RunningIngress,
    kafka_settings: Settings,
    topics: TopicNames,
) -> None:
    status, answer, resp_headers = await post(ingress, b'{"data": {}}', headers, params=query)
    assert status == 401
    assert answer["error"] == "unauthorized"
    assert "WWW-Authenticate" in resp_headers
    assert await topic_size(kafka_settings.kafka_bootstrap_servers, topics.raw) == 0
    assert await topic_size(kafka_settings.kafka_bootstrap_servers, topics.dead_letter) == 0


BAD_BODIES = {
    "not-json": b"this is not json",
    "truncated": b'{"id": "1", "data": {',
    "invalid-utf8": b'{"id": "\xff\xfe"}',
    "scalar": b"42",
    "string": b'"hello"',
    "null": b"null",
    "empty": b"",
    "empty-array": b"[]",
    "array-of-non-objects": b'[{"id": 1}, 2]',
    "deep-nesting": b"[" * 5000 + b"]" * 5000,
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
async def test_bad_bodies_get_400_and_are_kept_in_dead_letter(
    name: str, ingress: RunningIngress, kafka_settings: Settings, topics: TopicNames
) -> None:
    body = BAD_BODIES[name]
    status, answer, _ = await post(ingress, body, {**KEY, "X-Request-Id": f"bad-{name}"})
    assert status == 400
    assert answer["error"] == "bad_body"
    assert isinstance(answer["detail"], str) and answer["detail"]
    assert await topic_size(kafka_settings.kafka_bootstrap_servers, topics.raw) == 0
    [dead] = await read_topic(kafka_settings.kafka_bootstrap_servers, topics.dead_letter)
    assert dead.value == body
    assert header(dead, "reason").decode() == answer["detail"]
    assert header(dead, "stage") == b"ingress"
    assert header(dead, "request-id") == f"bad-{name}".encode()


async def test_oversized_body_is_413_before_reading_and_stores_nothing(kafka_bootstrap: str) -> None:
    settings = make_settings(kafka_bootstrap, max_body_bytes=4096)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    running = await start_ingress(settings)
    try:
        big = b'{"data": "' + b"x" * 10_000 + b'"}'
        status, answer, _ = await post(running, big)
        assert status == 413 and answer["error"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer
            for _ in range(10):
                yield b"x" * 1000

        status, answer, _ = await post(running, chunks())  # type: ignore[arg-type]
        assert status == 413
        # Exactly at the limit is fine.
        exact = b'{"d":"' + b"y" * (4096 - 8) + b'"}'
        assert len(exact) == 4096
        assert (await post(running, exact))[0] == 200
        assert [r.value for r in await read_topic(kafka_bootstrap, topics.raw)] == [exact]
        assert await topic_size(kafka_bootstrap, topics.dead_letter) == 0
    finally:
        await running.runner.cleanup()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "x-custom"])
async def test_compressed_bodies_are_refused(encoding: str, ingress: RunningIngress) -> None:
    # Regression (fuzz): aiohttp itself answered br with a plain-text 400 ("install Brotli") and
    # inflated gzip/deflate bodies as they arrived; now every encoding is the handler's JSON 415.
    body = gzip.compress(b'{"data": {}}') if encoding == "gzip" else b"\x1f\x8b\x08"
    status, answer, _ = await post(ingress, body, {**KEY, "Content-Encoding": encoding})
    assert status == 415 and answer["error"] == "unsupported_encoding"


async def test_too_many_bytes_in_flight_answers_429_with_retry_after(kafka_bootstrap: str) -> None:
    settings = make_settings(kafka_bootstrap, max_inflight_bytes=2048, max_body_bytes=2048)
    await create_topics(settings)
    running = await start_ingress(settings)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"data": "' + b"a" * 1000
        await release.wait()
        yield b'"}'

    try:
        async with aiohttp.ClientSession() as http:
            length = str(len(b'{"data": "') + 1000 + 2)
            first = asyncio.create_task(
                http.post(
                    running.url + "/v1/lytics", data=slow_body(), headers={**KEY, "Content-Length": length}
                )
            )
            budget = running.app[BUDGET]
            await until(lambda: budget.used > 0, what="the first request to hold its reservation")
            status, answer, headers = await post(running, b'{"d": "' + b"b" * 1500 + b'"}')
            assert status == 429 and answer["error"] == "busy"
            assert int(headers["Retry-After"]) >= 1
            release.set()
            resp = await first
            assert resp.status == 200
            resp.release()
        assert budget.used == 0
    finally:
        await running.runner.cleanup()


async def test_oauth_client_credentials(kafka_bootstrap: str) -> None:
    settings = make_settings(
        kafka_bootstrap,
        ingress_api_keys=[],
        oauth_clients={"lytics": "s3cret-client"},
        oauth_signing_key="signing-key-for-tests",
    )
    await create_topics(settings)
    running = await start_ingress(settings)
    try:
        async with aiohttp.ClientSession() as http:
            form = {
                "grant_type": "client_credentials",
                "client_id": "lytics",
                "client_secret": "s3cret-client",
            }
            async with http.post(running.url + "/oauth/token", data=form) as resp:
                assert resp.status == 200
                token = await resp.json()
            assert token["token_type"] == "Bearer" and token["expires_in"] == 3600
            basic = base64.b64encode(b"lytics:s3cret-client").decode()
            async with http.post(
                running.url + "/oauth/token",
                data={"grant_type": "client_credentials"},
                headers={"Authorization": f"Basic {basic}"},
            ) as resp:
                assert resp.status == 200
            async with http.post(
                running.url + "/oauth/token", data={**form, "client_secret": "nope"}
            ) as resp:
                assert resp.status == 401 and (await resp.json()) == {"error": "invalid_client"}
            async with http.post(
                running.url + "/oauth/token", data={**form, "grant_type": "password"}
            ) as resp:
                assert resp.status == 400
        bearer = {"Authorization": f"Bearer {token['access_token']}"}
        assert (await post(running, b"{}", bearer))[0] == 200
        # An expired token and a tampered one are both a plain 401.
        auth = Authenticator(settings)
        expired = auth.issue_token("lytics", "s3cret-client", now=0)
        assert expired is not None
        for bad in (expired.access_token, token["access_token"][:-2] + "xx"):
            status, answer, _ = await post(running, b"{}", {"Authorization": f"Bearer {bad}"})
            assert status == 401 and answer["detail"] == "missing or invalid credentials"
    finally:
        await running.runner.cleanup()


async def test_sources_have_their_own_keys(kafka_bootstrap: str) -> None:
    settings = make_settings(
        kafka_bootstrap, sources={"crm": {"api_keys": ["crm-key"]}, "web": {"api_keys": ["web-key"]}}
    )
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    running = await start_ingress(settings)
    try:
        assert (await post(running, b'{"a": 1}', {"X-API-KEY": "crm-key"}, path="/v1/lytics/crm"))[0] == 200
        assert (await post(running, b'{"a": 2}', {"X-API-KEY": "web-key"}, path="/v1/lytics/crm"))[0] == 401
        assert (await post(running, b'{"a": 3}', {"X-API-KEY": "crm-key"}, path="/v1/lytics"))[0] == 401
        # Global keys are good for every source.
        assert (await post(running, b'{"a": 4}', KEY, path="/v1/lytics/web"))[0] == 200
        status, answer, _ = await post(running, b"{}", KEY, path="/v1/lytics/unknown")
        assert status == 404 and answer["error"] == "unknown_source"
        records = await read_topic(kafka_bootstrap, topics.raw)
        assert sorted((header(r, "source"), r.value) for r in records) == [
            (b"crm", b'{"a": 1}'),
            (b"web", b'{"a": 4}'),
        ]
    finally:
        await running.runner.cleanup()


async def test_health_and_readiness(ingress: RunningIngress) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(ingress.url + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(ingress.url + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ready"


async def test_not_ready_when_raw_topic_is_missing(kafka_bootstrap: str) -> None:
    running = await start_ingress(make_settings(kafka_bootstrap))  # topics never created
    try:
        async with aiohttp.ClientSession() as http, http.get(running.url + "/readyz") as resp:
            assert resp.status == 503
    finally:
        await running.runner.cleanup()


class GatedPublisher(Publisher):
    """The real publisher, held at a gate so a test can act while a produce is in flight."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def send(self, topic: str, value: bytes, headers: Headers, key: bytes | None = None) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().send(topic, value, headers, key)


async def test_graceful_shutdown_finishes_in_flight_requests(
    kafka_settings: Settings, topics: TopicNames
) -> None:
    publisher = GatedPublisher(kafka_settings)
    app = build_app(kafka_settings, publisher)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    assert await publisher.wait_connected(60)
    body = b'{"data": {"email": "in-flight@example.com"}}'
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/v1/lytics", data=body, headers=KEY))
        await publisher.entered.wait()  # the body is read; its produce is under way
        shutdown = asyncio.create_task(runner.cleanup())
        await asyncio.sleep(0)  # let the shutdown begin while the request is in flight
        assert not shutdown.done()
        publisher.gate.set()
        resp = await request
        assert resp.status == 200
        resp.release()
        await shutdown
    records = await read_topic(kafka_settings.kafka_bootstrap_servers, topics.raw)
    assert [r.value for r in records] == [body]
