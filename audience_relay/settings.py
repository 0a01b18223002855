"""The one typed settings model every component of audience-relay reads.

Loaded once at start-up (``Settings()`` reads the environment) and passed down; nothing else in the
code base reads environment variables. Secrets are ``SecretStr`` so that printing or logging a
settings object never shows them.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from audience_relay.names import SINK_WEB_PORTS

MiB = 1024 * 1024
#: How a destination's identifier is sent: as it is, or the SHA-256 of its normalized value (hex).
IdentifierHash = Literal["none", "sha256"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]


def _split_csv(value: Any) -> Any:
    """Accept ``a,b,c`` from the environment as well as real lists from code."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseSettings):
        return {k: _reveal(v) for k, v in value}
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reveal(v) for v in value]
    return value


def _env_text(name: str, value: Any) -> str:
    if name == "sources":
        return orjson.dumps(_reveal(value)).decode()
    if name == "oauth_clients":
        return ",".join(f"{cid}:{secret}" for cid, secret in _reveal(value).items())
    if isinstance(value, list):
        return ",".join(str(_reveal(v)) for v in value)
    return str(_reveal(value))


def check_source_name(name: str) -> None:
    """A source name becomes a URL path segment: letters, digits, '-', '_' and '.' only."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"source name {name!r} may only hold letters, digits, '-', '_' and '.'")


class SourceAuth(BaseSettings):
    """Credentials of one configured Lytics job (``/v1/lytics/{source}``)."""

    model_config = SettingsConfigDict(extra="forbid")

    api_keys: list[SecretStr] = Field(default_factory=list)
    #: ``client_id -> client_secret`` pairs allowed to fetch OAuth tokens for this source.
    oauth_clients: dict[str, SecretStr] = Field(default_factory=dict)


class LocalSettings(BaseSettings):
    """The settings of the local broker: all ``audience-relay kafka …`` reads.

    A model of its own so those commands neither load nor validate anything else: a bad unrelated
    variable must not stop ``kafka status``.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    local_dir: Path = Field(Path(".local"), validation_alias=AliasChoices("RELAY_LOCAL_DIR", "local_dir"))
    local_kafka_port: int = Field(
        9092, ge=1, le=65535, validation_alias=AliasChoices("RELAY_LOCAL_KAFKA_PORT", "local_kafka_port")
    )


class Settings(LocalSettings):
    """Every setting an operator can change, with its environment variable."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # --- Kafka ------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        "localhost:9092", validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers")
    )
    #: Kafka's ``security.protocol``: TLS and/or SASL on the connection to every broker.
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT",
        validation_alias=AliasChoices("KAFKA_SECURITY_PROTOCOL", "kafka_security_protocol"),
    )
    #: Kafka's ``sasl.mechanism``; only with a SASL protocol, where it defaults to PLAIN.
    kafka_sasl_mechanism: SaslMechanism | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SASL_MECHANISM", "kafka_sasl_mechanism")
    )
    kafka_sasl_username: str | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SASL_USERNAME", "kafka_sasl_username")
    )
    kafka_sasl_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SASL_PASSWORD", "kafka_sasl_password")
    )
    #: PEM file of the CA(s) that signed the brokers' certificates; unset: the system's trust store.
    kafka_ssl_ca_file: Path | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SSL_CA_FILE", "kafka_ssl_ca_file")
    )
    #: Client certificate (PEM) for mutual TLS; the key may be in the same file.
    kafka_ssl_cert_file: Path | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SSL_CERT_FILE", "kafka_ssl_cert_file")
    )
    kafka_ssl_key_file: Path | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SSL_KEY_FILE", "kafka_ssl_key_file")
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("KAFKA_SSL_KEY_PASSWORD", "kafka_ssl_key_password")
    )
    #: Check that a broker's certificate names the host connected to (the chain is always verified).
    kafka_ssl_check_hostname: bool = Field(
        True, validation_alias=AliasChoices("KAFKA_SSL_CHECK_HOSTNAME", "kafka_ssl_check_hostname")
    )
    #: Kafka's ``compression.type`` of every record the relay produces. lz4 by default: the relay's
    #: records are JSON that lz4 shrinks several times for little CPU, and fewer bytes through the
    #: producers' sockets, the broker and the consumers cost less CPU than the compression does
    #: (bench/backfill.py: 1M memberships, 404 → 338 CPU seconds over the whole pipeline). Every
    #: Kafka client reads lz4 (Java, librdkafka; kafka-python with the ``lz4`` package).
    kafka_compression: Compression = Field(
        "lz4", validation_alias=AliasChoices("RELAY_KAFKA_COMPRESSION", "kafka_compression")
    )
    #: How long a component waits for an unreachable broker at start before it exits (69).
    startup_timeout_seconds: float = Field(
        15.0,
        gt=0,
        validation_alias=AliasChoices("RELAY_STARTUP_TIMEOUT_SECONDS", "startup_timeout_seconds"),
    )
    topic_prefix: str = Field(
        "lytics",
        pattern=r"^[A-Za-z0-9._-]+$",
        validation_alias=AliasChoices("RELAY_TOPIC_PREFIX", "topic_prefix"),
    )
    partitions: int = Field(
        8, ge=1, le=10_000, validation_alias=AliasChoices("RELAY_PARTITIONS", "partitions")
    )
    replication_factor: int = Field(
        1, ge=1, validation_alias=AliasChoices("RELAY_REPLICATION_FACTOR", "replication_factor")
    )
    #: ``min.insync.replicas`` of every topic ``topics create`` makes, when above 1.
    min_insync_replicas: int = Field(
        1, ge=1, validation_alias=AliasChoices("RELAY_MIN_INSYNC_REPLICAS", "min_insync_replicas")
    )
    raw_retention_hours: int = Field(
        168, ge=1, validation_alias=AliasChoices("RELAY_RAW_RETENTION_HOURS", "raw_retention_hours")
    )
    dead_letter_retention_hours: int = Field(
        720,
        ge=1,
        validation_alias=AliasChoices("RELAY_DEAD_LETTER_RETENTION_HOURS", "dead_letter_retention_hours"),
    )

    # --- Ingress ----------------------------------------------------------------------------
    ingress_host: str = Field("0.0.0.0", validation_alias=AliasChoices("RELAY_INGRESS_HOST", "ingress_host"))
    ingress_port: int = Field(
        8080, ge=0, le=65535, validation_alias=AliasChoices("RELAY_INGRESS_PORT", "ingress_port")
    )
    ingress_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("RELAY_INGRESS_API_KEYS", "ingress_api_keys")
    )
    ingress_query_param: str = Field(
        "api_key", validation_alias=AliasChoices("RELAY_INGRESS_QUERY_PARAM", "ingress_query_param")
    )
    #: ``client_id:secret,client_id2:secret2`` allowed to use the OAuth token endpoint (any source).
    oauth_clients: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict, validation_alias=AliasChoices("RELAY_OAUTH_CLIENTS", "oauth_clients")
    )
    oauth_signing_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("RELAY_OAUTH_SIGNING_KEY", "oauth_signing_key")
    )
    oauth_token_ttl_seconds: int = Field(
        3600,
        ge=60,
        le=86_400,
        validation_alias=AliasChoices("RELAY_OAUTH_TOKEN_TTL_SECONDS", "oauth_token_ttl_seconds"),
    )
    #: JSON object ``{"source": {"api_keys": [...], "oauth_clients": {...}}}`` for ``/v1/lytics/{source}``.
    sources: Annotated[dict[str, SourceAuth], NoDecode] = Field(
        default_factory=dict, validation_alias=AliasChoices("RELAY_SOURCES", "sources")
    )
    max_body_bytes: int = Field(
        10 * MiB, ge=1024, validation_alias=AliasChoices("RELAY_MAX_BODY_BYTES", "max_body_bytes")
    )
    max_inflight_bytes: int = Field(
        128 * MiB, ge=1024, validation_alias=AliasChoices("RELAY_MAX_INFLIGHT_BYTES", "max_inflight_bytes")
    )
    produce_timeout_seconds: float = Field(
        5.0, gt=0, validation_alias=AliasChoices("RELAY_PRODUCE_TIMEOUT_SECONDS", "produce_timeout_seconds")
    )
    retry_after_seconds: int = Field(
        5, ge=1, validation_alias=AliasChoices("RELAY_RETRY_AFTER_SECONDS", "retry_after_seconds")
    )
    producer_linger_ms: int = Field(
        0, ge=0, validation_alias=AliasChoices("RELAY_PRODUCER_LINGER_MS", "producer_linger_ms")
    )
    #: JSON file of credentials, re-read on SIGHUP (key rotation without restart); see audience_relay/keys.py.
    ingress_keys_file: Path | None = Field(
        None, validation_alias=AliasChoices("RELAY_INGRESS_KEYS_FILE", "ingress_keys_file")
    )
    #: A client must send a whole request head (request line + headers) within this time.
    ingress_header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        validation_alias=AliasChoices(
            "RELAY_INGRESS_HEADER_TIMEOUT_SECONDS", "ingress_header_timeout_seconds"
        ),
    )
    #: ... and the whole body within this time after its headers.
    ingress_body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        validation_alias=AliasChoices("RELAY_INGRESS_BODY_TIMEOUT_SECONDS", "ingress_body_timeout_seconds"),
    )
    ingress_keepalive_timeout_seconds: float = Field(
        75.0,
        gt=0,
        validation_alias=AliasChoices(
            "RELAY_INGRESS_KEEPALIVE_TIMEOUT_SECONDS", "ingress_keepalive_timeout_seconds"
        ),
    )
    ingress_max_connections: int = Field(
        512,
        ge=1,
        validation_alias=AliasChoices("RELAY_INGRESS_MAX_CONNECTIONS", "ingress_max_connections"),
    )
    #: Token bucket per source: sustained requests per second (0 turns the limit off) and burst size.
    ingress_rate_limit_per_second: float = Field(
        1000.0,
        ge=0,
        validation_alias=AliasChoices("RELAY_INGRESS_RATE_LIMIT_PER_SECOND", "ingress_rate_limit_per_second"),
    )
    ingress_rate_limit_burst: int = Field(
        2000,
        ge=1,
        validation_alias=AliasChoices("RELAY_INGRESS_RATE_LIMIT_BURST", "ingress_rate_limit_burst"),
    )
    #: /metrics, /healthz and /readyz on a port of their own; equal to the ingress port: all on one.
    ingress_metrics_port: int = Field(
        9102,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("RELAY_INGRESS_METRICS_PORT", "ingress_metrics_port"),
    )
    ingress_tls_cert_file: Path | None = Field(
        None, validation_alias=AliasChoices("RELAY_INGRESS_TLS_CERT_FILE", "ingress_tls_cert_file")
    )
    ingress_tls_key_file: Path | None = Field(
        None, validation_alias=AliasChoices("RELAY_INGRESS_TLS_KEY_FILE", "ingress_tls_key_file")
    )

    # --- Processors -------------------------------------------------------------------------
    match_field: str = Field(
        "email", min_length=1, validation_alias=AliasChoices("RELAY_MATCH_FIELD", "match_field")
    )
    #: Other fields of the Lytics record kept with each event and state (destinations may send them).
    identifier_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["_id"],
        validation_alias=AliasChoices("RELAY_IDENTIFIER_FIELDS", "identifier_fields"),
    )

    table_store: Literal["rocksdb", "memory"] = Field(
        "rocksdb", validation_alias=AliasChoices("RELAY_TABLE_STORE", "table_store")
    )
    table_memory_mb: int = Field(
        96, ge=8, validation_alias=AliasChoices("RELAY_TABLE_MEMORY_MB", "table_memory_mb")
    )
    worker_data_dir: Path = Field(
        Path(".local/worker"), validation_alias=AliasChoices("RELAY_WORKER_DATA_DIR", "worker_data_dir")
    )
    worker_web_host: str = Field(
        "0.0.0.0", validation_alias=AliasChoices("RELAY_WORKER_WEB_HOST", "worker_web_host")
    )
    worker_web_port: int = Field(
        6066, ge=0, le=65535, validation_alias=AliasChoices("RELAY_WORKER_WEB_PORT", "worker_web_port")
    )
    #: How other workers reach this one (forwarded queries); default http://<host>:<port>.
    worker_advertised_url: str | None = Field(
        None, validation_alias=AliasChoices("RELAY_WORKER_ADVERTISED_URL", "worker_advertised_url")
    )
    query_timeout_seconds: float = Field(
        5.0, gt=0, validation_alias=AliasChoices("RELAY_QUERY_TIMEOUT_SECONDS", "query_timeout_seconds")
    )
    standby_replicas: int = Field(
        1, ge=0, validation_alias=AliasChoices("RELAY_STANDBY_REPLICAS", "standby_replicas")
    )
    #: How long the group waits for a silent worker (killed, hung) before moving its partitions.
    worker_session_timeout_seconds: float = Field(
        60.0,
        ge=6,
        validation_alias=AliasChoices(
            "RELAY_WORKER_SESSION_TIMEOUT_SECONDS", "worker_session_timeout_seconds"
        ),
    )
    #: Off only to reproduce faust 0.15's offset bug (processors/offsets.py); keep it on.
    processor_batch: int = Field(
        1000, ge=1, validation_alias=AliasChoices("RELAY_PROCESSOR_BATCH", "processor_batch")
    )

    # --- Sinks ------------------------------------------------------------------------------
    pushly_webhook_url: str | None = Field(
        None, validation_alias=AliasChoices("PUSHLY_WEBHOOK_URL", "pushly_webhook_url")
    )
    pushly_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("PUSHLY_API_KEY", "pushly_api_key")
    )
    pushly_batch_size: int = Field(
        1, ge=1, validation_alias=AliasChoices("PUSHLY_BATCH_SIZE", "pushly_batch_size")
    )
    pushly_flush_seconds: float = Field(
        0.2, gt=0, validation_alias=AliasChoices("PUSHLY_FLUSH_SECONDS", "pushly_flush_seconds")
    )
    pushly_concurrency: int = Field(
        5, ge=1, validation_alias=AliasChoices("PUSHLY_CONCURRENCY", "pushly_concurrency")
    )
    #: Which identifier Pushly gets (a field of the change's ``identifiers``); empty: RELAY_MATCH_FIELD.
    pushly_identifier_source: str | None = Field(
        None, validation_alias=AliasChoices("PUSHLY_IDENTIFIER_SOURCE", "pushly_identifier_source")
    )
    #: The field name it is sent under in ``data``; empty: the source field's own name.
    pushly_identifier_field: str | None = Field(
        None, validation_alias=AliasChoices("PUSHLY_IDENTIFIER_FIELD", "pushly_identifier_field")
    )
    pushly_identifier_hash: IdentifierHash = Field(
        "none", validation_alias=AliasChoices("PUSHLY_IDENTIFIER_HASH", "pushly_identifier_hash")
    )
    pushly_audiences_include: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("PUSHLY_AUDIENCES_INCLUDE", "pushly_audiences_include"),
    )
    pushly_audiences_exclude: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("PUSHLY_AUDIENCES_EXCLUDE", "pushly_audiences_exclude"),
    )
    odp_webhook_url: str | None = Field(
        None, validation_alias=AliasChoices("ODP_WEBHOOK_URL", "odp_webhook_url")
    )
    odp_auth_header: str = Field(
        "Authorization", validation_alias=AliasChoices("ODP_AUTH_HEADER", "odp_auth_header")
    )
    odp_auth_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ODP_AUTH_TOKEN", "odp_auth_token")
    )
    odp_identifier_field: str = Field(
        "_id", min_length=1, validation_alias=AliasChoices("ODP_IDENTIFIER_FIELD", "odp_identifier_field")
    )
    #: Which identifier ODP gets: ``_id``, the Lytics ID (Lytics exports it as ``_id`` when "Lytics ID"
    #: is an Export Field), unless ODP's "customer profile identifier field name" says otherwise.
    odp_identifier_source: str = Field(
        "_id", min_length=1, validation_alias=AliasChoices("ODP_IDENTIFIER_SOURCE", "odp_identifier_source")
    )
    odp_identifier_hash: IdentifierHash = Field(
        "none", validation_alias=AliasChoices("ODP_IDENTIFIER_HASH", "odp_identifier_hash")
    )
    odp_audiences_include: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("ODP_AUDIENCES_INCLUDE", "odp_audiences_include")
    )
    odp_audiences_exclude: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("ODP_AUDIENCES_EXCLUDE", "odp_audiences_exclude")
    )
    odp_batch_size: int = Field(300, ge=1, validation_alias=AliasChoices("ODP_BATCH_SIZE", "odp_batch_size"))
    odp_flush_seconds: float = Field(
        3.0, gt=0, validation_alias=AliasChoices("ODP_FLUSH_SECONDS", "odp_flush_seconds")
    )
    odp_concurrency: int = Field(
        20, ge=1, validation_alias=AliasChoices("ODP_CONCURRENCY", "odp_concurrency")
    )
    analytics_topic: str | None = Field(
        None, validation_alias=AliasChoices("RELAY_ANALYTICS_TOPIC", "analytics_topic")
    )
    analytics_batch_size: int = Field(
        500, ge=1, validation_alias=AliasChoices("ANALYTICS_BATCH_SIZE", "analytics_batch_size")
    )
    analytics_flush_seconds: float = Field(
        0.2, gt=0, validation_alias=AliasChoices("ANALYTICS_FLUSH_SECONDS", "analytics_flush_seconds")
    )
    analytics_concurrency: int = Field(
        8, ge=1, validation_alias=AliasChoices("ANALYTICS_CONCURRENCY", "analytics_concurrency")
    )
    #: Which identifier the analytics events carry; empty: RELAY_MATCH_FIELD.
    analytics_identifier_source: str | None = Field(
        None, validation_alias=AliasChoices("ANALYTICS_IDENTIFIER_SOURCE", "analytics_identifier_source")
    )
    analytics_identifier_hash: IdentifierHash = Field(
        "none", validation_alias=AliasChoices("ANALYTICS_IDENTIFIER_HASH", "analytics_identifier_hash")
    )
    analytics_audiences_include: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("ANALYTICS_AUDIENCES_INCLUDE", "analytics_audiences_include"),
    )
    analytics_audiences_exclude: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("ANALYTICS_AUDIENCES_EXCLUDE", "analytics_audiences_exclude"),
    )
    #: Unset: each sink its own default (``names.SINK_WEB_PORTS``: pushly 9108, odp 9109, analytics 9110).
    sink_web_port: int | None = Field(
        None, ge=0, le=65535, validation_alias=AliasChoices("RELAY_SINK_WEB_PORT", "sink_web_port")
    )
    sink_do_not_retry: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [400, 404, 413],
        validation_alias=AliasChoices("RELAY_SINK_DO_NOT_RETRY", "sink_do_not_retry"),
    )
    sink_timeout_seconds: float = Field(
        10.0, gt=0, validation_alias=AliasChoices("RELAY_SINK_TIMEOUT_SECONDS", "sink_timeout_seconds")
    )
    sink_max_backoff_seconds: float = Field(
        60.0,
        gt=0,
        validation_alias=AliasChoices("RELAY_SINK_MAX_BACKOFF_SECONDS", "sink_max_backoff_seconds"),
    )
    #: The least time before any retry of a batch, whatever Retry-After (0, a past date) or jitter says.
    sink_min_retry_seconds: float = Field(
        1.0,
        gt=0,
        validation_alias=AliasChoices("RELAY_SINK_MIN_RETRY_SECONDS", "sink_min_retry_seconds"),
    )

    # --- Operations -------------------------------------------------------------------------
    log_level: str = Field("INFO", validation_alias=AliasChoices("RELAY_LOG_LEVEL", "log_level"))
    #: A repeated warning/error (same logger and text) is written at most once per this many
    #: seconds, with the count of those left out (audience_relay/logs.py); 0 writes every one.
    log_repeat_seconds: float = Field(
        30.0, ge=0, validation_alias=AliasChoices("RELAY_LOG_REPEAT_SECONDS", "log_repeat_seconds")
    )
    #: How often a worker or sink reads its consumer group's lag (relay_consumer_lag).
    lag_interval_seconds: float = Field(
        15.0, gt=0, validation_alias=AliasChoices("RELAY_LAG_INTERVAL_SECONDS", "lag_interval_seconds")
    )

    @field_validator("ingress_api_keys", mode="before")
    @classmethod
    def _keys_from_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("identifier_fields", mode="before")
    @classmethod
    def _identifier_fields(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator(
        "sink_do_not_retry",
        "pushly_audiences_include",
        "pushly_audiences_exclude",
        "odp_audiences_include",
        "odp_audiences_exclude",
        "analytics_audiences_include",
        "analytics_audiences_exclude",
        mode="before",
    )
    @classmethod
    def _lists_from_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator(
        "pushly_identifier_source", "pushly_identifier_field", "analytics_identifier_source", mode="before"
    )
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("oauth_clients", mode="before")
    @classmethod
    def _clients_from_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs: dict[str, str] = {}
            for item in _split_csv(value):
                client_id, sep, secret = item.partition(":")
                if not sep or not client_id or not secret:
                    raise ValueError(
                        "RELAY_OAUTH_CLIENTS must be 'client_id:secret' pairs separated by commas"
                    )
                pairs[client_id] = secret
            return pairs
        return value

    @field_validator("sources", mode="before")
    @classmethod
    def _sources_from_json(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            try:
                return orjson.loads(value) if value else {}
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"RELAY_SOURCES must be a JSON object: {exc}") from exc
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("RELAY_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("kafka_security_protocol", mode="before")
    @classmethod
    def _protocol_name(cls, value: Any) -> Any:
        # Kafka spells these in capitals; accept any case, and an empty variable as the default.
        if isinstance(value, str):
            return value.strip().upper() or "PLAINTEXT"
        return value

    @field_validator("kafka_compression", mode="before")
    @classmethod
    def _compression_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower() or "lz4"
        return value

    @field_validator("kafka_sasl_mechanism", mode="before")
    @classmethod
    def _mechanism_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().upper() or None
        return value

    @field_validator(
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_ca_file",
        "kafka_ssl_cert_file",
        "kafka_ssl_key_file",
        "kafka_ssl_key_password",
        "sink_web_port",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # An empty variable (``KAFKA_SSL_CA_FILE=``, common in compose files) means "not set",
        # not the current directory.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _kafka(self) -> Settings:
        problems = kafka_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _replicas(self) -> Settings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"RELAY_MIN_INSYNC_REPLICAS={self.min_insync_replicas} is above "
                f"RELAY_REPLICATION_FACTOR={self.replication_factor}: every acknowledged write would fail"
            )
        return self

    @model_validator(mode="after")
    def _source_names(self) -> Settings:
        for name in self.sources:
            check_source_name(name)
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.ingress_tls_cert_file is None) != (self.ingress_tls_key_file is None):
            raise ValueError(
                "set both RELAY_INGRESS_TLS_CERT_FILE and RELAY_INGRESS_TLS_KEY_FILE to serve HTTPS, "
                "or neither to serve plain HTTP"
            )
        return self

    @property
    def sasl(self) -> bool:
        """True when the connection to Kafka authenticates with SASL."""
        return self.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def tls(self) -> bool:
        """True when the connection to Kafka is encrypted with TLS."""
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")

    def sink_port(self, name: str) -> int:
        """The web port of the sink ``name``: ``RELAY_SINK_WEB_PORT``, else that sink's own default."""
        return self.sink_web_port if self.sink_web_port is not None else SINK_WEB_PORTS[name]

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for starting another component as a process."""
        env: dict[str, str] = {}
        for name, info in type(self).model_fields.items():
            alias = info.validation_alias
            var = alias.choices[0] if isinstance(alias, AliasChoices) else name.upper()
            value = getattr(self, name)
            if value is None:
                continue
            env[str(var)] = _env_text(name, value)
        return env

    def kept_identifier_fields(self) -> tuple[str, ...]:
        """The identifier fields kept with every segment event and state (match field excluded)."""
        return tuple(dict.fromkeys(f for f in self.identifier_fields if f and f != self.match_field))

    def has_credentials(self) -> bool:
        """True when at least one way to authenticate is configured."""
        return bool(
            self.ingress_api_keys
            or self.oauth_clients
            or any(s.api_keys or s.oauth_clients for s in self.sources.values())
        )


def _readable(setting: str, path: Path) -> str | None:
    if not path.exists():
        return f"{setting}={path}: the file does not exist"
    if not path.is_file():
        return f"{setting}={path}: not a file"
    if not os.access(path, os.R_OK):
        return f"{setting}={path}: the file cannot be read (permissions)"
    return None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower()


def kafka_problems(s: Settings) -> list[str]:
    """Every mistake in the Kafka connection settings, one sentence each naming the setting to fix.

    Reads the TLS files (a CA, certificate or key that cannot be used is found here, at start,
    rather than at the first connection); never puts a secret in a message.
    """
    problems: list[str] = []
    protocol = s.kafka_security_protocol
    for entry in s.kafka_bootstrap_servers.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not entry.strip() or (sep and (not host or not port.isdigit() or not 0 < int(port) < 65536)):
            problems.append(
                f"KAFKA_BOOTSTRAP_SERVERS={s.kafka_bootstrap_servers!r}: expected host:port[,host:port…]"
            )
            break
    if s.sasl:
        missing = [
            name
            for name, value in (
                ("KAFKA_SASL_USERNAME", s.kafka_sasl_username),
                (
                    "KAFKA_SASL_PASSWORD",
                    s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else "",
                ),
            )
            if not value
        ]
        if missing:
            problems.append(f"KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}")
    else:
        for name, value in (
            ("KAFKA_SASL_MECHANISM", s.kafka_sasl_mechanism),
            ("KAFKA_SASL_USERNAME", s.kafka_sasl_username),
            ("KAFKA_SASL_PASSWORD", s.kafka_sasl_password),
        ):
            if value is not None:
                problems.append(
                    f"{name} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL: "
                    "set KAFKA_SECURITY_PROTOCOL to SASL_SSL (or SASL_PLAINTEXT)"
                )
    files = (
        ("KAFKA_SSL_CA_FILE", s.kafka_ssl_ca_file),
        ("KAFKA_SSL_CERT_FILE", s.kafka_ssl_cert_file),
        ("KAFKA_SSL_KEY_FILE", s.kafka_ssl_key_file),
    )
    if not s.tls:
        tls_options: tuple[tuple[str, object], ...] = (
            *files,
            ("KAFKA_SSL_KEY_PASSWORD", s.kafka_ssl_key_password),
        )
        for name, option in tls_options:
            if option is not None:
                problems.append(
                    f"{name} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS: "
                    "set KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL"
                )
        return problems
    unreadable: set[str] = set()
    for name, path in files:
        problem = _readable(name, path) if path is not None else None
        if problem is not None:
            unreadable.add(name)
            problems.append(problem)
    if s.kafka_ssl_key_file is not None and s.kafka_ssl_cert_file is None:
        problems.append("KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE (the client certificate)")
    if (
        s.kafka_ssl_key_password is not None
        and s.kafka_ssl_key_file is None
        and s.kafka_ssl_cert_file is None
    ):
        problems.append("KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_KEY_FILE")
    if s.kafka_ssl_ca_file is not None and "KAFKA_SSL_CA_FILE" not in unreadable:
        try:
            ssl.create_default_context(cafile=str(s.kafka_ssl_ca_file))
        except ssl.SSLError as exc:
            problems.append(
                f"KAFKA_SSL_CA_FILE={s.kafka_ssl_ca_file}: holds no usable PEM CA certificate "
                f"({_ssl_reason(exc)})"
            )
    cert, key = s.kafka_ssl_cert_file, s.kafka_ssl_key_file
    if cert is not None and not {"KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE"} & unreadable:
        password = s.kafka_ssl_key_password.get_secret_value() if s.kafka_ssl_key_password else ""
        try:
            # A password (empty when unset) is always passed: without one OpenSSL would prompt on
            # the terminal for an encrypted key.
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                str(cert), str(key) if key else None, password=password
            )
        except ssl.SSLError as exc:
            reason = _ssl_reason(exc)
            # OpenSSL reports a key it cannot decrypt only as a "PEM lib" error: look at the file.
            encrypted = b"ENCRYPTED" in (key or cert).read_bytes()
            if "mismatch" in reason:
                problems.append(
                    f"KAFKA_SSL_KEY_FILE={key}: not the private key of KAFKA_SSL_CERT_FILE={cert}"
                )
            elif encrypted:
                problems.append(
                    f"KAFKA_SSL_KEY_FILE={key or cert}: the key is encrypted and KAFKA_SSL_KEY_PASSWORD "
                    + ("does not decrypt it" if password else "is not set")
                )
            else:
                problems.append(
                    f"KAFKA_SSL_CERT_FILE={cert}"
                    + (f" / KAFKA_SSL_KEY_FILE={key}" if key else "")
                    + f": not a usable PEM certificate and key ({reason})"
                )
    return problems
