"""The membership table's local store, read and written one partition at a time.

faust keeps the table: its store (RocksDB, or memory in tests), its changelog (the compacted
``<prefix>.membership`` topic), recovery on assignment and standby copies on other workers. The
membership stage never writes through faust's table API (``table[key] = value`` writes the store
first and the changelog later, with no error surfacing to the caller). It writes the changelog
itself, waits for the broker's acknowledgement, and only then applies the same records to the store
as recovery would (faust's ``apply_changelog_batch`` for the in-memory store), with the changelog
offset of the last. So the local store is always a prefix of the changelog: after a crash nothing in
it needs to be distrusted, and recovery continues from the store's persisted offset.

Reads and writes go to one partition's RocksDB directly. That is the one private name used here
(``Store._db_for_partition``, fenced: tests/test_faust_contract.py fails when it changes): faust's
public reads find the partition from the current stream event, and there is no stream here. A write
is one RocksDB write batch holding the records and the store's persisted offset (under faust's
``Store.offset_key``, which its recovery reads).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from faust.types import TP
from rocksdict import WriteBatch

from audience_relay.partitioner import partition_for
from processors.membership import SEPARATOR


class _Write:
    """A changelog record as the faust event a store's ``apply_changelog_batch`` reads.

    faust reads ``event.message.{topic, partition, tp, offset, key, value}`` (RocksDB store) and
    ``event.key`` / ``event.value`` (memory store); one light object serves as both event and message.
    """

    __slots__ = ("key", "offset", "partition", "topic", "value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes | None) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value

    @property
    def message(self) -> _Write:
        return self

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


class StateStore:
    """Per-partition reads and acknowledged-changelog writes of one faust table."""

    def __init__(self, table: Any, partitions: int) -> None:
        self.table = table
        self.partitions = partitions
        self.topic: str = table.changelog_topic.get_topic_name()

    @property
    def _store(self) -> Any:
        return self.table.data

    def _db(self, partition: int) -> Any | None:
        """The partition's RocksDB (rocksdict ``Rdict``), or None for the in-memory store."""
        store = self._store
        if hasattr(store, "_db_for_partition"):
            return store._db_for_partition(partition)
        return None

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored values of ``keys`` (None where absent), in order."""
        if not keys:
            return []
        db = self._db(partition)
        if db is None:
            data = self._store.data
            return [data.get(key) for key in keys]
        values: list[bytes | None] = db.get(list(keys))
        return values

    def items(self, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of ``partition`` whose key starts with ``prefix``, in key order."""
        db = self._db(partition)
        if db is None:
            data = self._store.data
            for key in sorted(k for k in data if k.startswith(prefix)):
                if self.partition_of(key) == partition and data[key] is not None:
                    yield key, data[key]
            return
        offset_key = getattr(self._store, "offset_key", None)
        for key, value in db.items(from_key=prefix) if prefix else db.items():
            if prefix and not key.startswith(prefix):
                break
            if key != offset_key and value is not None:
                yield key, value

    def partition_of(self, key: bytes) -> int:
        """The partition a state key belongs to (the identifier's partition)."""
        identifier = key.split(SEPARATOR.encode(), 1)[0].decode()
        return partition_for(identifier, self.partitions)

    def apply(self, partition: int, writes: Sequence[tuple[bytes, bytes | None]], last_offset: int) -> None:
        """Apply records already acknowledged in the changelog; ``last_offset`` is the last one's offset.

        The offsets of the earlier records are not needed: the store remembers the greatest offset
        per partition (where recovery continues), and a value is the last write of its key.
        """
        if not writes:
            return
        db = self._db(partition)
        if db is None:
            first = last_offset - len(writes) + 1
            topic = self.topic
            events = [
                _Write(topic, partition, first + i, key, value) for i, (key, value) in enumerate(writes)
            ]
            self.table.apply_changelog_batch(events)
            return
        # What faust's RocksDB ``apply_changelog_batch`` does, in one write: the values and the
        # persisted offset (faust's own key, read back by its recovery) land together or not at all,
        # and no event object is made per record (the worker applies every delivery-log record too).
        batch = WriteBatch(raw_mode=True)
        for key, value in writes:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(self._store.offset_key, str(last_offset).encode())
        db.write(batch)

    def persisted_offset(self, partition: int) -> int | None:
        """The changelog offset of the last record applied to this partition's store (None: none)."""
        offset: int | None = self._store.persisted_offset(TP(self.topic, partition))
        return offset

    def tracks_offsets(self) -> bool:
        """False for the in-memory store, which keeps no persisted offsets."""
        return hasattr(self._store, "_db_for_partition")

    def estimate_keys(self, partition: int) -> int | None:
        """RocksDB's estimate of the partition's key count (free; None when not known)."""
        db = self._db(partition)
        if db is None:
            data = self._store.data
            return sum(1 for key in list(data) if self.partition_of(key) == partition)
        try:
            return int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
        except Exception:  # a partition being closed by a rebalance right now
            return None
