"""The README's first command, `audience-relay up --demo`, against the session broker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from devtools.localkafka import free_port
from tests.conftest import PROJECT


def test_up_demo_shows_the_whole_flow(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RELAY_TOPIC_PREFIX": f"demo{uuid.uuid4().hex[:8]}",
        "RELAY_PARTITIONS": "2",
        "RELAY_INGRESS_PORT": str(free_port()),
        "RELAY_INGRESS_METRICS_PORT": str(free_port()),
        "RELAY_WORKER_WEB_PORT": str(free_port()),
        "RELAY_LOCAL_DIR": str(tmp_path),
        "RELAY_WORKER_DATA_DIR": str(tmp_path / "worker"),
    }
    for var in ("PUSHLY_WEBHOOK_URL", "ODP_WEBHOOK_URL", "RELAY_INGRESS_API_KEYS"):
        env.pop(var, None)
    out = subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", "up", "--demo"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("-> 200") == 7
    assert "change entered  user@example.com audience emailzz5" in out.stdout
    assert "[pushly received] enter user@example.com audience emailzz5" in out.stdout
    assert "[odp received] enter user@example.com audience emailzz5" in out.stdout
    assert out.stdout.count("dead-letter missing_identifier") == 4  # 2 selected-fields samples, twice
