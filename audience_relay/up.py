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
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from pydantic import SecretStr

from audience_relay.kafkautil import topic_size
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


async def _run(settings: Settings, samples_dir: Path, keep_running: bool) -> int:
    from ingress.app import PUBLISHER, build_app

    names = TopicNames.from_settings(settings)
    for r in await create_topics(settings):
        print(f"topic {r.name} ({r.partitions} partitions, {'created' if r.created else 'exists'})")
    app = build_app(settings)
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
        key = settings.ingress_api_keys[0].get_secret_value()
        for name, status in await post_samples(base, key, load_samples(samples_dir)):
            print(f"POST {name:45s} -> {status}")
        added = await topic_size(settings.kafka_bootstrap_servers, names.raw) - before
        print(f"{names.raw} now holds {added} new record(s)")
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
