"""``audience-relay up``: the whole pipeline on one machine, on sample traffic.

Starts the local broker (unless ``KAFKA_BOOTSTRAP_SERVERS`` points elsewhere), creates the topics,
serves the ingress, posts every sample payload (one by one, then all of them as one Lytics batch) and
shows what landed in Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from audience_relay.kafkautil import end_offsets, group_lag, read_topic, topic_size
from audience_relay.localkafka import LocalKafka
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics

log = logging.getLogger("audience_relay.up")


def load_samples(folder: Path) -> list[tuple[str, bytes]]:
    """Every Lytics webhook sample (``*.json`` except enrichment payloads) in ``folder``."""
    found = sorted(p for p in folder.glob("*.json") if not p.name.startswith("enrichment"))
    if not found:
        raise SystemExit(f"no sample payloads (*.json) in {folder}")
    return [(p.name, p.read_bytes()) for p in found]


async def post_samples(
    base_url: str, api_key: str, samples: list[tuple[str, bytes]]
) -> list[tuple[str, int]]:
    """POST each sample, then all of them as one batch; return (name, status) pairs."""
    batch = b"[" + b",".join(orjson.dumps(orjson.loads(body)) for _, body in samples) + b"]"
    answers: list[tuple[str, int]] = []
    async with aiohttp.ClientSession(headers={"X-API-KEY": api_key}) as http:
        for name, body in [*samples, ("batch-of-all-samples", batch)]:
            content_type = (
                "application/cloudevents+json" if name.startswith("cloudevents") else "application/json"
            )
            async with http.post(
                f"{base_url}/v1/lytics", data=body, headers={"Content-Type": content_type}
            ) as resp:
                await resp.read()
                answers.append((name, resp.status))
    return answers


async def _show_outputs(settings: Settings, names: TopicNames, marks: dict[str, dict[int, int]]) -> None:
    """Wait until the worker has processed everything, then show what this run added."""
    group = f"{settings.topic_prefix}-processors"
    deadline = time.monotonic() + 120
    while True:
        try:
            lag = await group_lag(settings.kafka_bootstrap_servers, group, [names.raw, names.segment_events])
        except KafkaError:
            lag = -1
        if lag == 0:
            break
        if time.monotonic() > deadline:
            print(f"the worker is still {lag} record(s) behind; see {settings.local_dir / 'worker.log'}")
            return
        await asyncio.sleep(0.5)  # polling the group's committed offsets
    bootstrap = settings.kafka_bootstrap_servers
    events = await read_topic(bootstrap, names.segment_events, marks[names.segment_events])
    changes = await read_topic(bootstrap, names.membership_changes, marks[names.membership_changes])
    print(
        f"{names.segment_events}: {len(events)} new segment event(s); "
        f"{names.membership_changes}: {len(changes)} new change(s)"
    )
    for record in changes:
        change = orjson.loads(record.value)
        print(
            f"  change {change['change']:8s} {change['identifier']} audience {change['audience_slug']}"
            f" (change id {change['change_id']})"
        )
    for record in await read_topic(bootstrap, names.dead_letter, marks[names.dead_letter]):
        headers = dict(record.headers)
        code, reason = headers.get("reason-code", b"?").decode(), headers.get("reason", b"").decode()
        print(f"  dead-letter {code}: {reason}")


async def _run(settings: Settings, samples_dir: Path, keep_running: bool) -> int:
    from ingress.app import build_app

    names = TopicNames.from_settings(settings)
    for r in await create_topics(settings):
        print(f"topic {r.name} ({r.partitions} partitions, {'created' if r.created else 'exists'})")
    app = build_app(settings)
    log_path = settings.local_dir / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as worker_log:
        worker = subprocess.Popen(  # noqa: ASYNC220 - started once at start-up
            [sys.executable, "-m", "audience_relay.cli", "worker"],
            env={**os.environ, **settings.to_env()},
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    print(f"worker started (pid {worker.pid}, log {log_path})")
    try:
        return await _serve(settings, app, names, samples_dir, keep_running)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 60)
        print("worker stopped")


async def _serve(
    settings: Settings, app: web.Application, names: TopicNames, samples_dir: Path, keep_running: bool
) -> int:
    from ingress.app import PUBLISHER

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if not await app[PUBLISHER].wait_connected(timeout=60):
        raise SystemExit(f"the ingress could not connect to Kafka at {settings.kafka_bootstrap_servers}")
    site = web.TCPSite(runner, settings.ingress_host, settings.ingress_port)
    await site.start()
    try:
        host = "127.0.0.1" if settings.ingress_host in ("0.0.0.0", "::") else settings.ingress_host
        base = f"http://{host}:{settings.ingress_port}"
        print(f"ingress listening on {base}/v1/lytics")
        before = await topic_size(settings.kafka_bootstrap_servers, names.raw)
        marks = {
            t: await end_offsets(settings.kafka_bootstrap_servers, t)
            for t in (names.segment_events, names.membership_changes, names.dead_letter)
        }
        key = settings.ingress_api_keys[0].get_secret_value()
        for name, status in await post_samples(base, key, load_samples(samples_dir)):
            print(f"POST {name:45s} -> {status}")
        added = await topic_size(settings.kafka_bootstrap_servers, names.raw) - before
        print(f"{names.raw} now holds {added} new record(s); the worker is processing them")
        await _show_outputs(settings, names, marks)
        if keep_running:
            print("serving; press Ctrl-C to stop")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def run_up(settings: Settings, *, samples: str, keep_running: bool, keep_broker: bool) -> int:
    """Start what is needed, post the samples, and (unless a demo) keep serving until Ctrl-C."""
    broker: LocalKafka | None = None
    if "KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
        broker = LocalKafka(settings.local_dir, port=settings.local_kafka_port)
        already = broker.running()
        print(f"local kafka {'already running' if already else 'starting'} at {broker.start()}")
        keep_broker = keep_broker or already
        settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap})
    if not settings.ingress_api_keys:
        # A throw-away key for this local run only; it is never printed.
        settings = settings.model_copy(update={"ingress_api_keys": [SecretStr(secrets.token_urlsafe(24))]})
    try:
        return asyncio.run(_run(settings, Path(samples), keep_running))
    finally:
        if broker is not None and not keep_broker:
            with contextlib.suppress(Exception):
                broker.stop()
                print("local kafka stopped")
