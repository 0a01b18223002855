"""Serving the ingress: the guarded listener (HTTP or HTTPS), the operations port, and signals.

- The webhook listener goes through ``ingress.guard`` (connection cap, head and body deadlines) and
  serves HTTPS itself when ``RELAY_INGRESS_TLS_CERT_FILE``/``_KEY_FILE`` are set.
- ``/metrics``, ``/healthz`` and ``/readyz`` also listen on ``RELAY_INGRESS_METRICS_PORT`` (plain
  HTTP, no credentials) unless that port is the ingress port.
- SIGTERM/SIGINT: stop accepting, let in-flight requests finish, flush the producer.
- SIGHUP: re-read the credentials (environment snapshot + ``RELAY_INGRESS_KEYS_FILE``) and the TLS
  certificate; a file that cannot be used is logged and the previous credentials stay in force.
  (Both through ``audience_relay.signals``, like every long-running command.)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

from audience_relay import signals
from audience_relay.keys import KeysFileError
from audience_relay.settings import Settings
from ingress import metrics
from ingress.app import AUTH, build_app, build_ops_app
from ingress.guard import ConnectionLimits, GuardedSite
from ingress.memory import OPS_MAX_CONNECTIONS, memory_bound

log = logging.getLogger("ingress")

SHUTDOWN_TIMEOUT_SECONDS = 30.0


class TlsError(Exception):
    """The certificate or key cannot be loaded; the message names the files, not their content."""


def load_certificate(context: ssl.SSLContext, settings: Settings) -> None:
    """(Re)load the certificate chain and key into ``context``; new handshakes use them."""
    cert, key = settings.ingress_tls_cert_file, settings.ingress_tls_key_file
    assert cert is not None and key is not None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsError(f"cannot use the TLS certificate {cert} with the key {key}: {exc.reason}") from None
    except OSError as exc:
        raise TlsError(
            f"cannot read the TLS certificate {cert} or key {key}: {exc.strerror or type(exc).__name__}"
        ) from None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context (TLS 1.2+) when a certificate is configured, else None (plain HTTP)."""
    if settings.ingress_tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificate(context, settings)
    return context


@dataclass
class Listeners:
    """The running listeners of one ingress."""

    app: web.Application
    runner: web.AppRunner
    site: GuardedSite
    limits: ConnectionLimits
    ops_runner: web.AppRunner | None
    ops_site: GuardedSite | None
    tls: ssl.SSLContext | None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.site.port}"

    @property
    def ops_url(self) -> str:
        site = self.ops_site or self.site
        return f"{'http' if self.ops_site or not self.tls else 'https'}://127.0.0.1:{site.port}"

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the shutdown timeout), then clean up."""
        await self.runner.cleanup()
        if self.ops_runner is not None:
            await self.ops_runner.cleanup()


async def start_listeners(app: web.Application, settings: Settings) -> Listeners:
    """Serve ``app`` on ``RELAY_INGRESS_HOST:PORT`` (guarded, TLS if configured) and the ops port."""
    tls = tls_context(settings)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        keepalive_timeout=settings.ingress_keepalive_timeout_seconds,
    )
    await runner.setup()
    limits = ConnectionLimits(
        max_connections=settings.ingress_max_connections,
        header_timeout=settings.ingress_header_timeout_seconds,
        retry_after=settings.retry_after_seconds,
        body_timeout=settings.ingress_body_timeout_seconds,
    )
    site = GuardedSite(runner, settings.ingress_host, settings.ingress_port, limits, ssl_context=tls)
    await site.start()
    ops_runner: web.AppRunner | None = None
    ops_site: GuardedSite | None = None
    if settings.ingress_metrics_port != settings.ingress_port:
        ops_runner = web.AppRunner(build_ops_app(app), access_log=None, keepalive_timeout=30.0)
        await ops_runner.setup()
        ops_limits = ConnectionLimits(
            max_connections=OPS_MAX_CONNECTIONS,  # probes and scrapes: a budget of their own
            header_timeout=settings.ingress_header_timeout_seconds,
            retry_after=settings.retry_after_seconds,
            body_timeout=settings.ingress_body_timeout_seconds,
            listener="ops",
        )
        ops_site = GuardedSite(ops_runner, settings.ingress_host, settings.ingress_metrics_port, ops_limits)
        await ops_site.start()
    return Listeners(app, runner, site, limits, ops_runner, ops_site, tls)


def reload_secrets(listeners: Listeners, settings: Settings) -> bool:
    """SIGHUP: swap in the credentials and TLS certificate as they are now; True if all went well."""
    ok = listeners.app[AUTH].try_reload()
    metrics.KEY_RELOADS.labels("ok" if ok else "failed").inc()
    if listeners.tls is not None:
        try:
            load_certificate(listeners.tls, settings)
        except TlsError as exc:
            ok = False
            log.error(
                "TLS certificate not reloaded; the previous one stays in use", extra={"error": str(exc)}
            )
        else:
            log.info("TLS certificate reloaded")
    return ok


async def serve(settings: Settings, *, insecure: bool = False) -> None:
    """Run the ingress until SIGTERM/SIGINT; SIGHUP reloads credentials and certificate."""
    try:
        app = build_app(settings, insecure=insecure)
    except (KeysFileError, ValueError) as exc:  # unusable credentials, or limits that contradict
        raise SystemExit(f"refusing to start: {exc}") from None
    auth = app[AUTH]
    credentials = auth.credentials
    if not credentials.any() and not insecure:
        raise SystemExit(
            "refusing to start: no credentials configured (set RELAY_INGRESS_API_KEYS, RELAY_OAUTH_CLIENTS, "
            "RELAY_SOURCES or RELAY_INGRESS_KEYS_FILE), or pass --insecure to accept unauthenticated requests"
        )
    if auth.allow_anonymous:
        log.warning(
            "running with --insecure and no credential configured: EVERY REQUEST IS ACCEPTED WITHOUT "
            "CREDENTIALS (local use only)"
        )
    elif insecure:
        log.warning("--insecure has no effect: credentials are configured and required")
    try:
        listeners = await start_listeners(app, settings)
    except TlsError as exc:
        raise SystemExit(f"refusing to start: {exc}") from None
    stop = asyncio.Event()
    remove_handlers = signals.install(
        asyncio.get_running_loop(),
        "ingress",
        stop=stop.set,
        reload=lambda: reload_secrets(listeners, settings),
    )
    log.info(
        "ingress listening",
        extra={
            "host": settings.ingress_host,
            "port": listeners.site.port,
            "tls": listeners.tls is not None,
            "metrics_port": listeners.ops_site.port if listeners.ops_site else listeners.site.port,
            # What these settings let the process grow to, whatever clients send (README "Memory").
            "memory_bound_mib": memory_bound(settings) // (1024 * 1024),
            **credentials.summary(),
        },
    )
    try:
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        remove_handlers()
        await listeners.close()


def run_server(settings: Settings, *, insecure: bool = False) -> None:
    """``audience-relay ingress`` (``audience_relay.cli`` defers SIGHUP from the start)."""
    asyncio.run(serve(settings, insecure=insecure))
