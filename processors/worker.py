"""``audience-relay worker``: run the processors until SIGTERM/SIGINT.

The table's local RocksDB copy is trusted only after a clean shutdown. faust writes the local store
at once and the changelog asynchronously, so after a crash the local copy can hold updates the
changelog never got; replaying the uncommitted input would then find "nothing changed" and the
changelog (what any other worker recovers from) would stay behind for good. Like Kafka Streams'
checkpoint file, a marker written on clean shutdown says the local copy may be reused; without it the
local copy is removed and rebuilt from the changelog, and the replayed input re-applies what was lost.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import faust

from audience_relay.settings import Settings
from processors.app import app_id, create_app

log = logging.getLogger("processors.worker")
CLEAN_MARKER = "clean-shutdown"


def prepare_data_dir(data_dir: Path) -> bool:
    """Keep the local table copy only after a clean shutdown; True when it was kept."""
    marker = data_dir / CLEAN_MARKER
    if marker.exists():
        marker.unlink()  # from now on a crash must be detectable
        return True
    if data_dir.exists() and any(data_dir.iterdir()):
        log.warning(
            "no clean shutdown recorded: rebuilding the local table from its changelog",
            extra={"data_dir": str(data_dir)},
        )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return False


def run_worker(settings: Settings) -> None:
    """Run one processors worker; several workers share the partitions through the consumer group."""
    data_dir = settings.worker_data_dir / app_id(settings)
    prepare_data_dir(data_dir)
    app = create_app(settings)
    # override_logging=False keeps the JSON root handler of audience_relay.logs: faust's default
    # replaces it with coloured text lines on stdout.
    worker = faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    worker.spinner = None  # a terminal spinner writes escape codes into the (JSON) log stream
    clean = False
    try:
        worker.execute_from_commandline()
        clean = True
    except SystemExit as exc:
        clean = exc.code in (0, None)
        raise
    finally:
        if clean:
            (data_dir / CLEAN_MARKER).touch()
