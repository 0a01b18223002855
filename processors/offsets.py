"""A guard around faust 0.15's consumer offsets: nothing is read or committed past an unprocessed record.

faust's fetch loop (``Consumer._drain_messages``) takes a record from a fetched batch, may await its
periodic commit, hands the record to the streams (racing a rebalance's flow stop) and then marks its
offset *read* whether or not the hand-off finished. A record fetched before a rebalance's seek back to
the committed offset and handed off after it (reproduced in tests/test_offset_guard.py: the loop held
its record at that commit while a worker joined and left) moves the read offset far ahead of the
seek; every refetched record below it is then dropped as "already read" and never processed. Commits
do not make up for it: faust commits the first run of consecutive acknowledged offsets and declines
only a run that starts *two or more* past the committed offset (nothing at all while no offset is
known, e.g. during the commit a rebalance makes after forgetting the partition's offsets), so one
skipped record per partition is committed over and lost, and a longer skip stalls the commit.

``GuardedConsumer`` plugs in through faust's transport registry (the ``relaykafka://`` broker scheme
selects ``Transport`` below; no faust code is changed or copied) and adds three checks:

1. **hand-off**: the consumer's callback is wrapped so the fetch loop's read mark for a record is
   refused unless its hand-off to the streams finished (a cut hand-off is fetched again);
2. **stale records**: a rebalance (flow stop, seek to the committed offsets) and any seek of a
   partition start a new epoch; a stream record fetched in an older epoch than its partition's is
   neither handed off nor marked read (changelog records are left to faust's table recovery);
3. **commit continuity**: the guard keeps, per partition and across rebalances, the offset the next
   commit must start at and every offset acknowledged from there (faust's own bookkeeping is reset
   at each rebalance). A commit is refused when a record below it was never acknowledged, and the
   partition is sought back to that record, so it is processed (at-least-once: a repeated segment
   event finds its state already applied and emits nothing).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP, Message

from processors import metrics

log = logging.getLogger("processors.offsets")

SCHEME = "relaykafka"


class ReadOffsets(defaultdict[TP, int | None]):
    """faust's per-partition read offsets, refusing the mark of a record whose hand-off did not finish."""

    def __init__(self, consumer: GuardedConsumer) -> None:
        super().__init__(lambda: None)
        self._consumer = consumer

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        if offset is not None and self._consumer.refuse_read_mark(tp, offset):
            return
        super().__setitem__(tp, offset)


class AckLog(list[int]):
    """One partition's list of acknowledged offsets in faust, also reporting each acknowledgement.

    faust appends to this list from ``Consumer.ack`` and, inlined, from its compiled stream iterator,
    so a list is the one place every acknowledgement passes through.
    """

    def __init__(self, on_ack: Callable[[int], None]) -> None:
        super().__init__()
        self._on_ack = on_ack

    def append(self, offset: int) -> None:
        super().append(offset)
        self._on_ack(offset)


class AckedOffsets(defaultdict[TP, list[int]]):
    """faust's ``_acked`` mapping, with an ``AckLog`` per partition."""

    def __init__(self, on_ack: Callable[[TP, int], None]) -> None:
        super().__init__()
        self._on_ack = on_ack

    def __missing__(self, tp: TP) -> list[int]:
        log_ = self[tp] = AckLog(lambda offset: self._on_ack(tp, offset))
        return log_


class GuardedConsumer(AIOKafkaConsumer):
    """faust's aiokafka consumer with the three checks of the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = ReadOffsets(self)
        self._acked = AckedOffsets(self._record_ack)
        self._epoch = 0
        #: The record the fetch loop is handing off, until the hand-off finished.
        self._handing: tuple[TP, int] | None = None
        #: Bumped by a rebalance (flow stop, seek to committed), and per partition by a seek.
        self._tp_epoch: dict[TP, int] = {}
        #: The epochs when the last fetch returned.
        self._fetch_stamp: tuple[int, dict[TP, int]] = (0, {})
        #: (tp, offset, epoch, partition epoch) of the last record the fetch loop was given.
        self._yielded: tuple[TP, int, int, int] | None = None
        #: Per partition: the offset the next commit's acknowledged run must start at ...
        self._expected: dict[TP, int] = {}
        #: ... and the offsets acknowledged from there on.
        self._done: defaultdict[TP, set[int]] = defaultdict(set)
        #: Partitions whose commit was refused, and the offset to seek them back to.
        self._holes: dict[TP, int] = {}
        #: The last seek back per partition: (offset, when).
        self._sought: dict[TP, tuple[int, float]] = {}
        inner = self.callback

        def hand_off(message: Message) -> Awaitable[None]:
            # Runs when the fetch loop *calls* the callback, before anything can cut it.
            key = (message.tp, message.offset)
            self._handing = key
            last = self._yielded
            if last is not None and last[:2] == key and self._stale(key[0], last[2], last[3]):
                metrics.OFFSET_GUARD.labels("stale_record").inc()
                log.info("%s@%d was fetched before a seek: not handed off", _tp(message.tp), message.offset)
                return _nothing()
            return self._deliver(inner, message, key)

        self.callback = hand_off

    async def _deliver(
        self, inner: Callable[[Message], Awaitable[None]], message: Message, key: tuple[TP, int]
    ) -> None:
        await inner(message)
        if self._handing == key:
            self._handing = None

    def refuse_read_mark(self, tp: TP, offset: int) -> bool:
        """True when ``offset`` is the record whose hand-off did not finish (do not mark it read)."""
        if self._handing != (tp, offset):
            return False
        self._handing = None
        metrics.OFFSET_GUARD.labels("cut_hand_off").inc()
        log.warning(
            "hand-off of %s@%d not done (cut by a rebalance, or fetched before a seek): "
            "not marking it read, it will be fetched again",
            _tp(tp),
            offset,
        )
        return True

    # --- epochs: a seek or a flow stop makes the records fetched before it stale ------------------------

    def _stamp(self, tp: TP) -> tuple[int, int]:
        return self._epoch, self._tp_epoch.get(tp, 0)

    def stop_flow(self) -> None:
        self._epoch += 1  # a rebalance begins: every position will be reset
        super().stop_flow()

    async def perform_seek(self) -> None:
        self._epoch += 1
        self._handing = None  # the marks written by a seek are never refused
        await super().perform_seek()
        await self._learn_start_offsets()

    async def seek(self, partition: TP, offset: int) -> None:
        self._tp_epoch[partition] = self._tp_epoch.get(partition, 0) + 1
        self._handing = None
        await super().seek(partition, offset)

    async def seek_wait(self, partitions: Mapping[TP, int]) -> None:
        for tp in partitions:
            self._tp_epoch[tp] = self._tp_epoch.get(tp, 0) + 1
        self._handing = None
        await super().seek_wait(partitions)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        records = await super()._getmany(active_partitions, timeout)
        # Stamped when the records arrive: a seek runs on the consumer's thread like the fetch,
        # so records fetched before a later seek carry the older epoch.
        self._fetch_stamp = (self._epoch, dict(self._tp_epoch))
        return records

    def _stale(self, tp: TP, epoch: int, tp_epoch: int) -> bool:
        # Changelog records are never dropped: faust's table recovery tracks their offsets itself.
        return not self._is_changelog_tp(tp) and (epoch, tp_epoch) != self._stamp(tp)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        async for tp, message in super().getmany(timeout):
            epoch, tp_epochs = self._fetch_stamp
            tp_epoch = tp_epochs.get(tp, 0)
            if self._stale(tp, epoch, tp_epoch):
                continue  # fetched before a seek of its partition: it will be fetched again
            self._yielded = (tp, message.offset, epoch, tp_epoch)
            yield tp, message

    # --- commit continuity --------------------------------------------------------------------------
    #
    # faust forgets a partition's acknowledged and committed offsets when a rebalance starts (before it
    # waits for the records in flight and commits them), so the guard keeps its own: per partition, the
    # offset the next commit must start at, and the offsets acknowledged from there on.

    def _record_ack(self, tp: TP, offset: int) -> None:
        self._done[tp].add(offset)  # pruned below the committed offset at each commit

    async def _learn_start_offsets(self) -> None:
        """After a seek to the committed offsets: where each partition's acknowledged run must start."""
        tps = [tp for tp in self.assignment() if not self._is_changelog_tp(tp)]
        self._expected = {tp: off for tp in tps if (off := self._committed_offset.get(tp)) is not None}
        # Acknowledgements are kept: a record acknowledged before the rebalance was processed, and
        # faust, which remembers it too, will not report it again.
        missing = [tp for tp in tps if tp not in self._expected]
        if missing:  # nothing committed yet: the first record is the log start
            try:
                earliest = await self.earliest_offsets(*missing)
            except Exception:  # unknown start: these partitions go unchecked until their first commit
                log.warning("could not read the partitions' first offsets", exc_info=True)
                return
            self._expected.update({tp: off for tp, off in earliest.items() if off is not None})

    def _processed_up_to(self, tp: TP, start: int) -> int:
        """The first offset from ``start`` on that was neither acknowledged nor a known gap."""
        done = self._done[tp]
        gaps = self._gap.get(tp)
        offset = start
        while offset in done or (gaps and gaps.at(offset)):
            offset += 1
        return offset

    def _new_offset(self, tp: TP) -> int | None:
        expected = self._expected.get(tp)
        limit = None if expected is None else self._processed_up_to(tp, expected)
        acked = self._acked.get(tp)
        if limit is not None and acked and min(acked) > limit:
            # Later records were acknowledged but the one at ``limit`` never was: it was skipped.
            # (faust itself declines this commit only when the skip is two or more records.)
            self._refuse(tp, min(acked), limit)
            return None
        proposed: int | None = super()._new_offset(tp)
        if proposed is not None and limit is not None and proposed > limit:
            self._refuse(tp, proposed, limit)
            return None
        self._holes.pop(tp, None)
        return proposed

    def _refuse(self, tp: TP, proposed: int, limit: int) -> None:
        if self._holes.get(tp) != limit and self._sought.get(tp, (None, 0.0))[0] != limit:
            metrics.OFFSET_GUARD.labels("commit_refused").inc()
            log.warning(
                "refusing to commit %s at %d: offset %d was never processed (read up to %s); seeking back",
                _tp(tp),
                proposed,
                limit,
                self._read_offset.get(tp),
            )
        self._holes[tp] = limit
        return None

    async def commit(self, topics: Iterable[Any] | None = None, start_new_transaction: bool = True) -> bool:
        did_commit: bool = await super().commit(topics, start_new_transaction=start_new_transaction)  # type: ignore[arg-type]
        for tp, committed in list(self._committed_offset.items()):
            if committed is not None and committed > self._expected.get(tp, -1):
                self._expected[tp] = committed
                self._done[tp] = {o for o in self._done[tp] if o >= committed}
        await self._seek_back_holes()
        return did_commit

    async def _seek_back_holes(self) -> None:
        if not self._holes or self.app.rebalancing or not self.flow_active:
            return
        assignment = self.assignment()
        now = time.monotonic()
        for tp, offset in list(self._holes.items()):
            if tp not in assignment:
                del self._holes[tp]
                continue
            if self._sought.get(tp, (None, 0.0))[0] == offset and now - self._sought[tp][1] < 1.0:
                continue  # the last seek back to it is under way
            self._sought[tp] = (offset, now)
            # Everything from the hole on is fetched and acknowledged again: faust must not discard
            # those acknowledgements as already seen.
            index = self._acked_index.get(tp)
            if index:
                index.difference_update([o for o in index if o >= offset])
            acked = self._acked.get(tp)
            if acked:
                acked[:] = [o for o in acked if o < offset]
            metrics.OFFSET_GUARD.labels("seek_back").inc()
            log.warning("seeking %s back to %d to fetch it again", _tp(tp), offset)
            # seek_wait (overridden above: a new epoch for tp) runs in the consumer's thread;
            # faust's plain seek does not, and races the fetch.
            await self.seek_wait({tp: offset})


def _tp(tp: TP) -> str:
    return f"{tp.topic}[{tp.partition}]"


async def _nothing() -> None:
    return None


class Transport(AIOKafkaTransport):
    """faust's aiokafka transport with ``GuardedConsumer``; selected by the ``relaykafka://`` scheme."""

    Consumer = GuardedConsumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
