"""Batches over one partition's records: identifier-disjoint, committed in order, described durably.

A ``Window`` holds what a sink knows about one topic-partition from its committed offset on:

- ``pending``: records fetched and not yet in a batch, in offset order;
- ``open``: batches formed and not yet finished (delivered, dead-lettered or filtered), in the order
  they were formed;
- ``done``: offsets above the committed offset that are finished (a batch can finish before an
  older one still in flight).

**Forming.** A batch takes pending records in offset order, up to the batch size, skipping every
record whose identifier (the record key) is in an open batch — and every later record of that
identifier, so one identifier's changes keep their order: they are never in two open batches at
once, and a later one never goes before an earlier one. A batch that is not full waits until its
oldest record has waited the flush interval.

**Committing.** The committed offset is the lowest offset not finished (everything below it is
done). The Kafka commit metadata of the partition describes the rest: the finished offsets above
it and, for every open batch, its offset range and the offsets inside that range it skipped. It is
committed *before* a batch is sent (the engine waits for that), so after a crash or a rebalance the
next owner re-forms every batch that might have been sent with exactly the same records — hence the
same ``Idempotency-Key`` — before it forms any new one, and does not send finished ones again.
The batch boundaries therefore never depend on timing as seen from the destination.

The metadata is small (hex offsets relative to the committed offset) and bounded: a batch skips at
most ``MAX_SKIPS`` records inside its range, and no batch is formed when the description would
exceed ``METADATA_BUDGET`` bytes (Kafka's ``offset.metadata.max.bytes`` defaults to 4096). A batch
that keeps failing therefore holds its partition back once later batches have used that budget: a
destination's answer can delay data, never reorder it.

Format: ``rb1|<done>|<open>``; ``<done>`` is ``start+length`` intervals (hex, relative to the
committed offset) joined by ``,``; ``<open>`` is ``start+length[:skip.skip…]`` per batch joined by
``;`` (skips relative to the batch start).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

TAG = "rb1"
#: Records a batch may skip inside its own offset range (each is listed in the commit metadata).
MAX_SKIPS = 16
#: Largest commit metadata written (bytes); Kafka refuses more than offset.metadata.max.bytes (4096).
METADATA_BUDGET = 3000


class Rec(Protocol):
    """What a window needs of a consumer record."""

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...


@dataclass(eq=False)
class Batch:
    """Records sent together: ``start``/``end`` their offset range, ``skipped`` the offsets inside it
    left to later batches."""

    start: int
    end: int
    skipped: tuple[int, ...] = ()
    records: list[Any] = field(default_factory=list)
    #: Re-formed from the commit metadata after a restart or a rebalance.
    recovered: bool = False
    dispatched: bool = False
    #: Sent and its outcome records handed to the producer: its identifiers are free again, though it
    #: is finished (for the commit) only once those records are acknowledged.
    released: bool = False
    _idents: frozenset[bytes] | None = field(default=None, repr=False)

    def idents(self) -> frozenset[bytes]:
        """The identifiers (record keys) in the batch. Only asked once its records are all there: a
        formed batch at once, a recovered one once its range is fetched (``form`` waits until then)."""
        if self._idents is None:
            self._idents = frozenset(r.key for r in self.records if r.key is not None)
        return self._idents


@dataclass(frozen=True)
class Described:
    """What a commit's metadata said: finished offset intervals and the open batches' shapes."""

    done: tuple[tuple[int, int], ...]
    open: tuple[tuple[int, int, tuple[int, ...]], ...]


class Intervals:
    """A set of offsets as sorted, disjoint, non-adjacent ``[start, end)`` intervals."""

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self.spans: list[tuple[int, int]] = []
        for a, b in spans:
            self.add_span(a, b)

    def add_span(self, a: int, b: int) -> None:
        if b <= a:
            return
        merged: list[tuple[int, int]] = []
        placed = False
        for s, e in self.spans:
            if e < a or s > b:  # disjoint and not touching
                if s > b and not placed:
                    merged.append((a, b))
                    placed = True
                merged.append((s, e))
            else:
                a, b = min(a, s), max(b, e)
        if not placed:
            merged.append((a, b))
        self.spans = sorted(merged)

    def add_offsets(self, offsets: Iterable[int]) -> None:
        run: list[int] = []
        for o in sorted(offsets):
            if run and o == run[-1] + 1:
                run.append(o)
                continue
            if run:
                self.add_span(run[0], run[-1] + 1)
            run = [o]
        if run:
            self.add_span(run[0], run[-1] + 1)

    def __contains__(self, offset: int) -> bool:
        return any(s <= offset < e for s, e in self.spans)

    def trim(self, base: int) -> None:
        """Forget everything below ``base``."""
        self.spans = [(max(s, base), e) for s, e in self.spans if e > base]


def encode(base: int, done: Sequence[tuple[int, int]], open_batches: Sequence[Batch]) -> str:
    """The commit metadata of a window whose committed offset is ``base``."""
    done_text = ",".join(f"{s - base:x}+{e - s:x}" for s, e in done)
    parts = []
    for b in open_batches:
        text = f"{b.start - base:x}+{b.end - b.start:x}"
        if b.skipped:
            text += ":" + ".".join(f"{k - b.start:x}" for k in b.skipped)
        parts.append(text)
    return f"{TAG}|{done_text}|{';'.join(parts)}"


def decode(text: str | None, base: int) -> Described | None:
    """The description in commit metadata written by ``encode``; ``None`` when there is none or it is
    not ours (an empty string, another format): the partition then starts with nothing open."""
    if not text or not text.startswith(TAG + "|"):
        return None
    try:
        _, done_text, open_text = text.split("|")
        done = []
        for item in filter(None, done_text.split(",")):
            start, length = item.split("+")
            s = base + int(start, 16)
            done.append((s, s + int(length, 16)))
        described = []
        for item in filter(None, open_text.split(";")):
            shape, _, skips = item.partition(":")
            start, length = shape.split("+")
            s = base + int(start, 16)
            skipped = tuple(s + int(k, 16) for k in filter(None, skips.split(".")))
            described.append((s, s + int(length, 16), skipped))
    except ValueError:
        return None
    return Described(tuple(done), tuple(described))


class Window:
    """One partition's records from the committed offset on, and the batches formed over them."""

    def __init__(self, start: int | None, described: Described | None = None) -> None:
        #: The committed offset (everything below is finished); None until the first record shows it.
        self.base = start
        #: Records below this were seen already (a refetch after a seek is ignored).
        self.next_offset = start
        self.pending: deque[tuple[Any, float]] = deque()
        self.open: list[Batch] = []
        self.done = Intervals()
        #: Bumped on every change of what ``position`` returns; the engine commits versions.
        self.version = 0
        self.committed_version = -1
        if described is not None:
            self.done = Intervals(described.done)
            self.open = [Batch(s, e, skipped, recovered=True) for s, e, skipped in described.open]

    # --- records in ----------------------------------------------------------------------

    def add(self, records: Iterable[Rec], now: float) -> int:
        """Take fetched records; returns how many were finished before (delivered by an earlier owner)."""
        skipped_done = 0
        for r in records:
            if self.next_offset is not None and r.offset < self.next_offset:
                continue
            if self.base is None:
                self.base = r.offset
            self.next_offset = r.offset + 1
            if r.offset in self.done:
                skipped_done += 1
                continue
            owner = self._recovered_owner(r.offset)
            if owner is not None:
                owner.records.append(r)
            else:
                self.pending.append((r, now))
        if skipped_done:
            before = self.base
            self._advance()
            if self.base != before:
                self.version += 1
        return skipped_done

    def _recovered_owner(self, offset: int) -> Batch | None:
        for b in self.open:
            if b.recovered and b.start <= offset < b.end and offset not in b.skipped:
                return b
        return None

    # --- batches out ---------------------------------------------------------------------

    def recovering(self) -> bool:
        """True while batches re-formed from the metadata are not all finished: no new batch until then."""
        return any(b.recovered for b in self.open)

    def ready_recovered(self) -> list[Batch]:
        """Re-formed batches whose whole range has been fetched and that were not handed out yet."""
        out = []
        for b in self.open:
            if (
                b.recovered
                and not b.dispatched
                and self.next_offset is not None
                and self.next_offset >= b.end
            ):
                b.dispatched = True
                out.append(b)
        return out

    def form(
        self, batch_size: int, max_open: int, flush_seconds: float, now: float
    ) -> tuple[list[Batch], float | None]:
        """New batches (and when to look again for a batch that is not due yet, if any)."""
        out: list[Batch] = []
        if self.base is None or self.recovering():
            return out, None
        busy: set[bytes] = set()
        active = 0
        for b in self.open:
            if not b.released:
                busy |= b.idents()
                active += 1
        while self.pending and active < max_open:
            taken, skipped, cut = self._candidate(batch_size, busy)
            if not taken:
                return out, None  # every pending identifier is busy: a finishing batch wakes us
            due = taken[0][1] + flush_seconds
            if len(taken) < batch_size and not cut and now < due:
                return out, due
            batch = Batch(taken[0][0].offset, taken[-1][0].offset + 1, skipped, [r for r, _ in taken])
            if len(encode(self.base, self.done.spans, [*self.open, batch])) > METADATA_BUDGET:
                return out, None  # the window is as wide as its description may be
            self._remove_pending(taken)
            self.open.append(batch)
            busy |= batch.idents()
            active += 1
            self.version += 1
            out.append(batch)
        return out, None

    def _candidate(
        self, batch_size: int, busy: set[bytes]
    ) -> tuple[list[tuple[Any, float]], tuple[int, ...], bool]:
        taken: list[tuple[Any, float]] = []
        skipped: list[int] = []
        tail: list[int] = []  # skipped after the last taken record: inside the range only if one follows
        blocked: set[bytes] = set()
        for rec, at in self.pending:
            key = rec.key
            if key is not None and (key in busy or key in blocked):
                blocked.add(key)
                if taken:
                    tail.append(rec.offset)
                    if len(skipped) + len(tail) > MAX_SKIPS:
                        return taken, tuple(skipped), True
                continue
            skipped.extend(tail)
            tail = []
            taken.append((rec, at))
            if len(taken) >= batch_size:
                break
        return taken, tuple(skipped), False

    def _remove_pending(self, taken: list[tuple[Any, float]]) -> None:
        n = len(taken)
        if all(self.pending[i][0] is taken[i][0] for i in range(n)):
            for _ in range(n):
                self.pending.popleft()
            return
        gone = {rec.offset for rec, _ in taken}
        self.pending = deque(p for p in self.pending if p[0].offset not in gone)

    def release(self, batch: Batch) -> None:
        """``batch`` was sent and its outcome records are on their way (in order, per key): a later
        change of its identifiers may go now; its offsets are done only with ``finish``."""
        batch.released = True

    def finish(self, batch: Batch) -> None:
        """``batch`` was delivered, dead-lettered or filtered: its offsets are done."""
        self.open.remove(batch)
        self.done.add_offsets(r.offset for r in batch.records)
        batch.records = []
        self._advance()
        self.version += 1

    def _advance(self) -> None:
        if self.next_offset is None:
            return
        lowest = self.next_offset
        if self.pending:
            lowest = min(lowest, self.pending[0][0].offset)
        for b in self.open:
            lowest = min(lowest, b.start)
        self.base = lowest
        self.done.trim(lowest)

    def position(self) -> tuple[int, str] | None:
        """(offset to commit, its metadata), or None before the offset is known."""
        if self.base is None:
            return None
        return self.base, encode(self.base, self.done.spans, self.open)

    def records_pending(self) -> int:
        return len(self.pending)
