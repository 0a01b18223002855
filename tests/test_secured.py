"""The local broker's secured mode (`audience-relay kafka start --secure`), against the real broker.

One secured broker serves the whole module: started through the CLI exactly as a user would, its
printed settings evaluated by a real shell. The broker itself is checked with plain aiokafka clients
(the relay's own components come on top of it).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context

from devtools.localkafka import LocalKafka, free_port, lib_dir
from devtools.localtls import make_ca, make_client_pem
from tests.conftest import LOCAL_DIR

SETTING_NAMES = [
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CA_FILE",
]


@dataclass(frozen=True)
class SecuredBroker:
    """A running secured local broker and the settings its `kafka start --secure` printed."""

    broker: LocalKafka
    env: dict[str, str]  # the cli's environment (RELAY_LOCAL_DIR, RELAY_LOCAL_KAFKA_PORT)
    printed: str  # what `kafka start --secure` wrote on stdout
    settings: dict[str, str]  # the KAFKA_* values after a shell evaluated `printed`

    @property
    def bootstrap(self) -> str:
        return self.settings["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def password(self) -> str:
        return self.settings["KAFKA_SASL_PASSWORD"]

    @property
    def ca_file(self) -> str:
        return self.settings["KAFKA_SSL_CA_FILE"]


def cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``audience-relay <args>`` with ``env`` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def shell_eval(printed: str) -> dict[str, str]:
    """Run ``printed`` in bash (as ``eval "$(audience-relay kafka start --secure)"`` would) and read back
    the variables it set."""
    script = 'eval "$1"; for name in "${@:2}"; do printf "%s\\0" "${!name}"; done'
    out = subprocess.run(
        ["bash", "-c", script, "_", printed, *SETTING_NAMES],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(zip(SETTING_NAMES, out.split("\0")[:-1], strict=True))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    """A secured broker of this module's own, started with `audience-relay kafka start --secure`."""
    local = tmp_path_factory.mktemp("secured-local")
    # The jars are shared with every other test broker; this broker's home is its own.
    (local / "kafka").mkdir()
    (local / "kafka" / "lib").symlink_to(lib_dir(LOCAL_DIR).resolve())
    port = free_port()
    env = {"RELAY_LOCAL_DIR": str(local), "RELAY_LOCAL_KAFKA_PORT": str(port)}
    broker = LocalKafka(local, port=port, secure=True)
    started = cli(env, "kafka", "start", "--secure")
    try:
        assert started.returncode == 0, started.stderr
        yield SecuredBroker(broker, env, started.stdout, shell_eval(started.stdout))
    finally:
        cli(env, "kafka", "stop")
        broker.stop(kill=True)  # in case the cli could not


def client_args(secured: SecuredBroker, **overrides: object) -> dict[str, object]:
    """aiokafka arguments for the secured listener, as a user would write them from the printed settings."""
    args: dict[str, object] = {
        "bootstrap_servers": secured.bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": secured.settings["KAFKA_SASL_USERNAME"],
        "sasl_plain_password": secured.password,
        "ssl_context": create_ssl_context(cafile=secured.ca_file),
        "request_timeout_ms": 10_000,
    }
    args.update(overrides)
    return args


async def round_trip(args: dict[str, object], *, transactional: bool = False) -> tuple[bytes, list[bytes]]:
    """Produce one record to a new topic and read the topic back with the same connection settings:
    (the value sent, the values read)."""
    topic = f"secured-{uuid.uuid4().hex[:8]}"
    value = uuid.uuid4().bytes
    extra: dict[str, object] = {"transactional_id": f"tx-{topic}"} if transactional else {}
    producer = AIOKafkaProducer(**args, **extra)  # type: ignore[arg-type]
    await producer.start()
    try:
        if transactional:
            async with producer.transaction():
                await producer.send_and_wait(topic, value)
        else:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **args,  # type: ignore[arg-type]
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=20_000)
    finally:
        await consumer.stop()
    return value, [r.value for records in batch.values() for r in records if r.value is not None]


async def refused(args: dict[str, object], caplog: pytest.LogCaptureFixture) -> tuple[float, str]:
    """Start a producer that must be refused: (seconds until refused, what aiokafka logged)."""
    producer = AIOKafkaProducer(**args)  # type: ignore[arg-type]
    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        await producer.start()
    elapsed = time.monotonic() - began
    await producer.stop()
    return elapsed, caplog.text


# --- the secured broker itself ------------------------------------------------------------------


def test_start_secure_prints_settings_without_the_password(secured: SecuredBroker) -> None:
    password_file = secured.broker.client_password_file
    assert secured.settings == {
        "KAFKA_BOOTSTRAP_SERVERS": secured.broker.bootstrap,
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "relay",
        "KAFKA_SASL_PASSWORD": password_file.read_text(),
        "KAFKA_SSL_CA_FILE": str(secured.broker.ca.cert.resolve()),
    }
    assert len(secured.password) >= 24
    assert secured.password not in secured.printed
    assert f"$(cat {password_file.resolve()})" in secured.printed
    # Every secret the broker holds is readable by its owner only, and none is in its log.
    tls = secured.broker.tls_dir
    assert tls.stat().st_mode & 0o777 == 0o700
    for path in [*tls.glob("*.password"), *tls.glob("*.p12"), secured.broker.home / "server.properties"]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    log = secured.broker.log_file.read_text()
    for password_path in tls.glob("*.password"):
        assert password_path.read_text() not in log, password_path.name


def test_status_names_the_protocol_and_modes_do_not_mix(secured: SecuredBroker) -> None:
    status = cli(secured.env, "kafka", "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == f"kafka running at {secured.bootstrap} (SASL_SSL)"
    again = cli(secured.env, "kafka", "start", "--secure")  # already running: prints the settings again
    assert again.returncode == 0 and shell_eval(again.stdout) == secured.settings
    plain = cli(secured.env, "kafka", "start")
    assert plain.returncode == 1
    assert "formatted SASL_SSL: start it with --secure" in plain.stderr
    misplaced = cli(secured.env, "kafka", "status", "--secure")
    assert misplaced.returncode == 2 and "--secure applies to `kafka start` only" in misplaced.stderr


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
async def test_produce_and_consume_over_sasl_ssl(secured: SecuredBroker, mechanism: str) -> None:
    sent, received = await round_trip(client_args(secured, sasl_mechanism=mechanism))
    assert received == [sent]


async def test_transactions_commit_over_the_internal_listener(secured: SecuredBroker) -> None:
    # Committing a transaction makes the broker write its markers to the partition leader (itself)
    # over the inter-broker listener, INTERNAL: a read_committed consumer sees the record only then.
    sent, received = await round_trip(client_args(secured), transactional=True)
    assert received == [sent]


async def test_wrong_password_is_refused(secured: SecuredBroker, caplog: pytest.LogCaptureFixture) -> None:
    elapsed, logged = await refused(client_args(secured, sasl_plain_password="not-the-password"), caplog)
    assert "SaslAuthenticationFailed" in logged and "invalid credentials" in logged
    assert elapsed < 30


async def test_unknown_user_is_refused(secured: SecuredBroker, caplog: pytest.LogCaptureFixture) -> None:
    args = client_args(secured, sasl_plain_username="broker-not", sasl_plain_password=secured.password)
    _, logged = await refused(args, caplog)
    assert "SaslAuthenticationFailed" in logged


async def test_untrusted_ca_is_refused(
    secured: SecuredBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_ca(tmp_path / "other-ca", name="some other CA")
    elapsed, logged = await refused(
        client_args(secured, ssl_context=create_ssl_context(cafile=str(other.cert))), caplog
    )
    assert "CERTIFICATE_VERIFY_FAILED" in logged
    assert elapsed < 30


async def test_client_certificate_from_the_ca_is_accepted_and_from_another_refused(
    secured: SecuredBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_password = "client-key-pass-Zq7"
    ours = make_client_pem(secured.broker.ca, tmp_path / "ours", "relay-client", key_password)
    assert ours.key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    context = create_ssl_context(
        cafile=secured.ca_file, certfile=str(ours.cert), keyfile=str(ours.key), password=key_password
    )
    sent, received = await round_trip(client_args(secured, ssl_context=context))
    assert received == [sent]
    other_ca = make_ca(tmp_path / "other-ca", name="some other CA")
    theirs = make_client_pem(other_ca, tmp_path / "theirs", "relay-client", key_password)
    context = create_ssl_context(
        cafile=secured.ca_file, certfile=str(theirs.cert), keyfile=str(theirs.key), password=key_password
    )
    logged_before = secured.broker.log_file.stat().st_size
    elapsed, _ = await refused(client_args(secured, ssl_context=context), caplog)
    assert elapsed < 30
    with secured.broker.log_file.open() as log:  # the broker is the one that refused
        log.seek(logged_before)
        assert "SSL handshake failed" in log.read()


@pytest.mark.parametrize(
    "protocol",
    [
        "PLAINTEXT",  # no TLS, no SASL
        "SASL_PLAINTEXT",  # the right password, but in the clear
        "SSL",  # TLS with the trusted CA, but no login
    ],
)
async def test_clients_without_sasl_ssl_are_refused(
    secured: SecuredBroker, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    args = client_args(secured, security_protocol=protocol)
    if protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        args.pop("ssl_context")
    if protocol in ("PLAINTEXT", "SSL"):
        for name in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
            args.pop(name)
    elapsed, _ = await refused(args, caplog)
    assert elapsed < 30


def test_keytool_errors_name_the_tool_and_no_password(tmp_path: Path) -> None:
    if shutil.which("keytool") is None:
        pytest.skip("keytool is not installed")
    ca = make_ca(tmp_path / "ca")
    # A request that is not a request: keytool refuses it and the error says which step failed.
    bogus = tmp_path / "bogus.csr"
    bogus.write_text("not a certificate request")
    with pytest.raises(RuntimeError, match="keytool -gencert failed") as failure:
        ca.sign(bogus, tmp_path / "out.pem", hosts=["localhost"])
    assert ca.password_file.read_text() not in str(failure.value)
