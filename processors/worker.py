"""``audience-relay worker``: run the processors until SIGTERM/SIGINT.

The table's local RocksDB copy is trusted only after a clean shutdown. faust writes the local store
at once and the changelog asynchronously, so after a crash the local copy can hold updates the
changelog never got; replaying the uncommitted input would then find "nothing changed" and the
changelog (what any other worker recovers from) would stay behind for good. Like Kafka Streams'
checkpoint file, a marker written on clean shutdown says the local copy may be reused; without it the
local copy is removed and rebuilt from the changelog, and the replayed input re-applies what was lost.

The local copy is also rebuilt when it was made for another partition count: ``audience-relay
partitions apply`` moves keys between changelog partitions, so a copy built before the move holds keys
its partition no longer owns. Before anything starts, the worker refuses to run while a move is
unfinished or while ``RELAY_PARTITIONS`` disagrees with the topics.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

import faust
from aiokafka.errors import KafkaError

from audience_relay.exits import ExitCode
from audience_relay.settings import Settings
from audience_relay.topics import create_topics
from processors.app import app_id, create_app
from processors.partitions import PartitionsError, check_worker

log = logging.getLogger("processors.worker")
CLEAN_MARKER = "clean-shutdown"
LAYOUT = "partitions"
EXIT_CONFIG = ExitCode.CONFIG  # a restart cannot help until an operator changes something


def prepare_data_dir(data_dir: Path, partitions: int | None = None) -> bool:
    """Keep the local table copy only after a clean shutdown and for the same partition count.

    True when it was kept. ``partitions`` None skips the partition-count comparison.
    """
    marker, layout = data_dir / CLEAN_MARKER, data_dir / LAYOUT
    expected = f"{partitions}\n"
    clean = marker.exists()
    if clean:
        marker.unlink()  # from now on a crash must be detectable
    same_layout = partitions is None or (layout.exists() and layout.read_text() == expected)
    if clean and same_layout:
        return True
    if data_dir.exists() and any(p.name != LAYOUT for p in data_dir.iterdir()):
        built = layout.read_text().strip() if layout.exists() else "an unknown number of"
        reason = (
            f"the local table was built for {built} partitions, the topics have {partitions}"
            if clean
            else "no clean shutdown recorded"
        )
        log.warning(
            f"{reason}: rebuilding the local table from its changelog", extra={"data_dir": str(data_dir)}
        )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if partitions is not None:
        layout.write_text(expected)
    return False


def check_partitions(settings: Settings) -> None:
    """Stop with a clear error when a partition move is unfinished or RELAY_PARTITIONS is wrong.

    Then create the topics that do not exist yet (``audience-relay topics create``), the table's
    changelog included, and wait until the broker describes them with their partitions.
    """
    loop = asyncio.new_event_loop()  # not asyncio.run: that would leave faust without a current loop
    try:
        loop.run_until_complete(check_worker(settings))
        loop.run_until_complete(create_topics(settings))
    except PartitionsError as exc:
        log.critical("refusing to start", extra={"reason": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except KafkaError as exc:
        # The broker may be away at start; faust waits for it, and still refuses a changelog whose
        # partition count differs from its source topic (PartitionsMismatch).
        log.warning("could not check the topics' partition count", extra={"error": repr(exc)})
    finally:
        loop.close()


def run_worker(settings: Settings) -> None:
    """Run one processors worker; several workers share the partitions through the consumer group."""
    data_dir = settings.worker_data_dir / app_id(settings)
    check_partitions(settings)
    prepare_data_dir(data_dir, settings.partitions)
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
