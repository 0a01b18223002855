"""Where a key lives: the one key partitioner of the relay.

Every record about an identifier (segment events, changes, field changes, the membership topic,
which is also the table's changelog) is placed by the Kafka producer's default partitioner applied
to the identifier, so one identifier's records share a partition number in every topic, and the
split, the membership queries, the partition tool and the benchmarks compute the very same one.
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
