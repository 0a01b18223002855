"""No secret — configured key, presented key, client secret, token, signing key, destination
credential, Kafka SASL password, Kafka TLS key password — reaches a log line, a Kafka record, a
command's output or an HTTP answer: the ingress alone, then the whole pipeline as real processes
connected to a secured broker (SASL_SSL with SCRAM-SHA-512 and a client certificate)."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from audience_relay import kafka
from audience_relay.kafkautil import read_topic
from audience_relay.logs import JsonFormatter
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import free_port
from devtools.localtls import make_client_pem
from devtools.processes import Component, start_worker, wait_group
from devtools.wait import until_async
from tests.conftest import make_settings, start_ingress
from tests.fakes import Answer, FakeDestination
from tests.secured import SecuredBroker, relay_cli

SECRETS = ["sekrit-key-123", "client-sekrit-456", "sign-sekrit-789", "sekrit-key-124"]


async def test_no_secret_in_logs_or_answers(kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(
        kafka_bootstrap,
        ingress_api_keys=["sekrit-key-123"],
        oauth_clients={"lytics": "client-sekrit-456"},
        oauth_signing_key="sign-sekrit-789",
        max_body_bytes=2048,
    )
    await create_topics(settings)
    caplog.set_level(logging.DEBUG)
    running = await start_ingress(settings)
    answers: list[str] = []
    token = ""
    try:
        async with aiohttp.ClientSession() as http:
            for headers, body in [
                ({"X-API-KEY": "sekrit-key-123"}, b"{}"),
                ({"X-API-KEY": "sekrit-key-124"}, b"{}"),
                ({"Authorization": "Bearer sekrit-key-124"}, b"{}"),
                ({"X-API-KEY": "sekrit-key-123"}, b"not json"),
                ({"X-API-KEY": "sekrit-key-123"}, b"x" * 4096),
            ]:
                async with http.post(running.url + "/v1/lytics", data=body, headers=headers) as resp:
                    answers.append(await resp.text())
            async with http.post(running.url + "/v1/lytics", params={"api_key": "sekrit-key-124"}) as resp:
                answers.append(await resp.text())
            for secret in ("client-sekrit-456", "wrong"):
                form = {"grant_type": "client_credentials", "client_id": "lytics", "client_secret": secret}
                async with http.post(running.url + "/oauth/token", data=form) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        token = (await resp.json())["access_token"]
                    else:
                        answers.append(text)
            async with http.post(
                running.url + "/v1/lytics", data=b"{}", headers={"Authorization": f"Bearer {token}x"}
            ) as resp:
                answers.append(await resp.text())
    finally:
        await running.runner.cleanup()
    assert token
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any("unauthenticated request" in line for line in lines)  # the refusals were logged...
    for secret in [*SECRETS, token]:
        for line in lines:
            assert secret not in line, f"secret in log line: {line}"  # ...without any secret
        for answer in answers:
            assert secret not in answer


# --- the whole pipeline ----------------------------------------------------------------------------

API_KEY = "zK3apikeyQm8vT2wX9pL4nR6"
FILE_KEY = "zK3filekeyWc1eE5uY7oI3aS"
CRM_KEY = "zK3crmkeyHn5rB7yD1sF6gJ2"
CLIENT_SECRET = "zK3oauthJc4gW8eR2tY5uI9o"
CRM_CLIENT_SECRET = "zK3crmoauthPq2wE4rT6yU8i"
SIGNING_KEY = "zK3signingVb6nM1qA3zS7xD"
PUSHLY_KEY = "zK3pushlyLp9oK2iU4jH8gF1"
ODP_TOKEN = "zK3odpXd5fG7hJ9kL2zX4cV6"
KAFKA_KEY_PASSWORD = "zK3tlskeyRt8yU1iO3pA5sDf"
PIPELINE_SECRETS = [
    API_KEY, FILE_KEY, CRM_KEY, CLIENT_SECRET, CRM_CLIENT_SECRET, SIGNING_KEY, PUSHLY_KEY, ODP_TOKEN
]  # fmt: skip


def encoded_forms(secret: str) -> set[bytes]:
    """The secret as bytes, and what any base64 (standard or URL-safe) text containing it must hold.

    A secret inside a larger encoded blob (e.g. ``Basic base64(id:secret)``) is encoded at one of
    three byte alignments; the characters away from its edges are the same whatever surrounds it.
    """
    raw = secret.encode()
    forms = {raw}
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + raw).rstrip(b"=")
            forms.add(text[4 if shift else 0 : -4])
    return forms


async def prefix_records(settings: Settings) -> dict[str, list[Any]]:
    """Every record of every topic whose name starts with the test's prefix (internal ones too)."""
    admin = kafka.admin(settings)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
    finally:
        await admin.close()
    return {name: await read_topic(settings, name) for name in names}


def record_bytes(record: Any) -> bytes:
    parts = [record.key or b"", record.value or b""]
    for name, value in record.headers or ():
        parts += [name.encode(), value or b""]
    return b"\n".join(parts)


@pytest.mark.timeout(300)
async def test_no_secret_anywhere_in_the_pipeline(secured_kafka: SecuredBroker, tmp_path: Path) -> None:
    # Destinations that echo the credential they were sent, in plain and in base64, in error bodies.
    echo = f"key {PUSHLY_KEY} refused"
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    pushly.script = [
        Answer(500, body=f'{{"error": "{echo}"}}'),
        Answer(429, {"Retry-After": "1"}, body=f'{{"error": "{echo}"}}'),
        Answer(200),
    ]
    pushly.default = Answer(400, body=f'{{"error": "{echo}"}}')
    odp_b64 = base64.b64encode(f"Bearer {ODP_TOKEN}".encode()).decode()
    odp.default = Answer(400, body=f'{{"error": "bad token {ODP_TOKEN}", "seen": "{odp_b64}"}}')
    keys_file = tmp_path / "keys.json"
    keys_file.write_bytes(orjson.dumps({"api_keys": [FILE_KEY], "oauth_signing_keys": [SIGNING_KEY]}))
    port = free_port()
    # Every component logs in with the SASL password and presents a client certificate whose key
    # only KAFKA_SSL_KEY_PASSWORD opens: both are secrets to look for.
    client = make_client_pem(secured_kafka.broker.ca, tmp_path / "client-tls", "relay", KAFKA_KEY_PASSWORD)
    settings = secured_kafka.relay_settings(
        kafka_ssl_cert_file=client.cert,
        kafka_ssl_key_file=client.key,
        kafka_ssl_key_password=KAFKA_KEY_PASSWORD,
        ingress_api_keys=[API_KEY],
        oauth_clients={"lytics": CLIENT_SECRET},
        sources={"crm": {"api_keys": [CRM_KEY], "oauth_clients": {"crm-job": CRM_CLIENT_SECRET}}},
        ingress_keys_file=keys_file,
        ingress_host="127.0.0.1",
        ingress_port=port,
        ingress_metrics_port=free_port(),
        pushly_webhook_url=pushly.url,
        pushly_api_key=PUSHLY_KEY,
        odp_webhook_url=odp.url,
        odp_auth_token=f"Bearer {ODP_TOKEN}",
        # The bodies carry no Lytics ID (_id), ODP's default identifier: send it the match field, so
        # ODP is asked and its refusal (echoing the token) is read and scrubbed.
        odp_identifier_source="email",
        odp_flush_seconds=0.3,
        sink_max_backoff_seconds=0.5,
        table_store="memory",
        log_level="DEBUG",
    )
    kafka_secrets = [secured_kafka.password, KAFKA_KEY_PASSWORD]
    created = await relay_cli(settings, "topics", "create")
    assert created.returncode == 0, created.stderr
    checked = await relay_cli(settings, "check")  # prints every effective setting, secrets masked
    assert checked.returncode == 0, checked.stdout + checked.stderr
    outputs = [(r.stdout + r.stderr).encode() for r in (created, checked)]  # what the commands printed
    topics = TopicNames.from_settings(settings)
    url = f"http://127.0.0.1:{port}"
    procs = [Component(settings, ["ingress"], tmp_path / "ingress.log")]
    procs.append(start_worker(settings, tmp_path))
    sink_ports = {name: free_port() for name in ("pushly", "odp", "analytics")}
    procs += [
        Component(settings, ["sink", n], tmp_path / f"sink-{n}.log", RELAY_SINK_WEB_PORT=str(p))
        for n, p in sink_ports.items()
    ]
    answers: list[bytes] = []  # every answer body but the token grants
    presented: list[str] = []  # the wrong credentials clients tried (they reveal the real ones)
    tokens: list[str] = []

    def user(n: int) -> bytes:
        return orjson.dumps(
            {
                "data": {
                    "email": f"scan{n}@example.com",
                    "segment_events": [
                        {
                            "id": "aud-scan",
                            "event": "enter",
                            "slug": "scan",
                            "enter": f"2026-01-0{n}T00:00:00Z",
                        }
                    ],
                },
                "meta": {"name": "scan"},
            }
        )

    try:
        async with aiohttp.ClientSession() as http:

            async def call(path: str, body: bytes, headers: dict[str, str] | None = None, **kw: Any) -> int:
                async with http.post(url + path, data=body, headers=headers or {}, **kw) as resp:
                    text = await resp.read()
                    if not (path == "/oauth/token" and resp.status == 200):
                        answers.append(text)
                    return resp.status

            async def grant(form: dict[str, str], headers: dict[str, str] | None = None) -> str | None:
                async with http.post(url + "/oauth/token", data=form, headers=headers or {}) as resp:
                    if resp.status != 200:
                        answers.append(await resp.read())
                        return None
                    return str((await resp.json())["access_token"])

            async def ready() -> bool:
                for p in procs:
                    assert p.alive(), p.log.read_text()[-3000:]
                try:
                    async with http.get(f"http://127.0.0.1:{settings.ingress_metrics_port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await until_async(ready, 60, "the ingress to be ready", interval=0.2)
            await wait_group(settings, 1)
            token = await grant(
                {"grant_type": "client_credentials", "client_id": "lytics", "client_secret": CLIENT_SECRET}
            )
            basic = base64.b64encode(f"crm-job:{CRM_CLIENT_SECRET}".encode()).decode()
            crm_token = await grant({"grant_type": "client_credentials"}, {"Authorization": f"Basic {basic}"})
            assert token and crm_token
            tokens += [token, crm_token]
            # Traffic that succeeds, with every kind of credential.
            good = [
                ("/v1/lytics", {"X-API-KEY": API_KEY}, {}),
                ("/v1/lytics", {"Authorization": f"Bearer {API_KEY}"}, {}),
                ("/v1/lytics", {}, {"api_key": API_KEY}),
                ("/v1/lytics/crm", {"X-API-KEY": CRM_KEY}, {}),
                ("/v1/lytics", {"Authorization": f"Bearer {token}"}, {}),
                ("/v1/lytics", {"X-API-KEY": FILE_KEY}, {}),
                ("/v1/lytics/crm", {"Authorization": f"Bearer {crm_token}"}, {}),
            ]
            for n, (path, headers, query) in enumerate(good, start=1):
                assert await call(path, user(n), headers, params=query) == 200, (path, answers[-1])
            # Wrong credentials that hold most of a real one.
            near = [API_KEY[:-1] + "x", API_KEY + "x", "x" + API_KEY[1:], API_KEY[:14], FILE_KEY[:-2]]
            presented += near
            for wrong in near:
                assert await call("/v1/lytics", user(1), {"X-API-KEY": wrong}) == 401
                assert await call("/v1/lytics", user(1), {"Authorization": f"Bearer {wrong}"}) == 401
                assert await call("/v1/lytics", user(1), {"Authorization": wrong}) == 401
                assert await call("/v1/lytics", user(1), params={"api_key": wrong}) == 401
            assert await call("/v1/lytics", user(1), {"X-API-KEY": CRM_KEY}) == 401  # another source's key
            tampered = [token[:-2] + "xx", crm_token[:-1]]
            presented += tampered
            for bad in tampered:
                assert await call("/v1/lytics", user(1), {"Authorization": f"Bearer {bad}"}) == 401
            wrong_secret = CLIENT_SECRET[:-1] + "y"
            presented.append(wrong_secret)
            assert (
                await grant(
                    {"grant_type": "client_credentials", "client_id": "lytics", "client_secret": wrong_secret}
                )
                is None
            )
            wrong_basic = base64.b64encode(f"lytics:{CLIENT_SECRET}z".encode()).decode()
            presented.append(CLIENT_SECRET + "z")
            assert (
                await grant({"grant_type": "client_credentials"}, {"Authorization": f"Basic {wrong_basic}"})
                is None
            )
            # Bad bodies (ingress dead letters) and a record the worker cannot use (its dead letters).
            assert await call("/v1/lytics", b"not json at all", {"X-API-KEY": API_KEY}) == 400
            assert await call("/v1/lytics", b"[]", {"X-API-KEY": API_KEY}) == 400
            no_id = orjson.dumps({"data": {"segment_events": [{"id": "aud-scan", "event": "enter"}]}})
            assert await call("/v1/lytics", no_id, {"X-API-KEY": API_KEY}) == 200

            seen: dict[str, object] = {}

            async def settled() -> bool:
                dead = [dict(r.headers) for r in await read_topic(settings, topics.dead_letter)]
                by_sink = {s: sum(1 for h in dead if h.get("sink") == s.encode()) for s in ("pushly", "odp")}
                analytics = len(await read_topic(settings, topics.analytics))
                seen.update(
                    pushly_dead=by_sink["pushly"],
                    pushly_delivered=len(pushly.delivered()),
                    odp_dead=by_sink["odp"],
                    analytics=analytics,
                    dead_reasons=sorted((h.get("stage"), h.get("reason-code")) for h in dead),
                )
                return (
                    by_sink["pushly"] + len(pushly.delivered()) == len(good)
                    and by_sink["odp"] == len(good)
                    and analytics == len(good)
                    and sum(1 for h in dead if h.get("stage") == b"ingress") == 2
                    and sum(1 for h in dead if h.get("reason-code") == b"missing_identifier") == 1
                )

            await until_async(settled, 120, "deliveries and dead letters to settle", last_seen=seen)
            for name, p in sink_ports.items():
                async with http.get(f"http://127.0.0.1:{p}/metrics") as resp:
                    answers.append(await resp.read())
                    assert resp.status == 200, name
            async with http.get(f"http://127.0.0.1:{settings.ingress_metrics_port}/metrics") as resp:
                answers.append(await resp.read())
    finally:
        for p in procs:
            p.stop()  # SIGTERM: shutdown lines are part of what is scanned
        await pushly.stop()
        await odp.stop()
    assert {r.status for r in pushly.requests} >= {500, 429, 200, 400}
    assert {r.status for r in odp.requests} == {400}

    forms = {
        form: secret
        for secret in [*PIPELINE_SECRETS, *kafka_secrets, *presented, *tokens]
        for form in encoded_forms(secret)
    }
    leaks: list[str] = []
    logs = {p.log.name: p.log.read_bytes() for p in procs}
    for name, text in logs.items():
        for n, line in enumerate(text.splitlines()):
            leaks += [f"{name}:{n + 1}: {forms[f]!r}" for f in forms if f in line]
    for n, text in enumerate(outputs):
        leaks += [f"command output {n}: {forms[f]!r}" for f in forms if f in text]
    records = await prefix_records(settings)
    assert {topics.raw, topics.dead_letter, topics.membership_changes, topics.analytics} <= set(records)
    for topic, recs in records.items():
        for r in recs:
            data = record_bytes(r)
            leaks += [f"{topic}@{r.partition}:{r.offset}: {forms[f]!r}" for f in forms if f in data]
    for n, body in enumerate(answers):
        leaks += [f"answer {n}: {forms[f]!r}" for f in forms if f in body]
    assert not leaks, "\n".join(leaks[:20])
    # The scan looked at something: refusals and dead letters were logged, records were read.
    assert b"unauthenticated request" in logs["ingress.log"]
    assert b"batch given up" in logs["sink-pushly.log"] and b"batch given up" in logs["sink-odp.log"]
    print(
        f"secret scan: {sum(len(t.splitlines()) for t in logs.values())} log lines, "
        f"{sum(len(v) for v in records.values())} records in {len(records)} topics, {len(answers)} answers, "
        f"{len(outputs)} command outputs, "
        f"{len(forms)} secret forms: no leak"
    )
