"""What a worker offers its operator: probes, metrics and the consumer lag of its groups.

Routes on the worker's web port (``RELAY_WORKER_WEB_PORT``), besides faust's own:

- ``GET /healthz`` — liveness: the event loop answers;
- ``GET /readyz`` — readiness: 200 once the table recovery of the current assignment is done, no
  rebalance is under way and both stages run every partition this worker holds (its membership
  queries are then answered from current state), else 503 with the reason;
- ``GET /metrics`` — Prometheus text (added in ``processors.app``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import faust
import orjson

from audience_relay.lag import LagMonitor
from audience_relay.names import GroupNames
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames
from processors import metrics

if TYPE_CHECKING:
    from processors.app import Processors


def readiness(app: faust.App, processors: Processors) -> tuple[bool, str]:
    """(ready, why) of a worker."""
    recovery: Any = app.tables.recovery  # type: ignore[attr-defined]  # TableManager has it, not the ABC
    if not recovery.completed.is_set() or getattr(app, "in_recovery", False):
        return False, "recovering tables"
    if getattr(app, "rebalancing", False):
        return False, "rebalancing"
    if not processors.running():
        return False, "starting the stages"
    return True, "ready"


def table_keys(processors: Processors) -> Iterator[tuple[str, str, int]]:
    """(partition, role, keys) of every table partition held here; RocksDB gives an estimate."""
    app = processors.app
    topic = processors.changelog_topic
    roles = {tp.partition: "standby" for tp in app.assignor.assigned_standbys() if tp.topic == topic}
    roles |= {p: "active" for p in processors.assigned_actives()}
    for partition, role in sorted(roles.items()):
        keys = processors.store.estimate_keys(partition)
        if keys is not None:
            yield str(partition), role, keys


def install(app: faust.App, settings: Settings, processors: Processors) -> None:
    """Add the probes, the table-keys metric and the lag monitors to the processors' app."""

    def _json(web: Any, body: dict[str, Any], status: int = 200) -> Any:
        return web.bytes(orjson.dumps(body), content_type="application/json", status=status)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return _json(web, {"status": "alive"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ok, why = readiness(app, processors)
        return _json(web, {"status": "ready" if ok else "not_ready", "detail": why}, 200 if ok else 503)

    metrics.TABLE_KEYS.bind(lambda: list(table_keys(processors)))

    names, groups = TopicNames.from_settings(settings), GroupNames.from_settings(settings)
    monitors = [
        LagMonitor(settings, groups.split, [names.raw], settings.lag_interval_seconds),
        LagMonitor(settings, groups.membership, [names.segment_events], settings.lag_interval_seconds),
    ]

    async def consumer_lag() -> None:
        # Runs on every worker; each exports the whole groups' lag (see audience_relay.lag).
        await asyncio.gather(*(monitor.run(asyncio.Event()) for monitor in monitors))

    app.task(consumer_lag)
