"""``audience-relay sink NAME`` and ``audience-relay dead-letter replay --sink NAME``."""

from __future__ import annotations

import asyncio
import base64
import logging

import orjson
from aiohttp import web
from aiokafka import TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tqdm import tqdm

from audience_relay import kafka, ports, signals
from audience_relay.kafkautil import end_offsets
from audience_relay.lag import LagMonitor
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from sinks.base import Delivered, GiveUp
from sinks.destinations import build
from sinks.engine import SinkEngine, backoff, group_id

log = logging.getLogger("sinks")


def secrets_of(settings: Settings) -> list[str]:
    """Every configured destination secret, in the forms a destination may echo back (for scrubbing)."""
    configured = [
        s.get_secret_value() for s in (settings.pushly_api_key, settings.odp_auth_token) if s is not None
    ]
    return secret_variants(configured)


def secret_variants(secrets: list[str]) -> list[str]:
    """Each secret, its credential part (``Bearer <token>`` -> ``<token>``) and their base64 forms.

    Longest first, so that a whole value is scrubbed before a part of it.
    """
    variants: set[str] = set()
    for secret in secrets:
        parts = [secret, *(p for p in secret.split() if len(p) >= 8 and p != secret)]
        for part in parts:
            raw = part.encode()
            variants.add(part)
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                encoded = encode(raw).decode()
                variants.update({encoded, encoded.rstrip("=")})
    return sorted((v for v in variants if v), key=len, reverse=True)


def build_engine(settings: Settings, name: str) -> SinkEngine:
    """The delivery engine of the sink ``name``."""
    destination, batch_size, flush_seconds, concurrency = build(name, settings)
    return SinkEngine(settings, destination, batch_size, flush_seconds, concurrency, secrets_of(settings))


async def serve(settings: Settings, name: str, stop: asyncio.Event) -> SinkEngine:
    """Run the sink ``name`` until ``stop`` is set."""
    engine = build_engine(settings, name)
    await engine.run(stop)
    return engine


def web_app(engine: SinkEngine) -> web.Application:
    """The sink's web routes on ``RELAY_SINK_WEB_PORT``.

    ``/healthz`` (liveness: the event loop answers), ``/readyz`` (the consumer is connected and
    consuming; a sink with no partition assigned is still ready: it is an idle standby member) and
    ``/metrics`` (Prometheus).
    """

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        ok = engine.running
        return web.json_response({"status": "ready" if ok else "not_ready"}, status=200 if ok else 503)

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


def sink_web_port(settings: Settings, name: str) -> int:
    """The port the sink ``name`` serves on: ``RELAY_SINK_WEB_PORT``, else the sink's own default
    (``names.SINK_WEB_PORTS``), else, when that is taken by another process, a free one (logged)."""
    return ports.web_port(
        settings.worker_web_host,
        settings.sink_port(name),
        setting="RELAY_SINK_WEB_PORT",
        host_setting="RELAY_WORKER_WEB_HOST",
        fallback=settings.sink_web_port is None,
    )


def run_sink(settings: Settings, name: str) -> None:
    """Run one sink until SIGTERM/SIGINT (in-flight batches finish and are committed)."""

    async def main() -> None:
        stop = asyncio.Event()
        # SIGHUP: nothing to reload (logged); SIGTERM/SIGINT: stop (README "Signals").
        remove_handlers = signals.install(asyncio.get_running_loop(), f"sink {name}", stop=stop.set)
        engine = build_engine(settings, name)
        runner = web.AppRunner(web_app(engine), access_log=None)
        await runner.setup()
        port = sink_web_port(settings, name)
        await web.TCPSite(runner, settings.worker_web_host, port).start()
        log.info(
            "sink web server listening", extra={"sink": name, "host": settings.worker_web_host, "port": port}
        )
        topics = TopicNames.from_settings(settings)
        lag = LagMonitor(
            settings,
            group_id(settings, name),
            [topics.membership_changes],
            settings.lag_interval_seconds,
        )
        lag_task = asyncio.create_task(lag.run(stop), name="consumer-lag")
        try:
            await engine.run(stop)
        finally:
            stop.set()
            await lag_task
            await runner.cleanup()
            remove_handlers()

    asyncio.run(main())


async def replay_dead_letters(settings: Settings, name: str, *, progress: bool = True) -> tuple[int, int]:
    """Deliver again every record the sink ``name`` gave up, from where the last replay stopped.

    Returns (delivered, still refused). Records still refused stay in the dead-letter topic (a new
    copy is appended by nobody: they are simply not marked replayed, so a later replay tries again).
    """
    topics = TopicNames.from_settings(settings)
    destination, _, _, _ = build(name, settings)
    consumer = kafka.consumer(
        settings,
        group_id=GroupNames.from_settings(settings).replay(name),
        client_id=f"audience-relay-replay-{name}",
        auto_offset_reset="earliest",
    )
    ends = await end_offsets(settings, topics.dead_letter)
    parts = [TopicPartition(topics.dead_letter, p) for p in ends]
    await consumer.start()
    await destination.start()
    delivered = refused = 0
    try:
        consumer.assign(parts)
        committed = {tp: await consumer.committed(tp) for tp in parts}
        for tp in parts:
            if committed[tp] is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed[tp])
        total = 0
        for tp in parts:
            total += ends[tp.partition] - await consumer.position(tp)
        bar = tqdm(total=total, unit="record", desc=f"replay {name}", disable=not progress)
        pending = {tp for tp in parts if await consumer.position(tp) < ends[tp.partition]}
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=1000)).items():
                for record in records:
                    if record.offset >= ends[tp.partition]:
                        continue
                    bar.update(1)
                    headers = dict(record.headers or ())
                    if headers.get("stage") != b"sink" or headers.get("sink") != name.encode():
                        continue
                    change = orjson.loads(record.value)
                    attempt = 0
                    while True:
                        result = await destination.write([change])
                        if isinstance(result, Delivered):
                            delivered += 1
                            break
                        if isinstance(result, GiveUp):
                            refused += 1
                            break
                        attempt += 1
                        if attempt > 8:
                            raise SystemExit(
                                f"{name} keeps failing ({result.reason}); replay stopped, run it again"
                            )
                        await asyncio.sleep(
                            result.seconds or backoff(attempt, settings.sink_max_backoff_seconds)
                        )
                    await consumer.commit({tp: record.offset + 1})
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp.partition]}
        bar.close()
    finally:
        await destination.stop()
        await consumer.stop()
    return delivered, refused
