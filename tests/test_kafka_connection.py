"""The Kafka connection settings, the client factory, the names, the start-up check's classification,
port choice and the CLI's lazy settings — all without a broker."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiokafka import errors as kerrors
from aiokafka.partitioner import DefaultPartitioner
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from audience_relay import cli, kafka, ports
from audience_relay.check import effective_settings
from audience_relay.exits import ExitCode, Fatal
from audience_relay.names import SINK_WEB_PORTS, SINKS, GroupNames, Names, TopicNames
from audience_relay.partitioner import identifier_partition, partition_for
from audience_relay.preflight import KafkaRefused, bootstrap_hosts, classify, preflight
from audience_relay.settings import Settings
from audience_relay.topics import topic_specs
from tests.tls import Pem, make_ca, make_cert, tls_listener

PASSWORD = "s3cret-Passw0rd-XYZ"
KEY_PASSWORD = "k3y-Passw0rd-XYZ"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    """A CA, a server certificate for 127.0.0.1, a client certificate with an encrypted key, and a
    second CA that signed nothing of ours."""
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder)
    return {
        "ca": ca,
        "server": make_cert(folder, ca, "broker"),
        "other-name": make_cert(folder, ca, "elsewhere", san="DNS:kafka.example.invalid"),
        "client": make_cert(folder, ca, "client", san="DNS:client", password=KEY_PASSWORD),
        "stranger": make_ca(folder, "stranger-ca"),
    }


def settings(**values: Any) -> Settings:
    return Settings.model_validate({"kafka_bootstrap_servers": "127.0.0.1:9092", **values})


def problems(**values: Any) -> list[str]:
    with pytest.raises(ValidationError) as err:
        settings(**values)
    [error] = err.value.errors()
    return str(error["msg"]).removeprefix("Value error, ").splitlines()


# --- settings ----------------------------------------------------------------------------------------


def test_security_defaults_are_plaintext_with_hostname_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SSL_CHECK_HOSTNAME"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism, s.kafka_ssl_check_hostname) == (
        "PLAINTEXT",
        None,
        True,
    )
    assert (s.min_insync_replicas, s.startup_timeout_seconds) == (1, 15.0)
    assert kafka.connection_kwargs(s) == {
        "bootstrap_servers": s.kafka_bootstrap_servers,
        "security_protocol": "PLAINTEXT",
    }


def test_security_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, pki: dict[str, Pem]) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")  # Kafka's names, any case
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "scram-sha-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "relay")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("KAFKA_SSL_CA_FILE", str(pki["ca"].cert))
    monkeypatch.setenv("KAFKA_SSL_CERT_FILE", "")  # empty: unset, not the current folder
    monkeypatch.setenv("KAFKA_SSL_CHECK_HOSTNAME", "false")
    s = Settings()
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert s.kafka_ssl_cert_file is None and s.kafka_ssl_check_hostname is False
    assert PASSWORD not in repr(s) and PASSWORD not in str(s)


@pytest.mark.parametrize(
    "values, expected",
    [
        (
            {"kafka_security_protocol": "SASL_SSL"},
            ["KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"],
        ),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u"},
            ["KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT needs KAFKA_SASL_PASSWORD"],
        ),
        (
            {"kafka_sasl_mechanism": "SCRAM-SHA-256"},
            ["KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use SASL"],
        ),
        (
            {"kafka_sasl_username": "u", "kafka_sasl_password": PASSWORD, "kafka_security_protocol": "SSL"},
            [
                "KAFKA_SASL_USERNAME is set but KAFKA_SECURITY_PROTOCOL=SSL does not use SASL",
                "KAFKA_SASL_PASSWORD is set but KAFKA_SECURITY_PROTOCOL=SSL does not use SASL",
            ],
        ),
        (
            {"kafka_ssl_ca_file": "/etc/hostname"},
            ["KAFKA_SSL_CA_FILE is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"],
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent/ca.pem"},
            ["KAFKA_SSL_CA_FILE=/nonexistent/ca.pem: the file does not exist"],
        ),
        ({"kafka_bootstrap_servers": "broker:port"}, ["KAFKA_BOOTSTRAP_SERVERS='broker:port': expected"]),
        (
            {"replication_factor": 1, "min_insync_replicas": 2},
            ["RELAY_MIN_INSYNC_REPLICAS=2 is above RELAY_REPLICATION_FACTOR=1"],
        ),
    ],
)
def test_each_mistake_gets_one_message_naming_the_setting(
    values: dict[str, Any], expected: list[str]
) -> None:
    found = problems(**values)
    assert len(found) == len(expected), found
    for message, start in zip(found, expected, strict=True):
        assert message.startswith(start), message
        assert PASSWORD not in message


def test_unusable_tls_files_are_refused_at_start(tmp_path: Path, pki: dict[str, Pem]) -> None:
    tls = {"kafka_security_protocol": "SSL"}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    [message] = problems(**tls, kafka_ssl_ca_file=garbage)
    assert message.startswith(f"KAFKA_SSL_CA_FILE={garbage}: holds no usable PEM CA certificate")
    client = pki["client"]
    [message] = problems(**tls, kafka_ssl_key_file=client.key)
    assert message == "KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE (the client certificate)"
    [message] = problems(**tls, kafka_ssl_cert_file=client.cert, kafka_ssl_key_file=client.key)
    assert (
        message
        == f"KAFKA_SSL_KEY_FILE={client.key}: the key is encrypted and KAFKA_SSL_KEY_PASSWORD is not set"
    )
    [message] = problems(
        **tls,
        kafka_ssl_cert_file=client.cert,
        kafka_ssl_key_file=client.key,
        kafka_ssl_key_password="wrong-one",
    )
    assert message.endswith("KAFKA_SSL_KEY_PASSWORD does not decrypt it") and "wrong-one" not in message
    [message] = problems(**tls, kafka_ssl_cert_file=pki["server"].cert, kafka_ssl_key_file=pki["ca"].key)
    assert message == (
        f"KAFKA_SSL_KEY_FILE={pki['ca'].key}: not the private key of KAFKA_SSL_CERT_FILE={pki['server'].cert}"
    )


# --- the client factory ------------------------------------------------------------------------------


def secured(pki: dict[str, Pem], **values: Any) -> Settings:
    """SASL_SSL with SCRAM, our CA and a client certificate with an encrypted key (mTLS)."""
    return settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="relay",
        kafka_sasl_password=PASSWORD,
        kafka_ssl_ca_file=pki["ca"].cert,
        kafka_ssl_cert_file=pki["client"].cert,
        kafka_ssl_key_file=pki["client"].key,
        kafka_ssl_key_password=KEY_PASSWORD,
        **values,
    )


def test_connection_arguments_for_every_protocol(pki: dict[str, Pem]) -> None:
    s = secured(pki)
    args = kafka.connection_kwargs(s)
    context = args.pop("ssl_context")
    assert args == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "relay",
        "sasl_plain_password": PASSWORD,
    }
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test-ca"),),)]
    assert kafka.connection_kwargs(s)["ssl_context"] is context  # built once
    unchecked = kafka.ssl_context(secured(pki, kafka_ssl_check_hostname=False))
    assert unchecked is not None and not unchecked.check_hostname
    assert unchecked.verify_mode == ssl.CERT_REQUIRED  # the chain is still verified
    plain_sasl = kafka.connection_kwargs(
        settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p")
    )
    assert plain_sasl["sasl_mechanism"] == "PLAIN" and "ssl_context" not in plain_sasl
    tls_only = kafka.connection_kwargs(settings(kafka_security_protocol="SSL"))
    assert tls_only["security_protocol"] == "SSL" and "sasl_mechanism" not in tls_only
    assert tls_only["ssl_context"].verify_mode == ssl.CERT_REQUIRED


async def test_every_client_gets_the_connection(pki: dict[str, Pem]) -> None:
    s = secured(pki)
    producer = kafka.producer(s, client_id="p", linger_ms=7)
    consumer = kafka.consumer(s, "some-topic", group_id="g")
    admin = kafka.admin(s)
    try:
        # aiokafka keeps the connection arguments on its (private) cluster client.
        for client in (producer.client, consumer._client, admin._client):
            assert client._security_protocol == "SASL_SSL"
            assert client._sasl_mechanism == "SCRAM-SHA-512"
            assert client._sasl_plain_username == "relay"
            assert client._ssl_context is kafka.ssl_context(s)
        assert producer._txn_manager is not None  # idempotent, so acks=all, unless a caller says otherwise
        assert producer._sender._acks == -1
        assert consumer._group_id == "g" and not consumer._enable_auto_commit
    finally:
        await producer.stop()
        await consumer.stop()
        await admin.close()


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_gets_the_same_connection(pki: dict[str, Pem], protocol: str) -> None:
    values: dict[str, Any] = {"kafka_security_protocol": protocol}
    if "SASL" in protocol:
        values |= {
            "kafka_sasl_mechanism": "SCRAM-SHA-256",
            "kafka_sasl_username": "u",
            "kafka_sasl_password": "p",
        }
    if "SSL" in protocol:
        values |= {"kafka_ssl_ca_file": pki["ca"].cert}
    s = settings(**values, kafka_bootstrap_servers="k1:9093, k2:9093")
    broker = kafka.faust_broker_settings(s)
    assert broker["broker"] == ["guardedkafka://k1:9093", "guardedkafka://k2:9093"]
    # faust's own aiokafka driver turns the credentials into client arguments: the factory's ones.
    expected = {k: v for k, v in kafka.connection_kwargs(s).items() if k != "bootstrap_servers"}
    translated = {k: v for k, v in credentials_to_aiokafka_auth(broker["broker_credentials"]).items() if v}
    assert translated == expected


def test_the_processors_app_connects_through_the_factory(pki: dict[str, Pem], tmp_path: Path) -> None:
    from processors.app import create_app

    s = secured(pki, replication_factor=3, min_insync_replicas=2, worker_data_dir=tmp_path)
    app = create_app(s)
    assert [str(u) for u in app.conf.broker] == ["guardedkafka://127.0.0.1:9092"]
    assert credentials_to_aiokafka_auth(app.conf.broker_credentials)["sasl_plain_password"] == PASSWORD
    assert app.conf.topic_replication_factor == 3
    assert sorted(app.tables) == ["deliveries", "membership"]
    for table in app.tables.values():
        assert table.extra_topic_configs == {"min.insync.replicas": "2"}


# --- names, the sink list, the partitioner, topic configs -----------------------------------------------


def test_every_name_comes_from_one_place() -> None:
    from processors import partitions as parts
    from processors.app import app_id
    from sinks.engine import group_id

    s = settings(topic_prefix="acme")
    names = Names.from_settings(s)
    assert names.groups == GroupNames(
        split="acme-processors",
        tables="acme-processors-tables",
        membership="acme-processors-membership",
        sinks={n: f"acme.sink.{n}" for n in SINKS},
        replays={n: f"acme.dead-letter-replay.{n}" for n in SINKS},
        resyncs={n: f"acme.resync.{n}" for n in SINKS},
    )
    assert app_id(s) == names.groups.tables
    assert [group_id(s, n) for n in SINKS] == [names.groups.sink(n) for n in SINKS]
    assert names.topics == TopicNames.from_settings(s)
    assert names.topics.field_changes == "acme.field-changes"
    assert parts.state_topic(s) == names.topics.partition_moves == "acme.partitions"
    assert {spec.name for spec in topic_specs(s)} == {
        getattr(names.topics, f) for f in ("raw", "segment_events", "dead_letter", "membership_changes")
    } | {names.topics.membership, names.topics.analytics, names.topics.field_changes, names.topics.deliveries}


def test_the_cli_offers_exactly_the_sinks() -> None:
    parser = cli.build_parser()
    for name in SINKS:
        assert parser.parse_args(["sink", name]).name == name
        assert parser.parse_args(["dead-letter", "replay", "--sink", name]).sink == name
    with pytest.raises(SystemExit) as usage:
        parser.parse_args(["sink", "fax"])
    assert usage.value.code == ExitCode.USAGE
    assert set(SINK_WEB_PORTS) == set(SINKS) and len(set(SINK_WEB_PORTS.values())) == len(SINKS)


def test_one_partitioner_for_text_and_bytes() -> None:
    from processors import partitions as parts
    from processors import queries

    default = DefaultPartitioner()
    for n in (1, 3, 8, 12):
        for key in ("user@example.com", "ünïcode@example.com", ""):
            expected = default(key.encode(), list(range(n)), list(range(n)))
            assert partition_for(key, n) == partition_for(key.encode(), n) == expected
            assert identifier_partition(key, n) == expected  # the sinks' cached form, asked twice
            assert identifier_partition(key, n) == expected
    assert queries.partition_for is parts.partition_for is partition_for


@given(st.binary(max_size=300))
def test_murmur2_is_kafkas(data: bytes) -> None:
    """The relay's faster murmur2 equals aiokafka's (the Java client's) on any key."""
    from aiokafka.partitioner import murmur2 as reference

    from audience_relay.partitioner import murmur2

    assert murmur2(data) == reference(data) & 0xFFFFFFFF


def test_min_insync_replicas_goes_on_every_topic_only_above_one() -> None:
    assert all("min.insync.replicas" not in spec.config for spec in topic_specs(settings()))
    strict = settings(replication_factor=3, min_insync_replicas=2)
    assert all(spec.config["min.insync.replicas"] == "2" for spec in topic_specs(strict))


# --- the start-up check's classification ----------------------------------------------------------------


def _refused(exc: BaseException, s: Settings) -> str:
    fatal = classify(exc, s, "broker:9096")
    assert isinstance(fatal, KafkaRefused) and fatal.code == ExitCode.NOPERM
    assert PASSWORD not in fatal.message and KEY_PASSWORD not in fatal.message
    return fatal.message


def _cert_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.verify_code, exc.verify_message = code, message
    return exc


def test_each_failure_names_the_setting_to_fix(pki: dict[str, Pem]) -> None:
    s = secured(pki)
    sasl_failed = kerrors.SaslAuthenticationFailed("Authentication failed: invalid credentials with SCRAM")
    assert "check KAFKA_SASL_PASSWORD" in _refused(sasl_failed, s)
    assert "KAFKA_SASL_USERNAME=relay" in _refused(sasl_failed, s)
    unsupported = kerrors.UnsupportedSaslMechanismError(
        "Kafka broker does not support SCRAM-SHA-512 sasl mechanism. Enabled mechanisms are: ['PLAIN']"
    )
    assert _refused(unsupported, s).endswith("set KAFKA_SASL_MECHANISM to one it enables (['PLAIN'])")
    assert "KAFKA_SSL_CA_FILE" in _refused(_cert_error(19, "self-signed certificate in chain"), s)
    assert "KAFKA_SSL_CHECK_HOSTNAME=false" in _refused(_cert_error(62, "Hostname mismatch"), s)
    assert "expired" in _refused(_cert_error(10, "certificate has expired"), s)
    wrong_version = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    wrong_version.reason = "WRONG_VERSION_NUMBER"
    assert "KAFKA_SECURITY_PROTOCOL=SASL_SSL" in _refused(wrong_version, s)
    unknown_ca = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    unknown_ca.reason = "TLSV1_ALERT_UNKNOWN_CA"
    assert "KAFKA_SSL_CERT_FILE" in _refused(unknown_ca, s)
    required = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    required.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    no_cert = settings(kafka_security_protocol="SSL")
    assert "set KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE" in _refused(required, no_cert)
    # TLS 1.3: the broker's alert comes with the first response; aiokafka keeps it as the cause.
    closed_by_alert = kerrors.KafkaConnectionError("Connection at broker:9096 closed")
    closed_by_alert.__cause__ = required
    assert "set KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE" in _refused(closed_by_alert, no_cert)
    assert "KAFKA_SECURITY_PROTOCOL=SASL_SSL" in _refused(ConnectionResetError(), s)
    assert "KAFKA_SECURITY_PROTOCOL=SASL_SSL" in _refused(kerrors.IllegalSaslStateError(), s)
    plaintext = settings()
    closed = _refused(kerrors.KafkaConnectionError("Connection at broker:9096 closed"), plaintext)
    assert "expects TLS or SASL; check KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in closed


def test_bootstrap_hosts() -> None:
    assert bootstrap_hosts("a:9093, b ,[::1]:9094") == [("a", 9093), ("b", 9092), ("::1", 9094)]


async def test_tls_failures_against_a_real_tls_listener(pki: dict[str, Pem]) -> None:
    """A TLS listener that is not Kafka: the handshake (or the first request) fails the way a Kafka
    TLS listener's would, and each way names its setting, at once and without retrying."""
    base = {"kafka_ssl_ca_file": pki["ca"].cert}

    async def refused(**values: Any) -> str:
        with pytest.raises(KafkaRefused) as err:
            await asyncio.wait_for(preflight(settings(**values), wait=30), 10)
        assert PASSWORD not in err.value.message
        return err.value.message

    async with tls_listener(pki["server"]) as tls:
        address = {"kafka_bootstrap_servers": tls.address}
        message = await refused(**address)  # plaintext client, TLS listener
        assert message.startswith(f"{tls.address} closed the connection at the first request")
        assert "KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in message
        message = await refused(**address, kafka_security_protocol="SSL")  # system CAs only
        assert "is not trusted" in message and "set KAFKA_SSL_CA_FILE" in message
        message = await refused(
            **address, kafka_security_protocol="SSL", kafka_ssl_ca_file=pki["stranger"].cert
        )
        assert f"KAFKA_SSL_CA_FILE={pki['stranger'].cert} did not sign it" in message
        # Trusted: the TLS handshake passes, then the listener hangs up on the Kafka request.
        message = await refused(**address, kafka_security_protocol="SSL", **base)
        assert "listener expects SASL" in message
    async with tls_listener(pki["other-name"]) as tls:
        message = await refused(kafka_bootstrap_servers=tls.address, kafka_security_protocol="SSL", **base)
        assert "does not name that host" in message and "KAFKA_SSL_CHECK_HOSTNAME=false" in message


async def test_unreachable_is_retried_for_the_startup_timeout_then_exit_69() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Fatal) as err:
            await preflight(
                settings(kafka_bootstrap_servers=f"127.0.0.1:{port}", startup_timeout_seconds=1.5)
            )
        assert 1.0 <= loop.time() - started < 5
    finally:
        closed.close()
    assert err.value.code == ExitCode.UNAVAILABLE
    assert err.value.message.startswith(f"Kafka is not reachable at KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}")
    assert "connection refused" in err.value.message and "RELAY_STARTUP_TIMEOUT_SECONDS" in err.value.message


# --- ports ---------------------------------------------------------------------------------------------


def test_a_taken_port_is_an_error_when_set_and_falls_back_when_default() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(Fatal) as err:
            ports.web_port(
                "127.0.0.1", taken, setting="RELAY_SINK_WEB_PORT", host_setting="H", fallback=False
            )
        assert err.value.code == ExitCode.IOERR == 74
        assert (
            err.value.message
            == f"port {taken} on 127.0.0.1 is already in use: stop what holds it or set RELAY_SINK_WEB_PORT"
        )
        chosen = ports.web_port(
            "127.0.0.1", taken, setting="RELAY_SINK_WEB_PORT", host_setting="H", fallback=True
        )
        assert chosen not in (taken, 0)
    assert ports.web_port("127.0.0.1", 0, setting="S", host_setting="H", fallback=False) > 0
    with pytest.raises(Fatal) as err:
        ports.web_port("192.0.2.1", 0, setting="S", host_setting="RELAY_WORKER_WEB_HOST", fallback=True)
    assert err.value.code == ExitCode.CONFIG and "RELAY_WORKER_WEB_HOST=192.0.2.1" in err.value.message


def test_sinks_default_to_their_own_ports() -> None:
    assert [settings().sink_port(n) for n in SINKS] == [9108, 9109, 9110]
    assert [settings(sink_web_port=9200).sink_port(n) for n in SINKS] == [9200] * 3


# --- effective settings and the CLI's lazy settings ------------------------------------------------------


def test_effective_settings_mask_every_secret(pki: dict[str, Pem]) -> None:
    s = secured(
        pki,
        pushly_api_key="pushly-secret-key",
        odp_auth_token="Bearer odp-secret-token",
        ingress_api_keys=["ingress-secret-key"],
        oauth_clients={"lytics": "oauth-secret"},
        sources={"crm": {"api_keys": ["crm-secret-key"]}},
    )
    shown = dict(effective_settings(s))
    text = "\n".join(f"{k}={v}" for k, v in shown.items())
    for secret in (
        PASSWORD,
        KEY_PASSWORD,
        "pushly-secret",
        "odp-secret",
        "ingress-secret",
        "oauth-secret",
        "crm-secret",
    ):
        assert secret not in text
    for var in (
        "KAFKA_SASL_PASSWORD",
        "KAFKA_SSL_KEY_PASSWORD",
        "PUSHLY_API_KEY",
        "RELAY_INGRESS_API_KEYS",
        "RELAY_SOURCES",
    ):
        assert shown[var] == "***", var
    assert shown["KAFKA_SASL_USERNAME"] == "relay" and shown["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert shown["RELAY_OAUTH_SIGNING_KEY"] == "(unset)" and shown["RELAY_PARTITIONS"] == "8"
    assert set(shown) == {v for v in shown if v.isupper()} and len(shown) == len(Settings.model_fields)


def test_commands_that_need_no_settings_do_not_load_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_PARTITIONS", "zero")  # would stop every command that loads settings
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")  # and so would this
    monkeypatch.setenv("RELAY_LOCAL_KAFKA_PORT", "1")
    assert cli.main(["schemas", "export", str(tmp_path)]) == 0
    assert cli.main(["kafka", "status"]) == ExitCode.KAFKA_NOT_RUNNING
    with pytest.raises(SystemExit) as help_exit:
        cli.main(["--help"])
    assert help_exit.value.code == 0
    capsys.readouterr()
    assert cli.main(["topics", "create"]) == ExitCode.CONFIG
    assert capsys.readouterr().err.splitlines() == [
        "error: invalid setting RELAY_PARTITIONS: Input should be a valid integer, unable to parse string as "
        "an integer"
    ]
    monkeypatch.setenv("RELAY_PARTITIONS", "4")
    assert cli.main(["topics", "create"]) == ExitCode.CONFIG
    assert capsys.readouterr().err.splitlines() == [
        "error: invalid setting: KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_SASL_USERNAME and "
        "KAFKA_SASL_PASSWORD"
    ]


def test_every_producer_compresses_as_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """RELAY_KAFKA_COMPRESSION reaches the factory's producers and faust's; lz4 unless told otherwise."""
    made: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)

    monkeypatch.setattr(kafka, "AIOKafkaProducer", Recorder)
    monkeypatch.setattr(kafka.kafkaguard, "guard", lambda client: client)
    kafka.producer(settings())
    kafka.producer(settings(kafka_compression="none"))
    kafka.producer(settings(kafka_compression=" ZSTD "))
    kafka.producer(settings(), compression_type="gzip")  # a caller's own choice wins
    assert [m["compression_type"] for m in made] == ["lz4", None, "zstd", "gzip"]
    assert kafka.faust_broker_settings(settings())["producer_compression_type"] == "lz4"
    from processors.app import create_app

    app = create_app(settings(kafka_compression="snappy", worker_data_dir=tmp_path))
    assert app.conf.producer_compression_type == "snappy"


def test_an_unknown_or_missing_codec_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "'none', 'gzip', 'snappy', 'lz4' or 'zstd'" in problems(kafka_compression="brotli")[0]
    # Every codec but gzip comes from cramjam; without it the first send would fail, not the start.
    for codec in ("lz4", "snappy", "zstd"):
        assert kafka.compression_type(settings(kafka_compression=codec)) == codec
    monkeypatch.setattr(kafka, "has_lz4", lambda: False)
    with pytest.raises(Fatal) as err:
        kafka.producer(settings())
    assert err.value.code == ExitCode.CONFIG
    assert "RELAY_KAFKA_COMPRESSION=lz4" in err.value.message and "cramjam" in err.value.message
