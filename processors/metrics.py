"""Prometheus metrics of the processors."""

from prometheus_client import Counter, Histogram

EVENTS_IN = Counter("relay_processor_records_in_total", "Records consumed", ["agent"])
EVENTS_OUT = Counter("relay_processor_segment_events_total", "Segment events emitted by the split agent")
DEAD_LETTERED = Counter(
    "relay_processor_dead_lettered_total", "Records sent to the dead-letter topic", ["reason"]
)
CHANGES = Counter("relay_processor_changes_total", "Membership flips emitted", ["change"])
LATENCY = Histogram(
    "relay_processor_latency_seconds",
    "From a segment event being produced to its membership batch being applied",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OFFSET_GUARD = Counter(
    "relay_processor_offset_guard_total",
    "Times the offset guard stopped faust from reading or committing past an undelivered record",
    ["action"],
)
