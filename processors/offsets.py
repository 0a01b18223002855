"""A guard around faust 0.15's consumer offsets: nothing is read or committed past an unprocessed record.

faust's fetch loop (``Consumer._drain_messages``) takes a record from a fetched batch, may await its
periodic commit, hands the record to the streams (racing a rebalance's flow stop) and then marks its
offset *read* whether or not the hand-off finished. A record fetched before a rebalance's seek back to
the committed offset and handed off after it (reproduced in tests/test_offset_guard.py: the loop held
its record at that commit while a worker joined and left) moves the read offset far ahead of the
seek; every refetched record below it is then dropped as "already read" and never processed. Commits
do not make up for it: faust commits the first run of consecutive acknowledged offsets and declines
only a run that starts *two or more* past the committed offset, so one skipped record per partition is
committed over and lost, and a longer skip stalls the partition's commit.

``GuardedConsumer`` plugs in through faust's transport registry (the ``relaykafka://`` broker scheme
selects ``Transport`` below; no faust code is changed or copied) and adds three checks:

1. **rewind**: after any seek of a stream partition to offset H (a rebalance's seek to the committed
   offsets, or the guard's own seek back), the read offset cannot move past H until the record at H
   itself was read. A record fetched before the seek and handed off after it is still processed (at
   least once), but its read mark is refused, so the refetched records are not dropped.
2. **commit continuity**: the guard keeps, per partition and across rebalances, the offset the next
   commit must start at and every offset acknowledged from there (faust's own bookkeeping is reset at
   each rebalance and treats "gaps" as processed). It commits only up to the first offset never
   acknowledged. A timer (independent of acknowledgements and of faust's commit) looks for such a
   *hole* below an acknowledged offset and seeks the partition back to it, again every
   ``RETRY_SECONDS`` until the hole is processed, so a partition can never stay stalled on it
   (at-least-once: a repeated segment event finds its state already applied and emits nothing).

3. **give back**: faust's ``getmany`` takes a batch from aiokafka and drops the rest of it when the
   flow stops or the generation changes, and every record of a partition that left its active set in
   the meantime (at the end of a table recovery it does so for records of the stream partitions it is
   about to resume). aiokafka's position is past them, so they would never come again: the guard
   seeks each such partition back to its first record not handed on, and a seek to the committed
   offsets also seeks partitions *without* a committed offset (aiokafka leaves them where they are)
   to their first offset. Found with ``audience-relay partitions apply``: after 4 → 12 the new
   partitions had no committed offset, and the restarted worker never processed them.

(processors/flow.py repairs a fourth fault, faust emptying the streams' queues after it resumed them.)

(An earlier version also dropped records by "epoch" in the fetch loop; a record dropped there after
a seek whose position was already past it was never fetched again and stalled its partition.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from faust.transport.drivers import TRANSPORTS
from faust.types import TP
from mode import Service

# faust's aiokafka consumer and transport, with clients guarded against broker outages.
from audience_relay.faustguard import Consumer as AIOKafkaConsumer
from audience_relay.faustguard import Transport as AIOKafkaTransport
from processors import metrics

log = logging.getLogger("processors.offsets")

SCHEME = "relaykafka"
#: How often the guard looks for holes (faust's default commit interval).
CHECK_SECONDS = 2.8
#: A seek back to a hole that is still not processed after this long is done again.
RETRY_SECONDS = 10.0
#: At most one log line per partition this often for refused read marks.
LOG_EVERY_SECONDS = 10.0


class ReadOffsets(defaultdict[TP, int | None]):
    """faust's per-partition read offsets, refusing a mark past a pending rewind (see the docstring)."""

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


def first_unprocessed(done: set[int], start: int) -> int:
    """The first offset from ``start`` on that is not in ``done``."""
    offset = start
    while offset in done:
        offset += 1
    return offset


def find_hole(done: set[int], start: int) -> int | None:
    """The first unprocessed offset from ``start`` when a later offset was processed, else None."""
    limit = first_unprocessed(done, start)
    return limit if done and max(done) > limit else None


def not_handed_on(fetched: Mapping[TP, list[int]], handed: Mapping[TP, int]) -> dict[TP, int]:
    """Per partition, the first fetched offset after the last one handed on (all handed: left out)."""
    back: dict[TP, int] = {}
    for tp, offsets in fetched.items():
        last = handed.get(tp)
        rest = [offset for offset in offsets if last is None or offset > last]
        if rest:
            back[tp] = rest[0]
    return back


class GuardedConsumer(AIOKafkaConsumer):
    """faust's aiokafka consumer with the checks of the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = ReadOffsets(self)
        self._acked = AckedOffsets(self._record_ack)
        self._loop_thread = threading.get_ident()
        #: Per stream partition: the offset it was sought to, until the record there was read.
        self._rewind: dict[TP, int] = {}
        #: True while a seek to the committed offsets is under way: no stream read mark is taken.
        self._seeking = False
        #: Per partition: refused read marks since the last log line, and when that was.
        self._refused: dict[TP, tuple[int, float]] = {}
        #: Per partition: the offset the next commit must start at ...
        self._expected: dict[TP, int] = {}
        #: ... and the offsets acknowledged from there on.
        self._done: defaultdict[TP, set[int]] = defaultdict(set)
        #: The last seek back per partition: (offset, when, attempts).
        self._sought: dict[TP, tuple[int, float, int]] = {}
        #: The batch faust's fetch loop is handing on (aiokafka records by partition).
        self._fetched: Mapping[Any, list[Any]] = {}

    # --- rewind: no read mark past a seek's offset until the record there was read ------------------

    def refuse_read_mark(self, tp: TP, offset: int) -> bool:
        """True when the read mark ``offset`` of ``tp`` must not be taken (see the module docstring)."""
        if threading.get_ident() != self._loop_thread:
            return False  # the seek's own mark, written in the consumer's thread
        if self._is_changelog_tp(tp):
            return False  # faust's table recovery tracks changelog offsets itself
        if self._seeking:
            self._note_refused(tp, offset, "a seek to the committed offsets is under way")
            return True
        rewind = self._rewind.get(tp)
        if rewind is None:
            return False
        if offset <= rewind:
            del self._rewind[tp]  # the record at the seek's offset was read: normal reading again
            return False
        self._note_refused(tp, offset, f"fetched before the seek to {rewind}")
        return True

    def _note_refused(self, tp: TP, offset: int, why: str) -> None:
        metrics.OFFSET_GUARD.labels("read_mark_refused").inc()
        count, last = self._refused.get(tp, (0, 0.0))
        now = time.monotonic()
        if now - last >= LOG_EVERY_SECONDS:
            log.info(
                "not marking %s@%d read (%s; %d more refused since the last line): "
                "it is processed, and the records from the seek on are fetched again",
                _tp(tp),
                offset,
                why,
                count,
            )
            self._refused[tp] = (0, now)
        else:
            self._refused[tp] = (count + 1, last)

    async def perform_seek(self) -> None:
        self._seeking = True
        try:
            await super().perform_seek()
            uncommitted = await self._learn_start_offsets()
            # aiokafka's seek to committed offsets leaves a partition without one where it is: records
            # faust took from it and dropped (see _give_back) would never come again. Its committed
            # offset is, in effect, its first offset.
            start = {tp: self._expected[tp] for tp in uncommitted if tp in self._expected}
            if start:
                await self.seek_wait(start)
            # Every stream partition was sought to its committed offset (or, with none, to its start).
            self._rewind = dict(self._expected)
        finally:
            self._seeking = False

    # --- give back: records taken from aiokafka and not handed on are fetched again ----------------

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        records, active = await super()._wait_next_records(timeout)
        self._fetched = records or {}
        return records, active

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        # faust's getmany drops the rest of a fetched batch when the flow stops or the generation
        # changes, and every record of a partition that left the active set meanwhile; aiokafka's
        # position is past them all the same.
        self._fetched = {}
        handed: dict[TP, int] = {}
        async for tp, message in super().getmany(timeout):
            handed[tp] = message.offset
            yield tp, message
        await self._give_back(self._fetched, handed)

    async def _give_back(self, fetched: Mapping[Any, list[Any]], handed: Mapping[TP, int]) -> None:
        """Seek each stream partition back to the first record faust fetched but did not hand on."""
        if self.app.rebalancing or not self.flow_active or self.should_stop:
            # The rebalance under way ends with a seek of every partition to its committed offset
            # (perform_seek above, which also covers partitions without one).
            return
        # Records come in offset order: a partition has records left over only when its last one is
        # past the last handed on, which is rare, so only those partitions are looked at closely.
        left = {
            tp: [r.offset for r in records]
            for tp, records in fetched.items()
            if records and records[-1].offset > handed.get(tp, -1) and not self._is_changelog_tp(tp)
        }
        if not left:
            return
        assigned = self.assignment()
        back = {tp: offset for tp, offset in not_handed_on(left, handed).items() if tp in assigned}
        if not back:
            return
        metrics.OFFSET_GUARD.labels("give_back").inc(len(back))
        log.info(
            "fetched records were not handed to the streams: seeking back to them (%s)",
            ", ".join(f"{_tp(tp)}@{offset}" for tp, offset in sorted(back.items())),
        )
        await self.seek_wait(back)

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)  # faust's own read mark (no await after it)
        if not self._is_changelog_tp(partition):
            self._rewind[partition] = offset

    async def seek_wait(self, partitions: Mapping[TP, int]) -> None:
        # Before the seek: a mark the fetch loop takes meanwhile comes from a record fetched before it.
        for tp, offset in partitions.items():
            if not self._is_changelog_tp(tp):
                self._rewind[tp] = offset
        await super().seek_wait(partitions)

    # --- commit continuity --------------------------------------------------------------------------
    #
    # faust forgets a partition's acknowledged and committed offsets when a rebalance starts (before it
    # waits for the records in flight and commits them), so the guard keeps its own: per partition, the
    # offset the next commit must start at, and the offsets acknowledged from there on.

    def _record_ack(self, tp: TP, offset: int) -> None:
        self._done[tp].add(offset)  # pruned below the committed offset at each commit

    async def _learn_start_offsets(self) -> list[TP]:
        """After a seek to the committed offsets: where each partition's acknowledged run must start.

        Returns the stream partitions without a committed offset.
        """
        tps = [tp for tp in self.assignment() if not self._is_changelog_tp(tp)]
        self._expected = {tp: off for tp in tps if (off := self._committed_offset.get(tp)) is not None}
        # Acknowledgements are kept: a record acknowledged before the rebalance was processed.
        missing = [tp for tp in tps if tp not in self._expected]
        if missing:  # nothing committed yet: the first record is the log start
            try:
                earliest = await self.earliest_offsets(*missing)
            except Exception:  # unknown start: faust's own commit rule until the first commit
                log.warning("could not read the partitions' first offsets", exc_info=True)
                return missing
            self._expected.update({tp: off for tp, off in earliest.items() if off is not None})
        return missing

    def _new_offset(self, tp: TP) -> int | None:
        expected = self._expected.get(tp)
        if expected is None or self._is_changelog_tp(tp):
            proposed: int | None = super()._new_offset(tp)
            return proposed
        # The guard's own bookkeeping decides; faust's lists would only grow (and its "gaps" would
        # count skipped records as processed: the input topics are neither compacted nor transactional).
        self._acked[tp].clear()
        self._acked_index.pop(tp, None)
        self._gap.pop(tp, None)
        limit = first_unprocessed(self._done[tp], expected)
        committed = self._committed_offset.get(tp)
        if limit > expected and (committed is None or limit > committed):
            return limit
        return None

    async def commit(self, topics: Iterable[Any] | None = None, start_new_transaction: bool = True) -> bool:
        did_commit: bool = await super().commit(topics, start_new_transaction=start_new_transaction)  # type: ignore[arg-type]
        for tp, committed in list(self._committed_offset.items()):
            if committed is not None and committed > self._expected.get(tp, -1):
                self._expected[tp] = committed
                self._done[tp] = {o for o in self._done[tp] if o >= committed}
        return did_commit

    @Service.timer(CHECK_SECONDS)
    async def _check_holes(self) -> None:
        """Seek each partition with a hole back to it; again while the hole stays unprocessed."""
        if self.app.rebalancing or not self.flow_active or self.should_stop:
            return
        now = time.monotonic()
        for tp in self.assignment():
            if self._is_changelog_tp(tp) or (expected := self._expected.get(tp)) is None:
                continue
            hole = find_hole(self._done[tp], expected)
            if hole is None:
                self._sought.pop(tp, None)
                continue
            offset, when, attempts = self._sought.get(tp, (-1, 0.0, 0))
            if offset == hole and now - when < RETRY_SECONDS:
                continue  # the last seek back to it is under way
            attempts = attempts + 1 if offset == hole else 1
            self._sought[tp] = (hole, now, attempts)
            metrics.OFFSET_GUARD.labels("seek_back").inc()
            log.warning(
                "%s@%d was never processed though %d later records were (read up to %s, committed %s): "
                "seeking back to it (attempt %d)",
                _tp(tp),
                hole,
                sum(1 for o in self._done[tp] if o > hole),
                self._read_offset.get(tp),
                self._committed_offset.get(tp),
                attempts,
            )
            # seek_wait runs in the consumer's thread (faust's plain seek does not, and races the
            # fetch) and sets the read offset to the hole; the rewind keeps it there.
            await self.seek_wait({tp: hole})


def _tp(tp: TP) -> str:
    return f"{tp.topic}[{tp.partition}]"


class Transport(AIOKafkaTransport):
    """faust's aiokafka transport with ``GuardedConsumer``; selected by the ``relaykafka://`` scheme."""

    Consumer = GuardedConsumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
