"""How much memory the ingress may use, from its settings alone (README "Memory").

Memory is bounded by the settings, not by the clients. Every byte a client can make the ingress
hold falls in one of these terms, each capped by a setting or a constant:

- bodies in flight (read, not yet acknowledged by Kafka): at most ``RELAY_MAX_INFLIGHT_BYTES``,
  reserved before they are read (``ingress.app``); each such byte exists about three times while
  the broker has not answered: the body, the producer's batch and the encoded produce request;
- the one body being checked (the event loop checks one at a time): its bytes joined from the
  chunks read, and the Python objects of its JSON, which for a body of tiny objects (``[{},{},…]``)
  reach ~29 bytes per byte of body: at most ``CHECK_FACTOR * RELAY_MAX_BODY_BYTES``;
- every open connection (``RELAY_INGRESS_MAX_CONNECTIONS`` on the webhook port,
  ``OPS_MAX_CONNECTIONS`` on the operations port): a head of at most ``MAX_HEAD_BYTES``, at most
  ``MAX_PIPELINED_BYTES`` sent ahead, aiohttp's read buffers, at most ``TOKEN_BODY_LIMIT`` of a
  token request, and what one read (256 KiB) can bring in with the end of a body: measured at
  ≤ 190 KiB under the worst shapes found, counted as ``PER_CONNECTION_BYTES``; with the ingress
  serving TLS itself, asyncio's TLS layer adds its own read buffers (≤ 600 KiB measured per
  connection in all, counted as ``PER_TLS_CONNECTION_BYTES``);
- the process itself (interpreter, libraries, producer, allocator slack): ``FIXED_BYTES``.
"""

from __future__ import annotations

from audience_relay.settings import Settings

MiB = 1024 * 1024

#: The process itself; ~60 MiB measured after start and a few requests.
FIXED_BYTES = 96 * MiB
#: Copies of each byte in flight: the body, the producer's batch, the encoded produce request.
INFLIGHT_FACTOR = 3
#: The one body being checked: its join and its JSON's Python objects (29x measured, worst shape).
CHECK_FACTOR = 32
#: One open connection (190 KiB measured: a big partial head, pipelined requests, an unread body).
PER_CONNECTION_BYTES = 256 * 1024
#: One open TLS connection on the webhook port (591 KiB measured: an unread body over TLS).
PER_TLS_CONNECTION_BYTES = 768 * 1024
#: Connections the operations port (probes, scrapes) accepts, apart from webhook clients.
OPS_MAX_CONNECTIONS = 64


def memory_bound(settings: Settings) -> int:
    """The most resident memory (bytes) an ingress with ``settings`` reaches, whatever clients send."""
    webhook = PER_TLS_CONNECTION_BYTES if settings.ingress_tls_cert_file else PER_CONNECTION_BYTES
    ops = OPS_MAX_CONNECTIONS if settings.ingress_metrics_port != settings.ingress_port else 0
    return (
        FIXED_BYTES
        + INFLIGHT_FACTOR * settings.max_inflight_bytes
        + CHECK_FACTOR * settings.max_body_bytes
        + webhook * settings.ingress_max_connections
        + PER_CONNECTION_BYTES * ops
    )
