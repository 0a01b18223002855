"""``audience-relay worker``: run the processors until SIGTERM/SIGINT."""

from __future__ import annotations

import faust

from audience_relay.settings import Settings
from processors.app import create_app


def run_worker(settings: Settings) -> None:
    """Run one processors worker; several workers share the partitions through the consumer group."""
    settings.worker_data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
