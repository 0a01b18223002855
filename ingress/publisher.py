"""The ingress's Kafka producer: idempotent, acks=all, and honest about the broker being away.

The producer connects in the background and reconnects on its own, so the ingress can start (and
answer 503 with Retry-After) while the broker is still down, and recovers without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from audience_relay import kafka
from audience_relay.settings import Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


class BrokerUnavailable(Exception):
    """The record was not acknowledged by the broker (down, slow, or not yet connected)."""


class Publisher:
    """Owns one ``AIOKafkaProducer``; ``send`` returns only once the broker acknowledged."""

    def __init__(self, settings: Settings, client_id: str = "audience-relay-ingress") -> None:
        self._settings = settings
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
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
            retry_backoff_ms=200,
        )

    async def start(self) -> None:
        """Begin connecting; returns at once."""
        self._connector = asyncio.create_task(self._connect(), name="kafka-connect")

    async def _connect(self) -> None:
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
                    extra={
                        "bootstrap": self._settings.kafka_bootstrap_servers,
                        "error": str(exc),
                        "retry_in_s": delay,
                    },
                )
                await asyncio.sleep(delay)  # reconnect backoff, not a wait on a condition
                delay = min(delay * 2, 5.0)
                continue
            self._producer = producer
            log.info("kafka producer connected", extra={"bootstrap": self._settings.kafka_bootstrap_servers})
            return

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

    async def send(self, topic: str, value: bytes, headers: Headers, key: bytes | None = None) -> None:
        """Produce one record and wait for the broker's acknowledgement, or raise ``BrokerUnavailable``."""
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("not connected to Kafka yet")
        try:
            await asyncio.wait_for(
                producer.send_and_wait(topic, value=value, key=key, headers=headers), timeout=self.timeout
            )
        except TimeoutError as exc:
            raise BrokerUnavailable(f"no acknowledgement within {self.timeout:g}s") from exc
        except KafkaError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    async def ready(self, topic: str, timeout: float = 2.0) -> bool:
        """True when the broker answers a metadata request and knows ``topic``."""
        producer = self._producer
        if producer is None:
            return False
        try:
            updated = await asyncio.wait_for(producer.client.force_metadata_update(), timeout)
        except (TimeoutError, KafkaError):
            return False
        return bool(updated) and bool(producer.client.cluster.partitions_for_topic(topic))

    async def stop(self) -> None:
        """Flush everything accepted so far and close."""
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self._producer is not None:
            await self._producer.stop()  # flushes pending batches before closing
            self._producer = None
