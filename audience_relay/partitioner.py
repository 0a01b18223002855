"""Where a key lives: the one key partitioner of the relay.

Every record the relay keys (segment events, changes, the membership topic, the table's changelog)
is placed by the Kafka producer's default partitioner, so the membership queries, the partition
tool and the benchmarks must compute the very same partition.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(key: bytes | str, partitions: int) -> int:
    """The partition the default partitioner (aiokafka's and Java's) picks for ``key``.

    A ``str`` key is hashed as its UTF-8 bytes, which is how the relay produces identifiers.
    """
    raw = key.encode() if isinstance(key, str) else key
    hashed: int = murmur2(raw)
    return (hashed & 0x7FFFFFFF) % partitions
