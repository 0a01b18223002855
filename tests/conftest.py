"""Fixtures: a real Kafka broker for the session, per-test topic prefixes, and a running ingress.

The broker is, in order of preference: ``KAFKA_BOOTSTRAP_SERVERS`` when set, testcontainers' Kafka
when a Docker engine answers, else the project's own single-node KRaft broker started from the
Maven-resolved jars (and stopped at the end of the session).

Two tiers: every test whose fixtures reach a broker (``kafka_bootstrap``, ``local_kafka``,
``secured_kafka``, or any fixture built on them, such as ``kafka_settings`` and ``ingress``) is marked
``kafka`` at collection, so ``pytest -m "not kafka"`` (``make unit``) runs the rest without starting
one. Only the broker fixtures do I/O; ``settings`` is a plain value pointing at no broker. A test
outside the ``kafka`` tier that reaches a broker fixture anyway (``request.getfixturevalue``) fails
instead of starting one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
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

#: The fixtures that give a test a broker; a test whose fixture closure holds one is marked ``kafka``.
BROKER_FIXTURES = frozenset({"kafka_bootstrap", "local_kafka", "secured_kafka"})
#: A bootstrap address where no broker listens, for tests that need settings but never a broker: a
#: client pointed here fails at once (connection refused) instead of waiting for one.
NO_BROKER = "127.0.0.1:1"
#: The test being set up or run: the broker fixtures refuse to serve one outside the kafka tier.
CURRENT_TEST = pytest.StashKey[pytest.Item]()


def needs_broker(fixturenames: Iterable[str]) -> bool:
    """Whether a test with these fixtures (its whole closure) gets a broker."""
    return not BROKER_FIXTURES.isdisjoint(fixturenames)


def _refuse_outside_kafka_tier(request: pytest.FixtureRequest) -> None:
    """Fail the test being set up or run unless it is in the kafka tier.

    For the session broker pytest caches this failure: in a mixed run, every later test that needs the
    broker fails with the same message, which names the test to fix.
    """
    item = request.config.stash.get(CURRENT_TEST, None)
    if item is not None and item.get_closest_marker("kafka") is None:
        pytest.fail(
            f"{item.nodeid} is not in the kafka tier but asked for the broker ({request.fixturename}): "
            "request it as a fixture argument (the kafka marker is then set automatically) or mark the "
            "test kafka",
            pytrace=False,
        )


def _docker_engine_answers() -> bool:
    try:
        import docker  # testcontainers' dependency

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Bootstrap servers of a real broker for the whole session."""
    _refuse_outside_kafka_tier(request)
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
def local_kafka(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalKafka]:
    """A throw-away broker of the test's own, for tests that stop and restart it."""
    _refuse_outside_kafka_tier(request)
    broker = LocalKafka(LOCAL_DIR, port=free_port(), home_dir=tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(kill=True)


@pytest.fixture(scope="session")
def secured_kafka(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecuredBroker]:
    """A secured local broker (SASL_SSL, SCRAM, self-signed CA) for the session, started with
    `audience-relay kafka start --secure` the first time a test asks for it (``tests/secured.py``).
    Always local, also when ``KAFKA_BOOTSTRAP_SERVERS`` is set."""
    _refuse_outside_kafka_tier(request)
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
def settings() -> Settings:
    """Test settings pointing at no broker: for tests that build apps, routes or names, not connect."""
    return make_settings(NO_BROKER)


@pytest.fixture
async def kafka_settings(kafka_bootstrap: str) -> Settings:
    """Test settings on the session broker, with every topic created under the test's own prefix."""
    s = make_settings(kafka_bootstrap)
    await create_topics(s)
    return s


@pytest.fixture
def topics(kafka_settings: Settings) -> TopicNames:
    """The names of ``kafka_settings``' topics (created on the broker)."""
    return TopicNames.from_settings(kafka_settings)


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
async def ingress(kafka_settings: Settings) -> AsyncIterator[RunningIngress]:
    running = await start_ingress(kafka_settings)
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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the kafka marker must be on the items before `-m` deselects by it.
    for item in items:
        if needs_broker(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture of the test is set up, so a session fixture set up on its behalf sees it.
    item.config.stash[CURRENT_TEST] = item


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if CURRENT_TEST in item.config.stash:
        del item.config.stash[CURRENT_TEST]
