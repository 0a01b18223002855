"""Start-up check of the connection to Kafka, run by every component before it starts.

``preflight(settings)`` connects the way every client of ``audience_relay.kafka`` will (same
bootstrap servers, security protocol, SASL and TLS settings) and turns each way that can fail into
one sentence naming the setting to fix, raised as ``Fatal`` with its exit code:

==========================================================  ===========================  =====
what happened                                                 names                        exit
==========================================================  ===========================  =====
no bootstrap server accepts a TCP connection (for            KAFKA_BOOTSTRAP_SERVERS      69
``RELAY_STARTUP_TIMEOUT_SECONDS``, retried meanwhile)
TLS: the broker's certificate is not trusted                 KAFKA_SSL_CA_FILE            77
TLS: the certificate names another host                      KAFKA_SSL_CHECK_HOSTNAME     77
TLS handshake fails (the listener does not speak TLS) /      KAFKA_SECURITY_PROTOCOL      77
a plaintext client is cut off by a TLS or SASL listener
the broker wants / refuses the client certificate            KAFKA_SSL_CERT_FILE          77
SASL credentials refused                                     KAFKA_SASL_PASSWORD          77
SASL mechanism not enabled on the listener                   KAFKA_SASL_MECHANISM         77
a topic the component reads does not exist                   ``topics create``            78
==========================================================  ===========================  =====

Why not just start an aiokafka client: its bootstrap logs each failure and raises one
``KafkaConnectionError("Unable to bootstrap …")`` for all of them, so the cause is lost. The check
therefore opens one connection itself, first plain TCP (reachable?), then a Kafka connection with
aiokafka's ``create_conn`` (TLS handshake, API versions, SASL), whose exceptions are the real ones;
then an admin client of the factory reads the cluster's metadata. No message holds a secret:
SASL and TLS errors are reported by kind, never with the password or the server's text.

A wrong credential never heals by waiting, so only "unreachable" is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aiokafka import errors as kerrors
from aiokafka.conn import create_conn

from audience_relay import kafka
from audience_relay.exits import ExitCode, Fatal
from audience_relay.settings import Settings

log = logging.getLogger("audience_relay.preflight")

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH and X509_V_ERR_CERT_HAS_EXPIRED.
_NAME_MISMATCH = {62, 64}
_EXPIRED = 10


class KafkaUnreachable(Fatal):
    """No bootstrap server could be reached (exit 69: retrying later may help)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.UNAVAILABLE)


class KafkaRefused(Fatal):
    """A broker was reached but the secured connection failed (exit 77: a setting must change)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.NOPERM)


@dataclass(frozen=True)
class Cluster:
    """What the check saw: the broker count and the topics the cluster has."""

    brokers: int
    topics: frozenset[str]


def bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    """``host:port`` pairs of ``KAFKA_BOOTSTRAP_SERVERS`` (port 9092 when left out)."""
    hosts = []
    for entry in bootstrap.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not sep:
            host, port = entry.strip(), "9092"
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or type(exc).__name__).lower().replace("_", " ")


def classify(exc: BaseException, settings: Settings, address: str) -> Fatal:
    """The one-line ``Fatal`` for a failure of the Kafka connection to ``address`` after TCP connected."""
    protocol = f"KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}"
    if isinstance(exc, kerrors.KafkaConnectionError) and isinstance(exc.__cause__, ssl.SSLError):
        # With TLS 1.3 the broker judges the client certificate after the handshake: its alert
        # arrives with the first response, and aiokafka keeps it as the cause.
        return classify(exc.__cause__, settings, address)
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or _ssl_reason(exc)
        if exc.verify_code in _NAME_MISMATCH:
            return KafkaRefused(
                f"the TLS certificate of {address} does not name that host ({detail}): use the host "
                "names of the brokers' certificates in KAFKA_BOOTSTRAP_SERVERS, or set "
                "KAFKA_SSL_CHECK_HOSTNAME=false"
            )
        if exc.verify_code == _EXPIRED:
            return KafkaRefused(
                f"the TLS certificate of {address} has expired: renew the brokers' certificate"
            )
        where = (
            f"KAFKA_SSL_CA_FILE={settings.kafka_ssl_ca_file} did not sign it"
            if settings.kafka_ssl_ca_file
            else "set KAFKA_SSL_CA_FILE to the CA that signed it (the system's CAs did not)"
        )
        return KafkaRefused(f"the TLS certificate of {address} is not trusted ({detail}): {where}")
    if isinstance(exc, ssl.SSLError):
        reason = _ssl_reason(exc)
        if "certificate required" in reason or "handshake failure" in reason:
            if settings.kafka_ssl_cert_file is None:
                return KafkaRefused(
                    f"{address} asks for a client certificate ({reason}): set KAFKA_SSL_CERT_FILE and "
                    "KAFKA_SSL_KEY_FILE"
                )
        if any(alert in reason for alert in ("bad certificate", "unknown ca", "certificate unknown")):
            return KafkaRefused(
                f"{address} refused the client certificate ({reason}): KAFKA_SSL_CERT_FILE must be "
                "signed by a CA the brokers trust"
            )
        return KafkaRefused(
            f"the TLS handshake with {address} failed ({reason}): the listener does not speak TLS? "
            f"check {protocol}"
        )
    if isinstance(exc, kerrors.SaslAuthenticationFailed | kerrors.AuthenticationFailedError):
        mechanism = settings.kafka_sasl_mechanism or "PLAIN"
        return KafkaRefused(
            f"{address} refused the SASL credentials of KAFKA_SASL_USERNAME={settings.kafka_sasl_username} "
            f"({mechanism}): check KAFKA_SASL_PASSWORD (and KAFKA_SASL_MECHANISM)"
        )
    if isinstance(exc, kerrors.UnsupportedSaslMechanismError):
        mechanism = settings.kafka_sasl_mechanism or "PLAIN"
        enabled = str(exc).rpartition("Enabled mechanisms are:")[2].strip() or "see the broker"
        return KafkaRefused(
            f"{address} does not enable SASL mechanism {mechanism}: set KAFKA_SASL_MECHANISM to one it "
            f"enables ({enabled})"
        )
    if isinstance(exc, kerrors.IllegalSaslStateError):
        return KafkaRefused(f"the listener at {address} does not use SASL: check {protocol}")
    if isinstance(exc, ValueError) and settings.sasl:  # aiokafka's SCRAM raises ValueError on a bad server
        return KafkaRefused(f"the SCRAM exchange with {address} failed: check KAFKA_SASL_MECHANISM")
    if isinstance(exc, TimeoutError):
        return KafkaRefused(
            f"{address} accepted the connection but did not answer as Kafka does with {protocol}: "
            "check KAFKA_SECURITY_PROTOCOL and that the port is a Kafka listener"
        )
    if isinstance(exc, kerrors.KafkaConnectionError):
        # The connection (and any TLS handshake) was made; the broker hung up on the first request.
        expected = "SASL" if settings.tls else "TLS or SASL"
        return KafkaRefused(
            f"{address} closed the connection at the first request: the listener expects {expected}; "
            f"check {protocol}"
        )
    if isinstance(exc, OSError | asyncio.IncompleteReadError) and settings.tls:
        # Raised by the TLS handshake itself, before any Kafka request.
        return KafkaRefused(
            f"the TLS handshake with {address} was cut off ({type(exc).__name__}): the listener does not "
            f"speak TLS? check {protocol}"
        )
    return KafkaRefused(
        f"the connection to {address} failed ({type(exc).__name__}): check KAFKA_SECURITY_PROTOCOL "
        "and the KAFKA_SASL_* / KAFKA_SSL_* settings"
    )


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """aiokafka logs each failed attempt at ERROR; here the classified failure says it all."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _tcp(host: str, port: int, timeout: float) -> str | None:
    """None when ``host:port`` accepts a TCP connection, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return "no answer"
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return "connection refused"
        return exc.strerror or type(exc).__name__
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _attempt(settings: Settings, topics: Sequence[str], timeout: float) -> Cluster:
    hosts = bootstrap_hosts(settings.kafka_bootstrap_servers)
    why: dict[str, str] = {}
    for host, port in hosts:
        problem = await _tcp(host, port, min(timeout, 5.0))
        if problem is None:
            break
        why[f"{host}:{port}"] = problem
    else:
        reasons = "; ".join(f"{a}: {w}" for a, w in why.items())
        raise KafkaUnreachable(
            f"Kafka is not reachable at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} "
            f"({reasons})"
        )
    address = f"{host}:{port}"
    args = {k: v for k, v in kafka.connection_kwargs(settings).items() if k != "bootstrap_servers"}
    try:
        conn = await asyncio.wait_for(
            create_conn(
                host, port, client_id=kafka.CLIENT_ID, request_timeout_ms=int(timeout * 1000), **args
            ),
            timeout + 1,
        )
    except Exception as exc:  # every failure after TCP connected is classified, none escapes raw
        raise classify(exc, settings, address) from None
    conn.close()
    admin = kafka.admin(settings, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
        existing = frozenset(await asyncio.wait_for(admin.list_topics(), timeout))
    except TimeoutError:
        raise KafkaUnreachable(
            f"{address} answered but the cluster's metadata did not come within {timeout:g}s: are the "
            "brokers' advertised listeners reachable from here?"
        ) from None
    except kerrors.KafkaConnectionError as exc:
        raise classify(exc, settings, address) from None
    except kerrors.KafkaError as exc:
        raise KafkaRefused(
            f"{address} refused the metadata request ({type(exc).__name__}): check the ACLs of "
            f"KAFKA_SASL_USERNAME={settings.kafka_sasl_username}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    missing = [t for t in topics if t not in existing]
    if missing:
        raise Fatal(
            f"topic {', '.join(missing)} does not exist: run `audience-relay topics create` with the same "
            f"RELAY_TOPIC_PREFIX={settings.topic_prefix}",
            ExitCode.CONFIG,
        )
    return Cluster(len(cluster.get("brokers", [])), existing)


async def preflight(settings: Settings, *, topics: Sequence[str] = (), wait: float | None = None) -> Cluster:
    """Connect to Kafka as every client will; raise ``Fatal`` naming the setting to fix.

    An unreachable cluster is tried again for ``wait`` seconds (default
    ``RELAY_STARTUP_TIMEOUT_SECONDS``; 0: once) before ``KafkaUnreachable`` (exit 69). A secured
    connection that fails raises ``KafkaRefused`` (77) at once; a topic of ``topics`` that does not
    exist raises ``Fatal`` with exit 78. Returns what it saw.
    """
    loop = asyncio.get_running_loop()
    budget = settings.startup_timeout_seconds if wait is None else wait
    deadline = loop.time() + budget
    delay = 0.25
    with _quiet_aiokafka():
        while True:
            remaining = deadline - loop.time()
            try:
                return await _attempt(settings, topics, max(2.0, min(10.0, remaining)))
            except KafkaUnreachable as exc:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    waited = f"{exc.message}; waited {budget:g}s (RELAY_STARTUP_TIMEOUT_SECONDS)"
                    raise KafkaUnreachable(waited) from None
                log.debug("kafka not reachable yet, retrying", extra={"reason": exc.message})
                await asyncio.sleep(min(delay, remaining))  # a retry backoff: the broker may be starting
                delay = min(delay * 2, 2.0)


def run_preflight(settings: Settings, *, topics: Sequence[str] = (), wait: float | None = None) -> Cluster:
    """``preflight`` from synchronous code, on an event loop of its own.

    Not ``asyncio.run``: that leaves no current loop behind, and faust (the worker) needs one.
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(preflight(settings, topics=topics, wait=wait))
    finally:
        loop.close()
