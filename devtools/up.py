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
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from audience_relay import signals
from audience_relay.kafkautil import end_offsets, group_lag, read_topic, topic_size
from audience_relay.names import SINKS, GroupNames
from audience_relay.preflight import run_preflight
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import LocalKafka, free_port

log = logging.getLogger("devtools.up")


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


async def _show_outputs(settings: Settings, names: TopicNames, marks: dict[str, dict[int, int]]) -> int:
    """Wait until the worker has processed everything, then show what this run added."""
    groups = GroupNames.from_settings(settings)
    deadline = time.monotonic() + 120
    while True:
        try:
            lag = await group_lag(settings, groups.split, [names.raw])
            lag += await group_lag(settings, groups.membership, [names.segment_events])
        except KafkaError:
            lag = -1
        if lag == 0:
            break
        if time.monotonic() > deadline:
            log_file = settings.local_dir / "logs" / "worker.log"
            print(f"the worker is still {lag} record(s) behind; see {log_file}")
            return 0
        await asyncio.sleep(0.5)  # polling the group's committed offsets
    events = await read_topic(settings, names.segment_events, marks[names.segment_events])
    changes = await read_topic(settings, names.membership_changes, marks[names.membership_changes])
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
    for record in await read_topic(settings, names.dead_letter, marks[names.dead_letter]):
        headers = dict(record.headers)
        code, reason = headers.get("reason-code", b"?").decode(), headers.get("reason", b"").decode()
        print(f"  dead-letter {code}: {reason}")
    return len(changes)


class LocalReceiver:
    """A stand-in destination for a local run: prints every request it receives and answers 200."""

    def __init__(
        self, name: str, on_record: Callable[[str, str, dict[str, Any]], None] | None = None
    ) -> None:
        self.name = name
        self.received = 0
        self.requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/{name}"
        self._on_record = on_record or self._print
        self._runner: web.AppRunner | None = None

    def _print(self, destination: str, identifier: str, segment_event: dict[str, Any]) -> None:
        audience = segment_event.get("slug") or segment_event.get("id")
        print(f"  [{destination} received] {segment_event.get('event')} {identifier} audience {audience}")

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        records = body if isinstance(body, list) else [body]
        self.requests += 1
        self.received += len(records)
        for record in records:
            data = record.get("data", {})
            ident = next((v for k, v in data.items() if k != "segment_events"), "?")
            for se in data.get("segment_events", []):
                self._on_record(self.name, ident, se)
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post(f"/{self.name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _spawn(settings: Settings, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = settings.to_env()
    if "worker_web_port" not in settings.model_fields_set:
        # Left at its default, the worker may fall back to a free port when 6066 is taken.
        env.pop("RELAY_WORKER_WEB_PORT", None)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "audience_relay.cli", *args],
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def _run(settings: Settings, samples_dir: Path, keep_running: bool) -> int:
    from ingress.app import build_app

    receivers: list[LocalReceiver] = []
    # A destination without a URL gets a local receiver and a throw-away credential.
    for name, url_field, secret_field in (
        ("pushly", "pushly_webhook_url", "pushly_api_key"),
        ("odp", "odp_webhook_url", "odp_auth_token"),
    ):
        if not getattr(settings, url_field):
            receivers.append(LocalReceiver(name))
            update: dict[str, object] = {
                url_field: receivers[-1].url,
                secret_field: SecretStr(secrets.token_urlsafe(16)),
            }
            if name == "odp" and "odp_identifier_source" not in settings.model_fields_set:
                # The sample payloads export no Lytics ID (_id), ODP's default identifier: the local
                # receiver is sent the match field instead, so the demo shows ODP's records.
                update["odp_identifier_source"] = settings.match_field
            settings = settings.model_copy(update=update)
    for receiver in receivers:
        await receiver.start()
        print(f"no {receiver.name.upper()}_WEBHOOK_URL: a local {receiver.name} receiver prints what it gets")
    names = TopicNames.from_settings(settings)
    for r in await create_topics(settings):
        print(f"topic {r.name} ({r.partitions} partitions, {'created' if r.created else 'exists'})")
    app = build_app(settings)
    logs = settings.local_dir / "logs"
    procs = {"worker": _spawn(settings, ["worker"], logs / "worker.log")}
    for sink in SINKS:
        # Each sink serves /metrics on its own default port (or a free one when that is taken).
        procs[f"sink {sink}"] = _spawn(settings, ["sink", sink], logs / f"sink-{sink}.log")
    print(f"worker and sinks started (logs in {logs})")
    try:
        return await _serve(settings, app, names, samples_dir, keep_running, receivers)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            await asyncio.to_thread(proc.wait, 60)
        print("worker and sinks stopped")
        for receiver in receivers:
            await receiver.stop()


async def _serve(
    settings: Settings,
    app: web.Application,
    names: TopicNames,
    samples_dir: Path,
    keep_running: bool,
    receivers: list[LocalReceiver],
) -> int:
    from ingress.app import PUBLISHER
    from ingress.server import reload_secrets, start_listeners

    listeners = await start_listeners(app, settings)
    try:
        if not await app[PUBLISHER].wait_connected(timeout=60):
            raise SystemExit(f"the ingress could not connect to Kafka at {settings.kafka_bootstrap_servers}")
        host = "127.0.0.1" if settings.ingress_host in ("0.0.0.0", "::") else settings.ingress_host
        scheme = "https" if listeners.tls else "http"
        base = f"{scheme}://{host}:{settings.ingress_port}"
        print(f"ingress listening on {base}/v1/lytics")
        before = await topic_size(settings, names.raw)
        marks = {
            t: await end_offsets(settings, t)
            for t in (names.segment_events, names.membership_changes, names.dead_letter)
        }
        key = settings.ingress_api_keys[0].get_secret_value()
        for name, status in await post_samples(base, key, load_samples(samples_dir)):
            print(f"POST {name:45s} -> {status}")
        added = await topic_size(settings, names.raw) - before
        print(f"{names.raw} now holds {added} new record(s); the worker is processing them")
        new_changes = await _show_outputs(settings, names, marks)
        deadline = time.monotonic() + 60
        while receivers and any(r.received < new_changes for r in receivers):
            if time.monotonic() > deadline:
                print("the local receivers did not get every change in time; see the sink logs")
                break
            await asyncio.sleep(0.2)  # polling the receivers' counters
        if keep_running:
            print("serving; press Ctrl-C to stop")
            stop = asyncio.Event()
            remove_handlers = signals.install(
                asyncio.get_running_loop(),
                "up",
                stop=stop.set,
                reload=lambda: reload_secrets(listeners, settings),
            )
            await stop.wait()
            remove_handlers()
    finally:
        await listeners.close()
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
        # An unreachable or misconfigured cluster ends here with one line and its exit code.
        run_preflight(settings)
        return asyncio.run(_run(settings, Path(samples), keep_running))
    finally:
        if broker is not None and not keep_broker:
            with contextlib.suppress(Exception):
                broker.stop()
                print("local kafka stopped")
