"""Prometheus metrics of the processors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

EVENTS_IN = Counter("relay_processor_records_in_total", "Records consumed", ["agent"])
EVENTS_OUT = Counter("relay_processor_segment_events_total", "Segment events emitted by the split agent")
DEAD_LETTERED = Counter(
    "relay_processor_dead_lettered_total", "Records sent to the dead-letter topic", ["reason"]
)
CHANGES = Counter("relay_processor_changes_total", "Membership flips emitted", ["change"])
LATENCY = Histogram(
    "relay_processor_latency_seconds",
    "From a segment-events record being produced to its membership batch being committed",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

#: (partition label, role, key count) of each table partition this worker holds.
TableKeys = Iterable[tuple[str, str, int]]


class TableKeysCollector(Collector):
    """``relay_processor_table_keys{partition,role}``, read from the table at scrape time.

    Read when scraped (not counted on writes) so that partitions moving to another worker simply
    stop being reported here: no stale series survive a rebalance. RocksDB gives an estimate
    (``rocksdb.estimate-num-keys``), which costs nothing; counting keys would scan the table.
    """

    NAME = "relay_processor_table_keys"
    HELP = "Keys (identifiers) in the membership table per partition held by this worker (estimate)"

    def __init__(self) -> None:
        self._source: Callable[[], TableKeys] | None = None

    def bind(self, source: Callable[[], TableKeys] | None) -> None:
        """Report the key counts ``source()`` returns (one worker app per process)."""
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["partition", "role"])]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["partition", "role"])
        if self._source is not None:
            for partition, role, keys in self._source():
                family.add_metric([partition, role], keys)
        yield family


TABLE_KEYS = TableKeysCollector()
REGISTRY.register(TABLE_KEYS)
