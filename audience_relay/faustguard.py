"""faust's aiokafka transport with the clients of ``audience_relay.kafkaguard``.

faust builds its own aiokafka producer and consumer (in the consumer's thread) and has no setting
for their retry backoff; this transport guards both as they are made, through faust's own factory
methods (``Producer._new_producer``, ``AIOKafkaConsumerThread._create_consumer``). Selected by the
``guardedkafka://`` broker scheme.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

from audience_relay.kafkaguard import RETRY_BACKOFF_MS, guard

SCHEME = "guardedkafka"


class Producer(driver.Producer):
    """faust's producer; its aiokafka producer is guarded and retries after ``RETRY_BACKOFF_MS``."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "retry_backoff_ms": RETRY_BACKOFF_MS}

    def _new_producer(self, transactional_id: str | None = None) -> AIOKafkaProducer:
        return guard(super()._new_producer(transactional_id))


class ConsumerThread(driver.AIOKafkaConsumerThread):
    """faust's consumer thread; its aiokafka consumer is guarded (faust passes no retry backoff)."""

    def _create_consumer(self, loop: asyncio.AbstractEventLoop) -> AIOKafkaConsumer:
        return guard(super()._create_consumer(loop))


class Consumer(driver.Consumer):
    """faust's consumer, running ``ConsumerThread``."""

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    """faust's aiokafka transport with guarded clients."""

    Consumer = Consumer
    Producer = Producer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
