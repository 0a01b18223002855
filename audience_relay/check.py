"""``audience-relay check``: is this configuration ready to go live?

Prints the effective settings (secrets as ``***``), then checks, without changing or delivering
anything:

- Kafka: connects as every component will (``preflight``: bootstrap, security protocol, SASL, TLS);
- topics: each topic of the design exists with ``RELAY_PARTITIONS`` partitions and its cleanup
  policy (problems), and with at least ``RELAY_REPLICATION_FACTOR`` replicas and
  ``RELAY_MIN_INSYNC_REPLICAS`` (warnings: an existing topic keeps its replication until an
  operator reassigns it; a min ISR above its replica count is a problem, every write would fail);
- destinations: each configured URL (``PUSHLY_WEBHOOK_URL``, ``ODP_WEBHOOK_URL``) resolves and
  accepts a connection, for https with a verified TLS handshake. No request is sent, so no
  credential leaves the process.

Every problem is listed, not just the first; the exit code is 0 when there is none, else 6
(``ExitCode.CHECK_FAILED``). Warnings alone do not fail the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import typing
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from pydantic import AliasChoices, SecretStr
from pydantic_settings import BaseSettings

from audience_relay import kafka
from audience_relay.exits import ExitCode, Fatal
from audience_relay.preflight import preflight
from audience_relay.settings import Settings
from audience_relay.topics import TopicSpec, topic_specs

MASK = "***"


@dataclass
class Report:
    """What the check found, in order: ``ok`` lines, warnings and problems."""

    out: IO[str]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ok(self, text: str) -> None:
        print(f"  ok       {text}", file=self.out)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"  WARNING  {text}", file=self.out)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  PROBLEM  {text}", file=self.out)


def _secret_type(annotation: Any) -> bool:
    """True when a field of this type holds a secret (``SecretStr``, also inside lists, dicts, models)."""
    if annotation is SecretStr:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
        return any(_secret_type(f.annotation) for f in annotation.model_fields.values())
    return any(_secret_type(arg) for arg in typing.get_args(annotation))


def effective_settings(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value) of every setting, sorted; any value holding a secret is shown as ``***``."""
    env = settings.to_env()
    shown = []
    for name, info in type(settings).model_fields.items():
        alias = info.validation_alias
        var = str(alias.choices[0]) if isinstance(alias, AliasChoices) else name.upper()
        value = getattr(settings, name)
        if value is None:
            text = "(unset)"
        elif _secret_type(info.annotation):
            text = MASK if value else "(none)"
        else:
            text = env[var]
        shown.append((var, text))
    return sorted(shown)


def _config_map(responses: list[Any]) -> dict[str, dict[str, str]]:
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            entries = resource["config_entries"]
            configs[resource["resource_name"]] = {e["config_names"]: e["config_value"] for e in entries}
    return configs


def _check_topic(
    settings: Settings, spec: TopicSpec, described: dict[str, Any], config: dict[str, str], report: Report
) -> None:
    partitions = described["partitions"]
    replicas = min((len(p["replicas"]) for p in partitions), default=0)
    min_isr = int(config.get("min.insync.replicas", "1"))
    policy = config.get("cleanup.policy")
    problems = []
    if len(partitions) != spec.partitions:
        problems.append(
            f"topic {spec.name} has {len(partitions)} partitions, RELAY_PARTITIONS={spec.partitions}: "
            "set RELAY_PARTITIONS to the topics' count, or move to it with `audience-relay partitions`"
        )
    wanted_policy = spec.config.get("cleanup.policy")
    if wanted_policy and policy != wanted_policy:
        problems.append(f"topic {spec.name} has cleanup.policy={policy}, needs {wanted_policy}")
    if min_isr > replicas:
        problems.append(
            f"topic {spec.name} has min.insync.replicas={min_isr} above its {replicas} replica(s): "
            "every acknowledged (acks=all) write to it fails"
        )
    for problem in problems:
        report.problem(problem)
    if replicas < settings.replication_factor:
        report.warn(
            f"topic {spec.name} has {replicas} replica(s), below RELAY_REPLICATION_FACTOR="
            f"{settings.replication_factor} (reassign its partitions to raise it)"
        )
    if min_isr < settings.min_insync_replicas:
        report.warn(
            f"topic {spec.name} has min.insync.replicas={min_isr}, below RELAY_MIN_INSYNC_REPLICAS="
            f"{settings.min_insync_replicas}"
        )
    lagging = [p["partition"] for p in partitions if len(p["isr"]) < len(p["replicas"])]
    if lagging:
        report.warn(f"topic {spec.name}: partitions {lagging} have replicas out of sync")
    if not problems:
        report.ok(
            f"topic {spec.name}: {len(partitions)} partitions, {policy}, {replicas} replica(s), "
            f"min.insync.replicas={min_isr}"
        )


async def check_topics(settings: Settings, existing: frozenset[str], report: Report) -> None:
    """Each topic of the design: present, partition count, cleanup policy, replication."""
    specs = topic_specs(settings)
    for spec in specs:
        if spec.name not in existing:
            report.problem(f"topic {spec.name} does not exist: run `audience-relay topics create`")
    present = [s for s in specs if s.name in existing]
    if not present:
        return
    admin = kafka.admin(settings, client_id="audience-relay-check")
    await admin.start()
    try:
        described = {d["topic"]: d for d in await admin.describe_topics([s.name for s in present])}
        configs = _config_map(
            await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.name) for s in present])
        )
    finally:
        await admin.close()
    for spec in present:
        _check_topic(settings, spec, described[spec.name], configs.get(spec.name, {}), report)


async def check_destination(setting: str, url: str, timeout: float, report: Report) -> None:
    """``url`` resolves and accepts a connection; for https the TLS handshake verifies. No request."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        report.problem(f"{setting}: not an http(s) URL with a host")
        return
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        report.problem(f"{setting}: the port of the URL is not a number")
        return
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no answer"
        report.problem(f"{setting}: the host {host} does not resolve ({reason})")
        return
    addresses = sorted({str(info[4][0]) for info in found})
    context = ssl.create_default_context() if parts.scheme == "https" else None
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host if context else None),
            timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        report.problem(f"{setting}: the TLS certificate of {host} is not valid ({exc.verify_message})")
        return
    except ssl.SSLError as exc:
        report.problem(f"{setting}: the TLS handshake with {host}:{port} failed ({exc.reason or exc})")
        return
    except (OSError, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no answer"
        report.problem(f"{setting}: cannot connect to {host}:{port} ({reason})")
        return
    tls = writer.get_extra_info("ssl_object")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    how = f", TLS handshake ok ({tls.version()})" if tls is not None else " (plain http)"
    report.ok(f"{setting}: {host} resolves to {', '.join(addresses)}, port {port} answers{how}")


async def run_check(settings: Settings, out: IO[str]) -> int:
    """Print the settings and every check; 0 when there is no problem, else 6."""
    report = Report(out)
    print("settings (effective; secrets shown as ***):", file=out)
    for var, value in effective_settings(settings):
        print(f"  {var}={value}", file=out)
    print(f"kafka ({settings.kafka_bootstrap_servers}, {settings.kafka_security_protocol}):", file=out)
    try:
        cluster = await preflight(settings, wait=0)
    except Fatal as exc:
        report.problem(exc.message)
    else:
        report.ok(f"connected: {cluster.brokers} broker(s), {len(cluster.topics)} topic(s)")
        if cluster.brokers < settings.replication_factor:
            report.problem(
                f"RELAY_REPLICATION_FACTOR={settings.replication_factor} but the cluster has "
                f"{cluster.brokers} broker(s): topics create would fail"
            )
        try:
            await check_topics(settings, cluster.topics, report)
        except KafkaError as exc:
            report.problem(f"could not describe the topics ({type(exc).__name__}): check the ACLs")
    print("destinations:", file=out)
    destinations = [
        ("PUSHLY_WEBHOOK_URL", settings.pushly_webhook_url),
        ("ODP_WEBHOOK_URL", settings.odp_webhook_url),
    ]
    if not any(url for _, url in destinations):
        print("  (none configured)", file=out)
    for setting, url in destinations:
        if url:
            await check_destination(setting, url, settings.sink_timeout_seconds, report)
    if report.problems:
        print(f"{len(report.problems)} problem(s), {len(report.warnings)} warning(s):", file=out)
        for problem in report.problems:
            print(f"  - {problem}", file=out)
        return ExitCode.CHECK_FAILED
    print(f"all good ({len(report.warnings)} warning(s))", file=out)
    return ExitCode.OK
