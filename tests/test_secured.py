"""The local broker's secured mode (`audience-relay kafka start --secure`), and the whole relay over it.

One secured broker (``secured_kafka``, tests/secured.py) serves the session: started through the CLI
exactly as a user would, its printed settings evaluated by a real shell. The broker itself is checked
with plain aiokafka clients; then every component runs against it as a real process.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context

from audience_relay.exits import ExitCode
from audience_relay.kafkautil import read_topic
from audience_relay.names import SINKS, TopicNames
from devtools.localkafka import free_port
from devtools.localtls import make_ca, make_client_pem
from devtools.processes import Component, wait_group
from devtools.wait import until, until_async
from tests.conftest import SAMPLES
from tests.fakes import Answer, FakeDestination
from tests.secured import SecuredBroker, clean_environ, cli, relay_cli, shell_eval
from tests.test_ingress_secrets import encoded_forms


@pytest.fixture
def secured(secured_kafka: SecuredBroker) -> SecuredBroker:
    """The session's secured broker (a shorter name for this module)."""
    return secured_kafka


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

    def broker_logged_the_refusal() -> bool:  # the broker is the one that refused; it logs after closing
        with secured.broker.log_file.open() as log:
            log.seek(logged_before)
            return "SSL handshake failed" in log.read()

    await until(broker_logged_the_refusal, 30, "the broker to log the failed handshake")


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


# --- the whole relay over SASL_SSL ----------------------------------------------------------------

AUDIENCE = "42976a269a5e6b9d06c681b1c27292df"  # the audience of fixtures/samples/default-format-enter.json
USER = "user@example.com"


def exit_body() -> bytes:
    """The sample user leaving the sample audience a day after entering it."""
    leave = orjson.loads((SAMPLES / "default-format-enter.json").read_bytes())
    leave["data"]["segment_events"] = [
        {"id": AUDIENCE, "event": "exit", "slug": "emailzz5", "exit": "2020-10-15T13:27:33.916374949-07:00"}
    ]
    return orjson.dumps(leave)


@pytest.mark.timeout(400)
async def test_whole_pipeline_over_sasl_ssl_scram_sha_512(secured: SecuredBroker, tmp_path: Path) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    # Pushly refuses at first: its change is dead-lettered, then replayed once it accepts.
    pushly.default = Answer(400, body='{"error": "not yet"}')
    worker_port = free_port()
    settings = secured.relay_settings(
        pushly_webhook_url=pushly.url,
        pushly_api_key="pushly-secret-key",
        odp_webhook_url=odp.url,
        odp_auth_token="Bearer odp-secret-token",
        # The samples carry no Lytics ID (_id), ODP's default identifier: send it the match field.
        odp_identifier_source="email",
        odp_flush_seconds=0.3,
        sink_max_backoff_seconds=0.5,
        ingress_host="127.0.0.1",
        ingress_port=free_port(),
        ingress_metrics_port=free_port(),
    )
    assert settings.kafka_security_protocol == "SASL_SSL" and settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    names = TopicNames.from_settings(settings)
    created = await relay_cli(settings, "topics", "create")
    assert created.returncode == 0, created.stderr
    assert names.raw in created.stdout and "created" in created.stdout
    checked = await relay_cli(settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "KAFKA_SASL_PASSWORD=" in checked.stdout  # listed, masked (the scan below)
    ingress_url = f"http://127.0.0.1:{settings.ingress_port}"
    worker_url = f"http://127.0.0.1:{worker_port}"
    procs = [
        Component(settings, ["ingress"], tmp_path / "ingress.log"),
        Component(
            settings,
            ["worker"],
            tmp_path / "worker.log",
            RELAY_WORKER_DATA_DIR=str(tmp_path / "worker-data"),
            RELAY_WORKER_WEB_HOST="127.0.0.1",
            RELAY_WORKER_WEB_PORT=str(worker_port),
        ),
        *(
            Component(settings, ["sink", n], tmp_path / f"sink-{n}.log", RELAY_SINK_WEB_PORT=str(free_port()))
            for n in SINKS
        ),
    ]
    outputs: list[str] = [created.stdout + created.stderr, checked.stdout + checked.stderr]
    try:
        async with aiohttp.ClientSession(headers={"X-API-KEY": "key-current"}) as http:

            async def ready() -> bool:
                for p in procs:
                    assert p.alive(), p.log.read_text()[-3000:]
                try:
                    async with http.get(f"http://127.0.0.1:{settings.ingress_metrics_port}/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await until_async(ready, 90, "the ingress to be ready", interval=0.2)
            await wait_group(settings, 1)

            async def post(body: bytes) -> None:
                async with http.post(f"{ingress_url}/v1/lytics", data=body) as resp:
                    assert resp.status == 200, await resp.text()

            async def member_audiences() -> list[str] | None:
                async with http.get(f"{worker_url}/v1/members/{USER}") as resp:
                    if resp.status != 200:
                        return None
                    return [a["audience_id"] for a in (await resp.json())["audiences"]]

            async def settled(pushly_dead: int, odp_records: int, analytics: int) -> bool:
                for p in procs:
                    assert p.alive(), p.log.read_text()[-3000:]
                dead = [dict(r.headers) for r in await read_topic(settings, names.dead_letter)]
                return (
                    sum(1 for h in dead if h.get("sink") == b"pushly") == pushly_dead
                    and sum(len(r.body) for r in odp.delivered()) == odp_records
                    and len(await read_topic(settings, names.analytics)) == analytics
                )

            # The user enters: ODP and analytics get it, Pushly refuses it into the dead letters.
            await post((SAMPLES / "default-format-enter.json").read_bytes())
            await until_async(lambda: settled(1, 1, 1), 120, "the enter at odp, analytics, dead letters")
            await until_async(
                lambda: _equals(member_audiences(), [AUDIENCE]), 60, "the worker to answer the membership"
            )
            # Pushly accepts again: the replay delivers what it refused.
            pushly.default = Answer(200)
            replay = await relay_cli(settings, "dead-letter", "replay", "--sink", "pushly", "--quiet")
            outputs.append(replay.stdout + replay.stderr)
            assert replay.returncode == 0, replay.stderr
            assert "replayed to pushly: 1 delivered, 0 still refused" in replay.stdout
            assert [r.body["data"]["segment_events"][0]["event"] for r in pushly.delivered()] == ["enter"]
            # The user exits: every destination gets it directly.
            await post(exit_body())
            await until_async(lambda: settled(1, 2, 2), 120, "the exit at odp and analytics")
            await until(lambda: len(pushly.delivered()) == 2, 60, "the exit at pushly")
            await until_async(lambda: _equals(member_audiences(), []), 60, "the membership to end")
    finally:
        for p in procs:
            p.stop()
        await pushly.stop()
        await odp.stop()
    assert [r.body["data"]["segment_events"][0]["event"] for r in pushly.delivered()] == ["enter", "exit"]
    events = [orjson.loads(r.value) for r in await read_topic(settings, names.analytics)]
    assert [e["type"] for e in events] == [
        "com.audience-relay.membership.entered",
        "com.audience-relay.membership.exited",
    ]
    # With every component stopped, the partition tool plans a move over the same connection.
    plan = await relay_cli(settings, "partitions", "plan", "--to", "6", "--quiet")
    outputs.append(plan.stdout + plan.stderr)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"keys to move in {names.membership}:" in plan.stdout and "RELAY_PARTITIONS=6" in plan.stdout
    # Nothing printed or logged the SASL password, not even in base64.
    forms = encoded_forms(secured.password)
    for text in [*outputs, *(p.log.read_text() for p in procs)]:
        assert not any(form in text.encode() for form in forms)


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


# --- a secured cluster reached with the wrong settings ------------------------------------------

#: Every command that connects to Kafka, as run in production.
COMMANDS: dict[str, list[str]] = {
    "ingress": ["ingress"],
    "worker": ["worker"],
    **{f"sink {name}": ["sink", name] for name in SINKS},
    "partitions plan": ["partitions", "plan", "--to", "6", "--quiet"],
    "dead-letter replay": ["dead-letter", "replay", "--sink", "pushly", "--quiet"],
    "topics create": ["topics", "create"],
    "check": ["check"],
}
WRONG_PASSWORD = "zK3wrongSaslPw9vT2wX9pL4"
#: Where each component must give up: the 30 s of the issue.
DEADLINE = 30.0


def broken(secured: SecuredBroker, case: str, other_ca: Path) -> tuple[dict[str, object], str]:
    """(the settings of ``case``, the setting its one line must name)."""
    if case == "wrong password":
        return {"kafka_sasl_password": WRONG_PASSWORD}, "KAFKA_SASL_PASSWORD"
    if case == "untrusted CA":
        return {"kafka_ssl_ca_file": str(other_ca)}, "KAFKA_SSL_CA_FILE"
    # A plaintext client: no TLS, no SASL, against the SASL_SSL listener.
    plain: dict[str, object] = {
        "kafka_security_protocol": "PLAINTEXT",
        "kafka_sasl_mechanism": None,
        "kafka_sasl_username": None,
        "kafka_sasl_password": None,
        "kafka_ssl_ca_file": None,
    }
    return plain, "KAFKA_SECURITY_PROTOCOL"


async def run_bounded(
    env: dict[str, str], args: list[str], tmp: Path, slots: asyncio.Semaphore
) -> tuple[int | None, float, str]:
    """Run ``audience-relay <args>``: (exit code or None when still running at the deadline, seconds,
    stdout + stderr)."""
    async with slots:
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "audience_relay.cli",
            *args,
            env=env,
            cwd=tmp,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE + 5)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
            return None, time.monotonic() - began, out.decode(errors="replace")
        return proc.returncode, time.monotonic() - began, out.decode(errors="replace")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["wrong password", "untrusted CA", "plaintext client"])
async def test_every_component_refuses_a_bad_secured_connection_in_one_line(
    secured: SecuredBroker, case: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other_ca = make_ca(tmp_path_factory.getbasetemp() / "untrusted-ca", name="some other CA").cert
    overrides, setting = broken(secured, case, other_ca)
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    settings = secured.relay_settings(
        pushly_webhook_url=pushly.url,
        pushly_api_key="pushly-secret-key",
        odp_webhook_url=odp.url,
        odp_auth_token="Bearer odp-secret-token",
        ingress_host="127.0.0.1",
        ingress_port=free_port(),
        ingress_metrics_port=free_port(),
        worker_web_host="127.0.0.1",
        worker_web_port=free_port(),
        worker_data_dir=str(tmp_path / "worker-data"),
        **overrides,
    )
    env = {**clean_environ(), **settings.to_env()}
    slots = asyncio.Semaphore(3)  # a 2-core box: the deadline is per process, not for the batch
    try:
        results = dict(
            zip(
                COMMANDS,
                await asyncio.gather(
                    *(
                        run_bounded({**env, "RELAY_SINK_WEB_PORT": str(free_port())}, args, tmp_path, slots)
                        for args in COMMANDS.values()
                    )
                ),
                strict=True,
            )
        )
    finally:
        await pushly.stop()
        await odp.stop()
    password_forms = encoded_forms(secured.password) | encoded_forms(WRONG_PASSWORD)
    problems: list[str] = []
    for name, (code, seconds, out) in results.items():
        lines = [line for line in out.splitlines() if line.strip()]
        shown = f"{name}: exit {code} after {seconds:.1f}s:\n{out[-1500:]}"
        if code is None or seconds > DEADLINE:
            problems.append(f"still running after {DEADLINE:.0f}s — {shown}")
        elif code != (expected := ExitCode.CHECK_FAILED if name == "check" else ExitCode.NOPERM):
            problems.append(f"exit {code}, not {int(expected)} — {shown}")
        if "Traceback" in out:
            problems.append(f"a traceback — {shown}")
        if any(form in out.encode() for form in password_forms):
            problems.append(f"a password (or its base64) in the output — {name}")
        naming = [line for line in lines if setting in line]
        if not naming:
            problems.append(f"no line names {setting} — {shown}")
        elif name != "check" and len(lines) != 1:  # check lists every problem it finds
            problems.append(f"{len(lines)} lines, not one — {shown}")
    assert not problems, "\n\n".join(problems)
    slowest = max(results.items(), key=lambda item: item[1][1])
    print(f"{case}: {len(results)} commands refused, slowest {slowest[0]} after {slowest[1][1]:.1f}s")
