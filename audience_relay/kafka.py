"""The one place that makes Kafka clients: every producer, consumer and admin client of the relay,
and the broker settings of the processors' faust app, come from here and from the settings.

So the connection (``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_SECURITY_PROTOCOL``, SASL and TLS) is the
same for every component, tool, test and benchmark, and changing it means changing this module.
Callers pass only what is particular to their client (group, batching, timeouts) as overrides.

Secrets (``KAFKA_SASL_PASSWORD``, ``KAFKA_SSL_KEY_PASSWORD``) leave their ``SecretStr`` only here,
into the client's own arguments; nothing here logs them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.codec import has_gzip, has_lz4, has_snappy, has_zstd
from aiokafka.helpers import create_ssl_context
from faust.types.auth import CredentialsT

from audience_relay import faustguard, kafkaguard
from audience_relay.exits import ExitCode, Fatal
from audience_relay.settings import Settings

log = logging.getLogger("audience_relay.kafka")

#: The client id every client gets unless the caller names its own (shows in broker logs and quotas).
CLIENT_ID = "audience-relay"


def as_settings(target: Settings | str) -> Settings:
    """``target`` itself, or for a ``str`` the default settings of a plaintext broker at that address.

    The ``str`` form is a convenience for tests and benchmarks against the local plaintext broker;
    components always pass their settings.
    """
    if isinstance(target, Settings):
        return target
    return Settings.model_validate({"kafka_bootstrap_servers": target})


@functools.lru_cache(maxsize=8)
def _ssl_context(
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    key_password: str,
    check_hostname: bool,
) -> ssl.SSLContext:
    try:
        context = create_ssl_context(
            cafile=ca_file,
            certfile=cert_file,
            keyfile=key_file,
            # Always a password (empty when unset): without one OpenSSL would prompt on the terminal
            # for an encrypted key instead of failing.
            password=key_password,
        )
    except OSError as exc:  # ssl.SSLError too; the settings checked the files; they may have changed since
        raise Fatal(
            f"the Kafka TLS files cannot be loaded ({type(exc).__name__}): check KAFKA_SSL_CA_FILE, "
            "KAFKA_SSL_CERT_FILE, KAFKA_SSL_KEY_FILE and KAFKA_SSL_KEY_PASSWORD",
            ExitCode.CONFIG,
        ) from None
    context.check_hostname = check_hostname
    return context  # type: ignore[no-any-return]  # aiokafka's helper is typed loosely


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the connection to Kafka (None without TLS), built once per configuration.

    Unset ``KAFKA_SSL_CA_FILE`` trusts the system's CAs (what managed clusters need); the
    certificate chain is always verified, ``KAFKA_SSL_CHECK_HOSTNAME=false`` skips only the name check.
    """
    if not settings.tls:
        return None
    password = settings.kafka_ssl_key_password
    return _ssl_context(
        settings.kafka_ssl_ca_file,
        settings.kafka_ssl_cert_file,
        settings.kafka_ssl_key_file,
        password.get_secret_value() if password is not None else "",
        settings.kafka_ssl_check_hostname,
    )


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """The arguments every aiokafka client takes to reach and authenticate to the brokers."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.sasl:
        password = settings.kafka_sasl_password
        kwargs.update(
            sasl_mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password is not None else None,
        )
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs


#: What every client gets for broker outages: aiokafka's own retry backoff (fetch, coordinator and
#: produce retries). What aiokafka has no setting for — metadata retries, queued records expiring —
#: ``kafkaguard.guard`` adds to every client made here (and ``faustguard`` to faust's).
_OUTAGE_KWARGS: dict[str, Any] = {"retry_backoff_ms": kafkaguard.RETRY_BACKOFF_MS}


def producer(settings: Settings | str, **overrides: Any) -> AIOKafkaProducer:
    """A producer (not started). Idempotent, so acks=all, unless ``overrides`` say otherwise."""
    s = as_settings(settings)
    kwargs: dict[str, Any] = {
        **_OUTAGE_KWARGS,
        "client_id": CLIENT_ID,
        "enable_idempotence": True,
        "compression_type": compression_type(s),
    }
    kwargs.update(overrides)
    return kafkaguard.guard(AIOKafkaProducer(**connection_kwargs(s), **kwargs))


def compression_type(settings: Settings) -> str | None:
    """The producers' ``compression_type`` (None: uncompressed), once its codec is known to load.

    aiokafka finds lz4, snappy and zstd in ``cramjam`` (installed with the relay); without it a
    producer fails only at its first send, so a missing codec is refused here, at construction.
    """
    codec = settings.kafka_compression
    if codec == "none":
        return None
    available = {"gzip": has_gzip, "snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}[codec]
    if not available():
        raise Fatal(
            f"RELAY_KAFKA_COMPRESSION={codec}: its codec is not installed (pip install cramjam), "
            "or set RELAY_KAFKA_COMPRESSION=none",
            ExitCode.CONFIG,
        )
    return codec


def consumer(settings: Settings | str, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer (not started) of ``topics`` (none: assign partitions yourself).

    Offsets are never committed automatically: every reader of the relay commits what it finished.
    """
    s = as_settings(settings)
    kwargs: dict[str, Any] = {**_OUTAGE_KWARGS, "client_id": CLIENT_ID, "enable_auto_commit": False}
    kwargs.update(overrides)
    return kafkaguard.guard(AIOKafkaConsumer(*topics, **connection_kwargs(s), **kwargs))


class Stoppable(Protocol):
    async def stop(self) -> None: ...


async def stop_clients(clients: Iterable[Stoppable], timeout: float) -> None:
    """Stop each client, each within ``timeout`` seconds; one that fails or hangs does not keep the
    others (or the process) from stopping.

    Bounded because a consumer's stop can hang forever: aiokafka 0.14's fetch routine suppresses a
    cancellation that arrives while it settles an unassignment (``contextlib.suppress`` around the
    await of its fetch tasks), then waits for the next assignment. Its records are uncommitted, so
    abandoning it loses nothing.
    """
    for client in clients:
        try:
            await asyncio.wait_for(client.stop(), timeout)
        except TimeoutError:
            log.warning("a Kafka client did not stop in time; leaving it", extra={"timeout_seconds": timeout})
        except Exception:  # e.g. aiokafka stopped mid-join: the others must still close
            log.warning("a Kafka client did not stop cleanly", exc_info=True)


def admin(settings: Settings | str, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (not started)."""
    s = as_settings(settings)
    kwargs: dict[str, Any] = {**_OUTAGE_KWARGS, "client_id": CLIENT_ID}
    kwargs.update(overrides)
    return kafkaguard.guard(AIOKafkaAdminClient(**connection_kwargs(s), **kwargs))


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """faust's form of the connection's security (its aiokafka driver turns it back into the same
    client arguments as ``connection_kwargs``); None for PLAINTEXT."""
    context = ssl_context(settings)
    if settings.sasl:
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password is not None else None,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,  # given: SASL_SSL, None: SASL_PLAINTEXT
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def faust_broker_settings(settings: Settings, scheme: str = faustguard.SCHEME) -> dict[str, Any]:
    """The ``faust.App`` arguments for the brokers: ``broker`` (one ``scheme://host:port`` URL per
    bootstrap server), ``broker_credentials`` and the producer's compression. ``scheme`` picks faust's
    transport: by default faust's aiokafka one with guarded clients (``audience_relay/faustguard.py``)."""
    return {
        "broker": [f"{scheme}://{host.strip()}" for host in settings.kafka_bootstrap_servers.split(",")],
        "broker_credentials": faust_credentials(settings),
        "producer_compression_type": compression_type(settings),
    }
