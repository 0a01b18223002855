"""Prometheus metrics of the sinks."""

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter(
    "relay_sink_deliveries_total",
    "Requests by destination and final answer: delivered, dead_lettered (one change refused: it is "
    "dead-lettered) or split (several refused: the batch is halved)",
    ["destination", "outcome"],
)
RECORDS = Counter(
    "relay_sink_records_total",
    "Changes by destination and outcome: delivered, dead_lettered (refused or unreadable), filtered "
    "(audience lists), unknown_identifier (dead-lettered: the identifier to send is missing)",
    ["destination", "outcome"],
)
INFLIGHT = Gauge("relay_sink_inflight_requests", "Requests to the destination in flight now", ["destination"])
RETRIES = Counter("relay_sink_retries_total", "Delivery attempts that will be retried", ["destination"])
BATCH_SIZE = Histogram(
    "relay_sink_batch_size",
    "Changes per delivered batch",
    ["destination"],
    buckets=(1, 10, 50, 100, 300, 1000),
)
LATENCY = Histogram(
    "relay_sink_delivery_seconds",
    "From a batch being formed to it being delivered or given up (retries included)",
    ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PAUSED_SECONDS = Counter("relay_sink_paused_seconds_total", "Time partitions spent paused", ["destination"])
PAUSED_PARTITIONS = Gauge(
    "relay_sink_paused_partitions", "Partitions paused now (destination behind)", ["destination"]
)
