"""``audience-relay sink NAME``: one sink process (engine, web routes, signals)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from audience_relay import ports, signals
from audience_relay.lag import LagMonitor
from audience_relay.settings import Settings
from sinks.destinations import build
from sinks.engine import SinkEngine, group_id
from sinks.replay import replay_dead_letters
from sinks.scrub import secrets_of

__all__ = ["build_engine", "replay_dead_letters", "run_sink", "serve", "web_app"]

log = logging.getLogger("sinks")


def build_engine(settings: Settings, name: str) -> SinkEngine:
    """The delivery engine of the sink ``name``."""
    return SinkEngine(settings, build(name, settings), secrets_of(settings))


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
        lag = LagMonitor(
            settings,
            group_id(settings, name),
            list(engine.spec.topics),
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
