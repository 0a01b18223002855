"""Fixtures: a real Kafka broker for the session, per-test topic prefixes, and a running ingress.

The broker is, in order of preference: ``KAFKA_BOOTSTRAP_SERVERS`` when set, testcontainers' Kafka
when a Docker engine answers, else the project's own single-node KRaft broker started from the
Maven-resolved jars (and stopped at the end of the session).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import LocalKafka, free_port
from ingress.app import PUBLISHER, build_app

if TYPE_CHECKING:
    from tests.secured import SecuredBroker

PROJECT = Path(__file__).resolve().parents[1]
SAMPLES = PROJECT / "fixtures" / "samples"
LOCAL_DIR = Path(os.environ.get("RELAY_LOCAL_DIR", PROJECT / ".local"))


def _docker_engine_answers() -> bool:
    try:
        import docker  # testcontainers' dependency

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real broker for the whole session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = LocalKafka(LOCAL_DIR, port=free_port(), home_dir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def local_kafka(tmp_path: Path) -> Iterator[LocalKafka]:
    """A throw-away broker of the test's own, for tests that stop and restart it."""
    broker = LocalKafka(LOCAL_DIR, port=free_port(), home_dir=tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(kill=True)


@pytest.fixture(scope="session")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    """A secured local broker (SASL_SSL, SCRAM, self-signed CA) for the session, started with
    `audience-relay kafka start --secure` the first time a test asks for it (``tests/secured.py``)."""
    from tests.secured import secured_broker  # it imports this module

    with secured_broker(tmp_path_factory.mktemp("secured-local")) as broker:
        yield broker


def make_settings(bootstrap: str, **overrides: object) -> Settings:
    """Settings for one test: its own topic prefix so tests never see each other's records."""
    values: dict[str, object] = {
        "kafka_bootstrap_servers": bootstrap,
        "topic_prefix": f"t{uuid.uuid4().hex[:10]}",
        "partitions": 3,
        "ingress_api_keys": ["key-current", "key-previous"],
        "produce_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture
async def settings(kafka_bootstrap: str) -> Settings:
    s = make_settings(kafka_bootstrap)
    await create_topics(s)
    return s


@pytest.fixture
def topics(settings: Settings) -> TopicNames:
    return TopicNames.from_settings(settings)


class RunningIngress:
    """An ingress served on a free loopback port."""

    def __init__(self, app: web.Application, runner: web.AppRunner, port: int) -> None:
        self.app = app
        self.runner = runner
        self.url = f"http://127.0.0.1:{port}"


async def start_ingress(settings: Settings, *, wait_connected: bool = True) -> RunningIngress:
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    if wait_connected:
        assert await app[PUBLISHER].wait_connected(timeout=60), "ingress never connected to Kafka"
    return RunningIngress(app, runner, port)


@pytest.fixture
async def ingress(settings: Settings) -> AsyncIterator[RunningIngress]:
    running = await start_ingress(settings)
    try:
        yield running
    finally:
        await running.runner.cleanup()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (make test does; a plain pytest skips them)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
