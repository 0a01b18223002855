"""What a worker offers its operator: probes, metrics and the consumer lag of its group.

Routes on the worker's web port (``RELAY_WORKER_WEB_PORT``), besides faust's own:

- ``GET /healthz`` — liveness: the event loop answers;
- ``GET /readyz`` — readiness: 200 once the table recovery of the current assignment is done and no
  rebalance or recovery is under way (table queries answered here are then current), else 503;
- ``GET /metrics`` — Prometheus text (added in ``processors.app``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import faust
import orjson

from audience_relay.lag import LagMonitor
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from processors import metrics


def processors_group(settings: Settings) -> str:
    """The processors' consumer group: faust uses the app id."""
    return GroupNames.from_settings(settings).processors


def readiness(app: faust.App) -> tuple[bool, str]:
    """(ready, why) of a worker: its table recovery finished and no rebalance is under way."""
    recovery: Any = app.tables.recovery  # type: ignore[attr-defined]  # TableManager has it, not the ABC
    if not recovery.completed.is_set():
        return False, "recovering tables"
    if getattr(app, "rebalancing", False):
        return False, "rebalancing"
    if getattr(app, "in_recovery", False):
        return False, "recovering tables"
    return True, "ready"


def table_keys(app: faust.App, table: Any) -> Iterator[tuple[str, str, int]]:
    """(partition, role, keys) of every table partition held here; RocksDB gives an estimate."""
    store = table.data
    dbs = getattr(store, "_dbs", None)
    if dbs is None:  # the memory store keeps actives and standbys in one dict
        data = getattr(store, "data", None)
        if data is not None:
            yield "all", "all", len(data)
        return
    try:
        topic = table.changelog_topic_name
        actives = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}
    except Exception:  # no assignment yet
        actives = set()
    for partition, db in list(dbs.items()):
        try:
            keys = int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
        except Exception:  # a partition being closed by a rebalance right now
            continue
        yield str(partition), "active" if partition in actives else "standby", keys


def install(app: faust.App, settings: Settings, table: Any) -> None:
    """Add the probes, the table-keys metric and the lag monitor to the processors' app."""

    def _json(web: Any, body: dict[str, Any], status: int = 200) -> Any:
        return web.bytes(orjson.dumps(body), content_type="application/json", status=status)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return _json(web, {"status": "alive"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ok, why = readiness(app)
        return _json(web, {"status": "ready" if ok else "not_ready", "detail": why}, 200 if ok else 503)

    metrics.TABLE_KEYS.bind(lambda: list(table_keys(app, table)))

    names = TopicNames.from_settings(settings)
    monitor = LagMonitor(
        settings,
        processors_group(settings),
        [names.raw, names.segment_events],
        settings.lag_interval_seconds,
    )

    async def consumer_lag() -> None:
        # Runs on every worker; each exports the whole group's lag (see audience_relay.lag).
        await monitor.run(asyncio.Event())

    app.task(consumer_lag)
