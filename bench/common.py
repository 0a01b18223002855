"""Shared pieces of the benchmarks: a broker, a Lytics-shaped payload generator, a lean HTTP client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson

from audience_relay.settings import Settings
from devtools.localkafka import LocalKafka, free_port, port_open

PROJECT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def broker() -> Iterator[tuple[str, int | None]]:
    """(bootstrap, pid): ``KAFKA_BOOTSTRAP_SERVERS`` if set (pid unknown), else a throw-away local broker."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"], None
        return
    home = Path(tempfile.mkdtemp(prefix="bench-kafka-", dir=PROJECT / ".local"))
    local = LocalKafka(PROJECT / ".local", port=free_port(), home_dir=home)
    local.start()
    try:
        yield local.bootstrap, local.pid()
    finally:
        local.stop()
        local.wipe()


def lytics_user(n: int, audience: int = 0, event: str = "enter", pad: int = 0) -> dict[str, object]:
    """One user event in the Lytics default format, shaped like the published sample."""
    ts = "2026-11-01T10:00:00.000000000Z"
    return {
        "id": str(10_000_000_000 + n),
        "data": {
            "_created": "2020-07-15T08:55:43.041-07:00",
            "_modified": "2020-07-15T08:55:43.041-07:00",
            "_num_aliases": 1,
            "_num_events": 12,
            "channels": ["web"],
            "email": f"user{n}@example.com",
            "first_name": "Beth",
            "last_name": "Izzi",
            "name": "Beth Izzi",
            "hourly": {"15": 1},
            "is_bot": "f",
            "is_mobile": "t",
            "last_active_ts": "2020-07-15T08:55:43.041-07:00",
            "score_frequency": 99,
            "score_momentum": 99,
            "score_quantity": 100,
            "score_recency": 100,
            "user_agent": "python-requests",
            "notes": "x" * pad,
            "segment_events": [
                {
                    "id": f"aud{audience:029d}",
                    "event": event,
                    "slug": f"audience_{audience}",
                    event: ts,
                }
            ],
        },
        "meta": {"object": "user", "subscription_id": "36e243f8fd8f4530bbd330fa7fb1a685", "timestamp": ts},
    }


def sized_user(n: int, target_bytes: int) -> bytes:
    """A single-user body padded to about ``target_bytes``."""
    base = len(orjson.dumps(lytics_user(n)))
    return orjson.dumps(lytics_user(n, pad=max(0, target_bytes - base)))


class IngressProcess:
    """``audience-relay ingress`` in its own process, so its CPU time can be measured alone."""

    def __init__(
        self, bootstrap: str, prefix: str, key: str, extra_env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "RELAY_TOPIC_PREFIX": prefix,
            "RELAY_INGRESS_API_KEYS": key,
            "RELAY_INGRESS_HOST": "127.0.0.1",
            "RELAY_INGRESS_PORT": str(self.port),
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_INGRESS_METRICS_PORT": str(free_port()),
            # The benchmark measures capacity: the per-source rate limit would cap it.
            "RELAY_INGRESS_RATE_LIMIT_PER_SECOND": "0",
            **(extra_env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "audience_relay.cli", "ingress"], env=env, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the ingress did not become ready")
            time.sleep(0.05)

    def _ready(self) -> bool:
        if not port_open("127.0.0.1", self.port):
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def new_prefix() -> str:
    return f"bench{uuid.uuid4().hex[:8]}"


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser, its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def bench_settings(bootstrap: str, **values: object) -> Settings:
    """Settings for one benchmark run: its own topic prefix, WARNING logs unless ``values`` say otherwise."""
    return Settings.model_validate(
        {"kafka_bootstrap_servers": bootstrap, "topic_prefix": new_prefix(), "log_level": "WARNING", **values}
    )


async def http_post_loop(
    port: int,
    path: str,
    headers: dict[str, str],
    bodies: list[bytes],
    stop_at: float,
    latencies: list[float],
    statuses: dict[int, int],
    interval: float = 0.0,
    max_requests: int | None = None,
) -> int:
    """One keep-alive HTTP/1.1 client posting ``bodies`` round-robin until ``stop_at``; returns requests sent.

    With ``interval`` it sends one request per interval instead of back to back.

    Hand-rolled on asyncio streams so the load generator costs far less CPU than the server it measures.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Content-Length: {len(b)}\r\n\r\n".encode() + b
        for b in bodies
    ]
    sent = 0
    # Paced clients start at random phases, or they would all fire at once every interval.
    next_at = time.monotonic() + random.uniform(0, interval) - interval
    try:
        while time.monotonic() < stop_at and (max_requests is None or sent < max_requests):
            if interval:  # paced (open-loop-ish): keep a steady request rate per client
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            started = time.perf_counter()
            writer.write(requests[sent % len(requests)])
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            status = int(status_line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
            sent += 1
    finally:
        writer.close()
    return sent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
