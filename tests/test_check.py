"""``audience-relay check`` against the real broker: a good configuration passes, a broken one lists
every problem; ``topics create`` applies RELAY_MIN_INSYNC_REPLICAS."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from audience_relay import kafka
from audience_relay.exits import ExitCode
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import free_port
from devtools.wait import until_async
from tests.conftest import NO_BROKER, PROJECT, make_settings
from tests.tls import Pem, make_ca, make_cert

PUSHLY_KEY = "pushly-Secret-key-0123"
ODP_TOKEN = "Bearer odp-Secret-token-0123"


@dataclass
class HttpsDestination:
    """An HTTPS server that counts the requests it gets (a check must send none)."""

    url: str
    requests: list[str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    folder = tmp_path_factory.mktemp("check-pki")
    ca = make_ca(folder)
    return {"ca": ca, "server": make_cert(folder, ca, "destination")}


@pytest.fixture
async def https_destination(pki: dict[str, Pem]) -> AsyncIterator[HttpsDestination]:
    requests: list[str] = []

    async def record(request: web.Request) -> web.Response:
        requests.append(request.path)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server"].cert, pki["server"].key)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        yield HttpsDestination(f"https://127.0.0.1:{port}/hook", requests)
    finally:
        await runner.cleanup()


async def run_check(settings: Settings, **env: str) -> tuple[int, str]:
    """``audience-relay check`` as a subprocess (without blocking the fake servers on this loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "audience_relay.cli",
        "check",
        env={"PATH": os.environ["PATH"], **settings.to_env(), **env},
        cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def configured(kafka_bootstrap: str, destination: HttpsDestination, **values: object) -> Settings:
    destinations: dict[str, object] = {
        "pushly_webhook_url": destination.url,
        "pushly_api_key": PUSHLY_KEY,
        "odp_webhook_url": destination.url.replace("/hook", "/odp"),
        "odp_auth_token": ODP_TOKEN,
    }
    return make_settings(kafka_bootstrap, **{**destinations, **values})


async def test_a_good_configuration_passes(
    kafka_bootstrap: str, https_destination: HttpsDestination, pki: dict[str, Pem]
) -> None:
    settings = configured(kafka_bootstrap, https_destination)
    await create_topics(settings)
    # The destination's certificate is trusted the way an operator's CA bundle would be.
    code, out = await run_check(settings, SSL_CERT_FILE=str(pki["ca"].cert))
    assert code == ExitCode.OK, out
    assert out.rstrip().endswith("all good (0 warning(s))"), out
    names = TopicNames.from_settings(settings)
    for topic in (names.raw, names.membership, names.field_changes, names.analytics):
        assert f"ok       topic {topic}: 3 partitions" in out, out
    assert "connected: 1 broker(s)" in out
    assert out.count("TLS handshake ok") == 2, out
    # The settings are shown, secrets masked; nothing was delivered.
    assert "PUSHLY_API_KEY=***" in out and "ODP_AUTH_TOKEN=***" in out and "RELAY_INGRESS_API_KEYS=***" in out
    assert "RELAY_PARTITIONS=3" in out and f"KAFKA_BOOTSTRAP_SERVERS={kafka_bootstrap}" in out
    for secret in (PUSHLY_KEY, ODP_TOKEN, "key-current"):
        assert secret not in out
    assert https_destination.requests == []


async def test_a_broken_configuration_lists_every_problem(
    kafka_bootstrap: str, https_destination: HttpsDestination
) -> None:
    created = make_settings(kafka_bootstrap, partitions=3)
    await create_topics(created)
    names = TopicNames.from_settings(created)
    admin = kafka.admin(created)
    await admin.start()
    try:
        await admin.delete_topics([names.analytics])

        async def deleted() -> bool:
            return names.analytics not in await admin.list_topics()

        await until_async(deleted, 30, what="the topic's deletion", interval=0.2)
    finally:
        await admin.close()
    broken = configured(
        kafka_bootstrap,
        https_destination,
        topic_prefix=created.topic_prefix,
        partitions=4,  # the topics have 3
        replication_factor=2,  # one broker
        min_insync_replicas=2,
        pushly_webhook_url="https://pushly.example.invalid/hook",
    )
    code, out = await run_check(broken)  # the destination's CA is not trusted here
    assert code == ExitCode.CHECK_FAILED, out
    summary = out[out.index("problem(s)") :]
    expected = [
        "RELAY_REPLICATION_FACTOR=2 but the cluster has 1 broker(s)",
        f"topic {names.analytics} does not exist: run `audience-relay topics create`",
        f"topic {names.raw} has 3 partitions, RELAY_PARTITIONS=4",
        f"topic {names.membership} has 3 partitions, RELAY_PARTITIONS=4",
        "PUSHLY_WEBHOOK_URL: the host pushly.example.invalid does not resolve",
        "ODP_WEBHOOK_URL: the TLS certificate of 127.0.0.1 is not valid",
    ]
    for problem in expected:
        assert f"  - {problem}" in summary, (problem, out)
    assert out.count("  - ") == len(expected) + 5  # and the other five topics' partition counts
    assert f"WARNING  topic {names.raw} has 1 replica(s), below RELAY_REPLICATION_FACTOR=2" in out
    assert f"WARNING  topic {names.raw} has min.insync.replicas=1, below RELAY_MIN_INSYNC_REPLICAS=2" in out
    assert PUSHLY_KEY not in out and ODP_TOKEN not in out
    assert https_destination.requests == []


async def test_topics_create_applies_min_insync_replicas_and_check_sees_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # One broker cannot hold two replicas, and the settings refuse a min ISR above the replication
    # factor; bypass that check to see the config land on every topic and `check` report it.
    strict = make_settings(kafka_bootstrap).model_copy(update={"min_insync_replicas": 2})
    results = await create_topics(strict)
    admin = kafka.admin(strict)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, r.name) for r in results]
        )
    finally:
        await admin.close()
    found = {
        resource["resource_name"]: {e["config_names"]: e["config_value"] for e in resource["config_entries"]}
        for response in responses
        for resource in response.to_object()["resources"]
    }
    assert {name: c["min.insync.replicas"] for name, c in found.items()} == {r.name: "2" for r in results}
    plain = strict.model_copy(update={"min_insync_replicas": 1})
    code, out = await run_check(plain)
    assert code == ExitCode.CHECK_FAILED
    assert out.count("has min.insync.replicas=2 above its 1 replica(s)") == 2 * len(results), out


def test_the_analytics_topic_may_keep_another_partition_count() -> None:
    """``partitions apply`` leaves the analytics output as its readers have it: check must agree."""
    import io

    from audience_relay.check import Report, _check_topic
    from audience_relay.topics import topic_specs

    settings = make_settings(NO_BROKER, partitions=12)
    names = TopicNames.from_settings(settings)
    specs = {s.name: s for s in topic_specs(settings)}
    described = {"partitions": [{"replicas": [1], "isr": [1]} for _ in range(4)]}
    for name, problems in ((names.analytics, 0), (names.membership_changes, 1)):
        report = Report(io.StringIO())
        config = {"cleanup.policy": specs[name].config["cleanup.policy"]}
        _check_topic(settings, specs[name], described, config, report)
        assert len(report.problems) == problems, (name, report.problems)
