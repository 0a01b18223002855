"""The ingress's Kafka producer: idempotent, acks=all, and honest about the broker being away.

The producer connects in the background and reconnects on its own, so the ingress can start (and
answer 503 with Retry-After) while the broker is still down, and recovers without a restart.

While the broker is known to be away, ``send`` refuses at once instead of queueing the record and
waiting out ``RELAY_PRODUCE_TIMEOUT_SECONDS``: a refused request then leaves no record behind to be
written once the broker returns (Lytics retries it anyway, which would make a duplicate). The broker
is *known to be away* from the moment a send is not acknowledged (timeout or a retriable Kafka
error) or the producer's metadata shows no partition of the topic with a leader, until a background
probe finds the broker answering with leaders for the topics again. Only records already handed to
the producer when the broker went away can still be written after their request was refused.

One more repair happens there: aiokafka 0.14's idempotent producer numbers a batch when it leaves
the queue, also when it leaves only to expire (no leader for ``request_timeout_ms``); the broker then
refuses every later batch of that partition as out of order, for good. So after any record failed,
the producer is replaced (new producer id) before the ingress accepts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from audience_relay import kafka
from audience_relay.settings import Settings
from ingress import metrics

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

#: While the broker is away, how often the probe asks whether it is back (first wait, then doubling).
PROBE_INTERVAL_S = 0.5
PROBE_INTERVAL_MAX_S = 2.0


class BrokerUnavailable(Exception):
    """The record was not acknowledged by the broker (down, slow, or not yet connected)."""


class Publisher:
    """Owns one ``AIOKafkaProducer``; ``send`` returns only once the broker acknowledged."""

    def __init__(self, settings: Settings, client_id: str = "audience-relay-ingress") -> None:
        self._settings = settings
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        #: False while the broker is known to be away (see the module docstring).
        self._reachable = True
        #: A record failed: the producer's sequence numbers may be out of step with the broker's.
        self._renew = False
        self._topics: set[str] = set()
        self.timeout = settings.produce_timeout_seconds

    def _new_producer(self) -> AIOKafkaProducer:
        s = self._settings
        return kafka.producer(
            s,
            client_id=self._client_id,
            enable_idempotence=True,  # implies acks=all and no duplicates from producer retries
            acks="all",
            linger_ms=s.producer_linger_ms,
            max_batch_size=512 * 1024,
            max_request_size=s.max_body_bytes + 512 * 1024,
            request_timeout_ms=max(int(s.produce_timeout_seconds * 1000) * 2, 10_000),
        )

    async def start(self) -> None:
        """Begin connecting; returns at once."""
        self._connector = asyncio.create_task(self._connect(), name="kafka-connect")

    async def _connect(self) -> None:
        self._producer = await self._started_producer()
        self._set_reachable(True)
        log.info("kafka producer connected", extra={"bootstrap": self._settings.kafka_bootstrap_servers})

    async def _started_producer(self) -> AIOKafkaProducer:
        delay = 0.2
        while True:
            producer = self._new_producer()
            try:
                await producer.start()
            except asyncio.CancelledError:
                await producer.stop()
                raise
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                log.warning(
                    "kafka not reachable yet, retrying",
                    extra={"bootstrap": self._settings.kafka_bootstrap_servers, "error": str(exc)},
                )
                await asyncio.sleep(delay)  # reconnect backoff, not a wait on a condition
                delay = min(delay * 2, 5.0)
                continue
            return producer

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the producer has connected once (for start-up and tests)."""
        if self._connector is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._connector), timeout)
        return self._producer is not None

    @property
    def connected(self) -> bool:
        return self._producer is not None

    @property
    def reachable(self) -> bool:
        """False while the broker is known to be away: ``send`` then refuses at once."""
        return self._producer is not None and self._reachable

    async def send(self, topic: str, value: bytes, headers: Headers, key: bytes | None = None) -> None:
        """Produce one record and wait for the broker's acknowledgement, or raise ``BrokerUnavailable``.

        Raises at once, without handing the record to the producer, while the broker is known to
        be away.
        """
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("not connected to Kafka yet")
        if not self._reachable:
            raise BrokerUnavailable("the broker is unreachable")
        self._topics.add(topic)
        if self._leaderless(producer, topic):
            self._went_away("no partition of the topic has a leader")
            raise BrokerUnavailable("no partition of the topic has a leader")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            delivery = await asyncio.wait_for(
                producer.send(topic, value=value, key=key, headers=headers), timeout=self.timeout
            )
            # The delivery outlives a timed-out request: whether it fails later matters (see _renew).
            delivery.add_done_callback(self._on_delivery)
            await asyncio.wait_for(asyncio.shield(delivery), timeout=max(0.0, deadline - loop.time()))
        except TimeoutError as exc:
            self._went_away(f"no acknowledgement within {self.timeout:g}s")
            raise BrokerUnavailable(f"no acknowledgement within {self.timeout:g}s") from exc
        except KafkaError as exc:
            if exc.retriable:
                self._went_away(type(exc).__name__)
            raise BrokerUnavailable(type(exc).__name__) from exc

    @staticmethod
    def _leaderless(producer: AIOKafkaProducer, topic: str) -> bool:
        """True when the producer's metadata knows ``topic`` and none of its partitions has a leader."""
        cluster = producer.client.cluster
        return bool(cluster.partitions_for_topic(topic)) and not cluster.available_partitions_for_topic(topic)

    def _on_delivery(self, delivery: asyncio.Future[object]) -> None:
        if not delivery.cancelled() and delivery.exception() is not None:
            self._renew = True
            self._went_away(f"a record failed: {type(delivery.exception()).__name__}")

    def _went_away(self, why: str) -> None:
        if not self._reachable:
            return
        self._set_reachable(False)
        log.warning("kafka unreachable: refusing webhooks until it answers again", extra={"reason": why})
        self._probe = asyncio.create_task(self._until_back(), name="kafka-probe")

    def _set_reachable(self, reachable: bool) -> None:
        self._reachable = reachable
        metrics.BROKER_REACHABLE.set(1 if reachable else 0)

    async def _until_back(self) -> None:
        """Poll the broker until it answers with leaders for every topic sent to; then accept again."""
        delay = PROBE_INTERVAL_S
        while True:
            await asyncio.sleep(delay)  # polling another system's state: there is no event to wait on
            delay = min(delay * 2, PROBE_INTERVAL_MAX_S)
            if not all([await self.ready(topic, check_reachable=False) for topic in self._topics]):
                continue
            if self._renew:
                await self._replace_producer()
            self._set_reachable(True)
            log.info("kafka reachable again: accepting webhooks")
            return

    async def _replace_producer(self) -> None:
        old = self._producer
        self._producer = await self._started_producer()
        self._renew = False
        log.info("kafka producer replaced after a failed record (new producer id)")
        if old is not None:
            # Flushes what the old producer still holds; those records are already answered.
            task = asyncio.create_task(old.stop(), name="kafka-retire-producer")
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def ready(self, topic: str, timeout: float = 2.0, *, check_reachable: bool = True) -> bool:
        """True when the broker answers a metadata request and knows ``topic`` with a leader for it.

        With ``check_reachable`` (readiness) also False while the broker is known to be away.
        """
        producer = self._producer
        if producer is None or (check_reachable and not self._reachable):
            return False
        try:
            updated = await asyncio.wait_for(producer.client.force_metadata_update(), timeout)
        except (TimeoutError, KafkaError):
            return False
        return bool(updated) and bool(producer.client.cluster.available_partitions_for_topic(topic))

    async def stop(self) -> None:
        """Flush everything accepted so far and close."""
        for task in (self._connector, self._probe):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._producer is not None:
            # stop() flushes what is queued. Every acknowledged record is already written; what is
            # left belongs to requests answered 503 (or about to be), so a broker that is away does
            # not get to hold the shutdown past this bound.
            try:
                await asyncio.wait_for(self._producer.stop(), max(self.timeout, 5.0))
            except TimeoutError:
                log.warning("kafka producer closed with records still queued (the broker is away)")
            self._producer = None
        for task in list(self._retired):
            with contextlib.suppress(Exception):
                await task
