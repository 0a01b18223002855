"""A one-agent faust worker for reproducing faust 0.15's offset loss (tests/test_offset_guard.py).

The fetch loop of faust's consumer takes a record from a fetched batch, may await its periodic
commit (every ``broker_commit_every`` acknowledgements), then hands the record to the stream and marks
its offset read. This worker, once the file ``<dir>/arm`` exists, parks that commit (the fetch loop
holding its record) until ``<dir>/release`` exists and the flow runs again: the test starts and stops
a second worker meanwhile, so the record is handed off only after a real rebalance has cleared the
stream buffer and sought the partition back to its committed offset. While the file ``release`` is
missing the agent is slow (its buffer stays full); it writes every offset it processed to the output
topic.

    python -m tests.offset_window_app BOOTSTRAP APP_ID IN_TOPIC OUT_TOPIC DIR on|off|commit PARK(1|0)
"""

from __future__ import annotations

import asyncio
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers.aiokafka import Consumer as FaustConsumer
from faust.transport.drivers.aiokafka import Transport as FaustTransport

from processors.offsets import GuardedConsumer

BOOTSTRAP, APP_ID, IN_TOPIC, OUT_TOPIC, DIR, GUARD, PARK = sys.argv[1:8]
CONTROL = Path(DIR)


IN_FETCH_LOOP: ContextVar[bool] = ContextVar("in_fetch_loop", default=False)


class ParkOnce:
    """Parks the fetch loop's commit once, from ``arm`` until ``release`` (see the module docstring)."""

    flow_active: bool
    _parked = False

    async def _drain_messages(self, fetcher: Any) -> None:
        IN_FETCH_LOOP.set(True)  # this task is faust's fetch loop
        await super()._drain_messages(fetcher)  # type: ignore[misc]

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        if PARK == "1" and not self._parked and IN_FETCH_LOOP.get() and (CONTROL / "arm").exists():
            self._parked = True
            print("PARKED", flush=True)
            # A file written by another process has nothing to await on: poll it.
            while not ((CONTROL / "release").exists() and self.flow_active):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            print("RELEASED", flush=True)
        result: bool = await super().commit(topics, start_new_transaction)  # type: ignore[misc]
        return result


class PlainParked(ParkOnce, FaustConsumer):
    """faust's own consumer."""


class GuardedParked(ParkOnce, GuardedConsumer):
    """Our guarded consumer."""


class CommitGuardOnly(ParkOnce, GuardedConsumer):
    """Our guarded consumer with only its commit check (no read mark refused)."""

    def refuse_read_mark(self, tp: Any, offset: int) -> bool:
        return False


class PlainTransport(FaustTransport):
    Consumer = PlainParked


class GuardedTransport(FaustTransport):
    Consumer = GuardedParked


class CommitGuardTransport(FaustTransport):
    Consumer = CommitGuardOnly


TRANSPORTS.aliases["reproplain"] = f"{__name__}:PlainTransport"
TRANSPORTS.aliases["reprocommit"] = f"{__name__}:CommitGuardTransport"
TRANSPORTS.aliases["reproguarded"] = f"{__name__}:GuardedTransport"

app = faust.App(
    APP_ID,
    broker=f"{ {'on': 'reproguarded', 'off': 'reproplain', 'commit': 'reprocommit'}[GUARD] }://{BOOTSTRAP}",
    store="memory://",
    topic_partitions=1,
    consumer_auto_offset_reset="earliest",
    stream_buffer_maxsize=500,
    broker_commit_every=10,
    web_enabled=False,
)
source = app.topic(IN_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
output = app.topic(OUT_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


@app.agent(source, concurrency=1)
async def work(stream: Any) -> None:
    async for event in stream.events():
        if not (CONTROL / "release").exists():
            await asyncio.sleep(0.05)  # keeps the stream buffer full until the rebalances are over
        await output.send(key=None, value=str(event.message.offset).encode())


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "info", "--without-web"]
    app.main()
