"""Prometheus metrics of the ingress."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("relay_ingress_requests_total", "Webhook requests answered", ["route", "status", "source"])
BODY_BYTES = Histogram(
    "relay_ingress_body_bytes",
    "Size of accepted request bodies",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216),
)
LATENCY = Histogram(
    "relay_ingress_request_seconds",
    "Time from request start to answer",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INFLIGHT_BYTES = Gauge(
    "relay_ingress_inflight_bytes", "Bytes of bodies read but not yet acknowledged by Kafka"
)
PRODUCER_ERRORS = Counter(
    "relay_ingress_producer_errors_total", "Records Kafka did not acknowledge", ["topic"]
)
CONNECTIONS_OPEN = Gauge("relay_ingress_connections_open", "Client connections open", ["listener"])
CONNECTIONS_REFUSED = Counter(
    "relay_ingress_connections_refused_total",
    "Connections answered 503 (or closed) because the listener was at its connection cap",
    ["listener"],
)
TIMEOUTS = Counter(
    "relay_ingress_timeouts_total",
    "Connections cut because a request head or body did not arrive in time",
    ["phase"],
)
RATE_LIMITED = Counter(
    "relay_ingress_rate_limited_total", "Requests answered 429 by the per-source rate limit", ["source"]
)
KEY_RELOADS = Counter("relay_ingress_key_reloads_total", "Credential reloads (SIGHUP)", ["outcome"])
BROKER_REACHABLE = Gauge(
    "relay_ingress_kafka_reachable",
    "1 while the ingress accepts webhooks; 0 while Kafka is known to be away (answered 503 at once) "
    "or not yet connected",
)
