"""Bounded metadata retries for aiokafka clients: the one place that reaches into aiokafka's internals.

Why. When partitions have no leader (a broker stopping gracefully hands its leadership away first)
aiokafka 0.14's producer sender and consumer fetcher each ask for a metadata update and wait for
it, in a loop. Every update fails at once while the broker refuses connections, so the loop spins:
a whole core and thousands of ``Unable connect to node …`` / ``Unable to update metadata …`` lines
a second (issue 15; upstream aio-libs/aiokafka#1155 is the fetch side of the same missing backoff).
No setting bounds it: ``retry_backoff_ms`` is not applied to these updates and
``metadata_max_age_ms`` only sets the periodic refresh.

What. ``guard(client_owner)`` makes the client of a producer, consumer or admin client space its
metadata requests: the same request no sooner than ``min_interval`` after the previous one, and
after failures no sooner than an exponential backoff (``base`` doubling up to ``cap``). Every
caller of ``force_metadata_update`` waits on the one update in progress, so each of those loops
turns at most once per interval. A new set of topics is asked for at once (start-up, subscription
changes), unless the broker is failing.

Producers, too: a record handed to a guarded producer never expires in its queue. aiokafka 0.14
drops a batch whose partition has had no leader for ``request_timeout_ms`` — and an idempotent
producer has already numbered it when it leaves the queue to be dropped, so the broker then refuses
every later batch of that partition as ``OutOfOrderSequenceNumber``, for good (seen here: the
ingress answered 503 forever after a 30 s graceful broker stop). Unexpired, the batch waits for a
leader like any retried batch of an idempotent producer already does; callers bound their own wait
(the ingress's produce timeout) and a shutdown bounds its flush.

Fence. This relies on these facts of aiokafka 0.14 (pinned ``>=0.14,<0.15`` in pyproject.toml;
``requirements.lock`` has the exact version), checked by ``tests/test_kafkaguard.py`` without a broker:
every metadata request of a client goes through ``AIOKafkaClient._metadata_update(cluster, topics)``
returning True/False; the background synchronizer keeps the update future pending while that runs
(so ``force_metadata_update`` callers wait for it); the consumer and admin client keep their client
in ``_client`` (the producer's ``client`` is public); a producer's batches take their time to live
from ``_message_accumulator._batch_ttl``. The guard swaps the client's class for a subclass that only
overrides ``_metadata_update`` and sets that one number — no other aiokafka code is changed. Drop
it when upstream backs off and renumbers (or keeps) expired batches.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

#: aiokafka's own retry backoff for every client (fetch, coordinator and produce retries), in ms:
#: aiokafka's default of 100 ms means ten log lines a second per loop while a broker is away.
RETRY_BACKOFF_MS = 250
#: Metadata requests: the same request at most this often when it succeeds (leaderless partitions
#: on a live broker), and the first wait after a failure (seconds).
METADATA_MIN_INTERVAL_S = 0.25
#: The longest wait between metadata requests while they keep failing: also the longest a client
#: takes to notice that the broker is back (seconds).
METADATA_BACKOFF_CAP_S = 2.0


@dataclass
class MetadataBackoff:
    """When the next metadata request may go out (pure state; times from the event loop's clock)."""

    min_interval: float = METADATA_MIN_INTERVAL_S
    cap: float = METADATA_BACKOFF_CAP_S
    failures: int = 0
    last_topics: frozenset[str] | None = None
    last_at: float = field(default=-math.inf)

    def delay(self, topics: frozenset[str], now: float) -> float:
        """Seconds to wait before asking for ``topics``'s metadata at ``now`` (0: ask at once)."""
        if self.failures:
            wait = min(self.cap, self.min_interval * 2.0 ** (self.failures - 1))
        elif topics == self.last_topics:
            wait = self.min_interval
        else:
            return 0.0
        return max(0.0, self.last_at + wait - now)

    def record(self, topics: frozenset[str], ok: bool, now: float) -> None:
        """Note the outcome of the request for ``topics`` that ended at ``now``."""
        self.failures = 0 if ok else self.failures + 1
        self.last_topics = topics
        self.last_at = now


class BackoffClient(AIOKafkaClient):  # type: ignore[misc]
    """``AIOKafkaClient`` whose metadata requests follow a ``MetadataBackoff``.

    Installed on an existing client by ``guard`` (aiokafka builds its clients inside the producer,
    consumer and admin constructors), so it adds no ``__init__``: its state is ``_relay_backoff``.
    """

    _relay_backoff: MetadataBackoff

    async def _metadata_update(self, cluster_metadata: Any, topics: Any) -> bool:
        backoff = self._relay_backoff
        wanted = frozenset(topics or ())
        loop = asyncio.get_running_loop()
        wait = backoff.delay(wanted, loop.time())
        if wait > 0:
            # Every force_metadata_update caller waits on this update meanwhile: the backoff itself.
            await asyncio.sleep(wait)
        ok = bool(await super()._metadata_update(cluster_metadata, topics))
        backoff.record(wanted, ok, loop.time())
        return ok


def guard_client(
    client: AIOKafkaClient,
    *,
    min_interval: float = METADATA_MIN_INTERVAL_S,
    cap: float = METADATA_BACKOFF_CAP_S,
) -> AIOKafkaClient:
    """Make ``client`` back off between metadata requests (see the module docstring); returns it."""
    if type(client) is not BackoffClient:
        if type(client) is not AIOKafkaClient:
            raise TypeError(f"cannot guard a {type(client).__name__}: only aiokafka's own client")
        client.__class__ = BackoffClient
    client._relay_backoff = MetadataBackoff(min_interval=min_interval, cap=cap)
    return client


Owner = TypeVar("Owner", AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient)


def guard(owner: Owner) -> Owner:
    """Guard a producer, consumer or admin client (before it starts); returns it.

    Its client backs off between metadata requests; a producer's queued records never expire.
    """
    if isinstance(owner, AIOKafkaProducer):
        guard_client(owner.client)
        owner._message_accumulator._batch_ttl = math.inf
    else:
        guard_client(owner._client)
    return owner
