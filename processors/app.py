"""The processors' faust application: topics, the membership table, the two stages, the web routes.

    <prefix>.webhooks.raw ─▶ split ─▶ <prefix>.segment-events ─▶ membership ─▶ <prefix>.membership-changes
                              ├─▶ <prefix>.field-changes         (table)   └─▶ <prefix>.membership
                              └─▶ <prefix>.dead-letter

faust runs the membership table: the consumer group that assigns table partitions to workers
(``GroupNames.tables``), recovery of a partition's RocksDB from the changelog — the compacted
``<prefix>.membership`` topic itself — when a worker takes it, standby copies on other workers, the
worker's lifecycle and its web server. The stages (processors/stages.py) move the data with plain
aiokafka loops, so no record passes through faust's stream consumer: its fetch loop and flow
control have lost records in 0.15 (README, "Why the stages do not use faust agents").
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from audience_relay import kafka
from audience_relay.exits import ExitCode
from audience_relay.names import GroupNames
from audience_relay.outbox import BatchProducer, OutputError
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, replica_configs
from processors import flow, operations
from processors.queries import advertised_url, register_queries
from processors.stages import DeliveriesFollower, MembershipStage, SplitStage
from processors.state import StateStore

log = logging.getLogger("processors")
#: What each worker consumer fetches per partition at most, in bytes as stored (see _make_stages).
FETCH_BYTES_PER_PARTITION = 64 * 1024

#: Exit code when a stage failed, e.g. an output could not be written (EX_SOFTWARE): the restart
#: replays from the last commit.
EXIT_STAGE_FAILED = int(ExitCode.SOFTWARE)


def _rocksdb_options(settings: Settings, share: float = 1.0) -> dict[str, int]:
    """RocksDB sizes for one table taking ``share`` of ``RELAY_TABLE_MEMORY_MB``, split over partitions."""
    per_partition = max(2, int(settings.table_memory_mb * share) // max(1, settings.partitions)) * 1024 * 1024
    return {
        "write_buffer_size": per_partition // 4,
        "max_write_buffer_number": 2,
        "block_cache_size": per_partition // 2,
        "block_cache_compressed_size": 0,
        "max_open_files": 512,
    }


def app_id(settings: Settings) -> str:
    """The faust app id: the table group's name and the folder of the worker's tables."""
    return GroupNames.from_settings(settings).tables


class Processors:
    """What one worker runs besides faust: the producer, the two stages and their consumers."""

    def __init__(self, settings: Settings, app: faust.App, table: Any, deliveries: Any) -> None:
        self.settings = settings
        self.app = app
        self.store = StateStore(table, settings.partitions)
        self.deliveries_store = StateStore(deliveries, settings.partitions)
        self.changelog_topic = TopicNames.from_settings(settings).membership
        #: The stages, made when the worker starts (aiokafka clients need the running loop).
        self.split: SplitStage | None = None
        self.membership: MembershipStage | None = None
        self.deliveries: DeliveriesFollower | None = None
        self._clients: list[Any] = []
        self._pending: frozenset[int] | None = None
        self._stop = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        table.on_recover(self._on_recovered)

    def _make_stages(self) -> tuple[SplitStage, MembershipStage]:
        settings = self.settings
        groups = GroupNames.from_settings(settings)
        producer = kafka.producer(
            settings,
            client_id="audience-relay-worker",
            linger_ms=5,
            max_batch_size=1024 * 1024,
            # A dead letter keeps a whole webhook body.
            max_request_size=settings.max_body_bytes + 1024 * 1024,
        )
        session_ms = int(settings.worker_session_timeout_seconds * 1000)
        # Fetch limits count bytes as stored, compressed (RELAY_KAFKA_COMPRESSION), and aiokafka holds
        # a fetch's batches decompressed: with aiokafka's default 1 MiB per partition, 8 partitions
        # and three consumers, the worker peaked ~120 MiB higher with lz4 than without. 64 KiB keeps
        # its peak for 1M memberships under 300 MB (bench/processors.py); a larger record comes whole.
        fetch_limit = {"max_partition_fetch_bytes": FETCH_BYTES_PER_PARTITION}
        split_consumer = kafka.consumer(
            settings,
            **fetch_limit,
            client_id="audience-relay-split",
            group_id=groups.split,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=min(3000, session_ms // 3),
            max_poll_interval_ms=max(300_000, session_ms),
        )
        membership_consumer = kafka.consumer(
            settings,
            **fetch_limit,
            client_id="audience-relay-membership",
            group_id=groups.membership,
            auto_offset_reset="earliest",
        )
        deliveries_consumer = kafka.consumer(settings, **fetch_limit, client_id="audience-relay-deliveries")
        self._clients = [producer, split_consumer, membership_consumer, deliveries_consumer]
        batches = BatchProducer(producer)
        self.deliveries = DeliveriesFollower(settings, deliveries_consumer, self.deliveries_store)
        return (
            SplitStage(settings, producer, batches, split_consumer),
            MembershipStage(settings, producer, batches, membership_consumer, self.store),
        )

    # --- faust's table assignment drives the membership stage ---------------------------------------

    def assigned_actives(self) -> set[int]:
        """The table partitions faust's last assignment made this worker's active ones."""
        return {
            tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == self.changelog_topic
        }

    async def _on_revoked(self, sender: Any, revoked: Any = None, **_: Any) -> None:
        # faust awaits this before the group moves anything: no batch of ours outlives our ownership.
        self._pending = None
        if self.deliveries is not None:
            await self.deliveries.stop_following()
        if self.membership is not None:
            await self.membership.stop_partitions()

    async def _on_recovered(self) -> None:
        # Called once every table's recovery is done (faust recovers them together).
        actives = frozenset(self.assigned_actives())
        if self.membership is None:
            self._pending = actives  # the first recovery ends before the stages start
            return
        await self._start_partitions(actives)

    async def _start_partitions(self, actives: frozenset[int]) -> None:
        assert self.membership is not None and self.deliveries is not None
        await self.membership.start_partitions(actives)
        await self.deliveries.follow(actives)

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the stages' clients and run them: the split at once (it holds no state), the
        membership stage's partitions as faust's recovery hands them over."""
        split, membership = self._make_stages()
        for client in self._clients:
            await client.start()
        membership.hold()
        assert self.deliveries is not None
        self.deliveries.hold(self.settings.partitions)
        self.split, self.membership = split, membership
        self._running = asyncio.create_task(self.run(self._stop), name="stages")
        if self._pending is not None:
            await self._start_partitions(self._pending)
            self._pending = None

    async def stop(self) -> None:
        """Let each stage finish and commit its batches in progress, then close the clients."""
        self._stop.set()
        if self._running is not None:
            await asyncio.wait([self._running], timeout=self.settings.worker_session_timeout_seconds)
        try:
            if self.deliveries is not None:
                await self.deliveries.stop_following()
            if self.membership is not None:
                await self.membership.stop_partitions()
        finally:
            await kafka.stop_clients(
                reversed(self._clients), timeout=self.settings.worker_session_timeout_seconds / 2
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Run both stages until ``stop``. A stage that fails stops the process at once (exit 70):
        its batch was not committed, so a restart replays it; a worker that stayed up without its
        stages would look healthy and process nothing."""
        assert self.split is not None and self.membership is not None and self.deliveries is not None
        try:
            await asyncio.gather(
                self.split.run(stop), self.membership.run(stop), self.deliveries.loop.run(stop)
            )
        except OutputError as exc:
            log.critical(
                "an output write failed; stopping before any offset moves past it", extra={"error": str(exc)}
            )
        except Exception:
            log.critical("a processing stage failed; stopping before any offset moves past it", exc_info=True)
        else:
            return
        logging.shutdown()
        os._exit(EXIT_STAGE_FAILED)

    def running(self) -> bool:
        """True while both stages run and every active table partition is being processed."""
        return (
            self.split is not None
            and self.split.running
            and self.membership is not None
            and self.membership.active == self.assigned_actives()
        )


class WorkerApp(flow.App):
    """The processors' faust app: the stages start with it and stop before it.

    They start when the app does, before faust's group and recovery: the split holds no state and
    has its own group, so it is working while the table's partitions are still being assigned.
    They stop first (mode's ``on_stop`` runs before the app's children stop), while the consumer and
    the tables they use are still up.
    """

    processors: Processors

    async def on_start(self) -> None:
        await super().on_start()
        await self.processors.start()

    async def on_stop(self) -> None:
        try:
            await self.processors.stop()
        finally:  # faust's own shutdown (its consumer thread) must run whatever happened above
            await super().on_stop()


def create_app(settings: Settings) -> WorkerApp:
    """The processors' faust app for ``settings`` (one per worker process)."""
    names = TopicNames.from_settings(settings)
    app = WorkerApp(
        app_id(settings),
        # The brokers and their credentials (SASL/TLS) come from the one client factory.
        **kafka.faust_broker_settings(settings),
        store="rocksdb://" if settings.table_store == "rocksdb" else "memory://",
        # Tables live under the app id: a worker data dir shared by two prefixes must not mix them.
        datadir=str(settings.worker_data_dir / app_id(settings)),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        # The project creates every topic itself (audience-relay topics create, or the worker at start).
        topic_allow_declare=False,
        topic_disable_leader=True,
        table_standby_replicas=settings.standby_replicas,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.worker_session_timeout_seconds / 3),
        consumer_auto_offset_reset="earliest",
        consumer_max_fetch_size=1024 * 1024,
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port,
        web_bind=settings.worker_web_host,
        web_in_thread=False,
        canonical_url=advertised_url(settings),
        # faust's /table and /router pages would show table contents without authentication.
        web_tables_enabled=False,
        web_router_enabled=False,
    )

    def state_topic(name: str) -> Any:
        # A table's changelog that is also a topic of its own (the membership topic, the delivery
        # log): faust reads it for recovery and standbys only, never as a stream it commits.
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            partitions=settings.partitions,
            compacting=True,
            internal=False,
            acks=False,
            allow_empty=True,  # tombstones
            maxsize=131_072,
        )

    table = app.Table(
        "membership",
        partitions=settings.partitions,
        changelog_topic=state_topic(names.membership),
        key_type=bytes,
        value_type=bytes,
        help="identifier + audience -> MembershipState (the records of <prefix>.membership)",
        # faust's RocksDB defaults (64 MiB x 3 memtables and a 2 GiB block cache, per partition)
        # let memory grow with the table; bound them so RSS follows RELAY_TABLE_MEMORY_MB (three
        # quarters here, the rest for the deliveries table).
        options=_rocksdb_options(settings, 0.75),
        # Only used should faust create the topic itself (topics create and the worker normally have).
        extra_topic_configs=replica_configs(settings),
    )
    deliveries = app.Table(
        "deliveries",
        partitions=settings.partitions,
        changelog_topic=state_topic(names.deliveries),
        key_type=bytes,
        value_type=bytes,
        help="identifier + audience + destination -> the sinks' last DeliveryOutcome",
        options=_rocksdb_options(settings, 0.25),
        extra_topic_configs=replica_configs(settings),
    )
    processors = app.processors = Processors(settings, app, table, deliveries)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    operations.install(app, settings, processors)
    register_queries(app, processors, settings)
    return app
