"""`audience-relay topics create` and the local broker commands, against the real broker."""

from __future__ import annotations

import subprocess
import sys

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from audience_relay import kafka
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from tests.conftest import make_settings


async def _configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = kafka.admin(bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        resources = response.to_object()["resources"]
        return {c["config_names"]: c["config_value"] for c in resources[0]["config_entries"]}
    finally:
        await admin.close()


async def test_topics_create_makes_every_topic_with_its_configs(kafka_bootstrap: str) -> None:
    settings: Settings = make_settings(kafka_bootstrap, partitions=5, raw_retention_hours=48)
    first = await create_topics(settings)
    names = TopicNames.from_settings(settings)
    assert {r.name for r in first} == {
        names.raw,
        names.segment_events,
        names.dead_letter,
        names.membership_changes,
        names.membership,
        names.analytics,
        names.field_changes,
        names.deliveries,
    }
    assert all(r.created and r.partitions == 5 for r in first)
    again = await create_topics(settings)  # idempotent
    assert all(not r.created and r.partitions == 5 for r in again)
    raw = await _configs(kafka_bootstrap, names.raw)
    assert raw["cleanup.policy"] == "delete"
    assert raw["retention.ms"] == str(48 * 3_600_000)
    assert int(raw["max.message.bytes"]) > settings.max_body_bytes
    assert (await _configs(kafka_bootstrap, names.membership))["cleanup.policy"] == "compact"
    assert (await _configs(kafka_bootstrap, names.field_changes))["cleanup.policy"] == "delete"
    assert (await _configs(kafka_bootstrap, names.deliveries))["cleanup.policy"] == "compact"


def test_cli_topics_create_and_kafka_status(kafka_bootstrap: str) -> None:
    settings = make_settings(kafka_bootstrap)
    env = {
        "PATH": "/usr/bin:/bin",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RELAY_TOPIC_PREFIX": settings.topic_prefix,
        "RELAY_PARTITIONS": "2",
        "RELAY_LOCAL_KAFKA_PORT": "1",  # nothing runs there: status must say so
    }
    out = subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", "topics", "create"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert f"{settings.topic_prefix}.membership " in out.stdout and "created" in out.stdout
    status = subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", "kafka", "status"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 3 and "not running" in status.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", "topics", "create"],
        env={**env, "RELAY_PARTITIONS": "zero"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "RELAY_PARTITIONS" in bad.stderr
