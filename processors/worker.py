"""``audience-relay worker``: run the processors until SIGTERM/SIGINT.

The local RocksDB copy of the table needs no clean-shutdown marker: the membership stage applies a
record to it only after the changelog acknowledged it (processors/state.py), so the copy is always a
prefix of the changelog and faust's recovery continues it from its persisted offset, after a crash
as after a clean stop.

The local copy is rebuilt when it was made for another partition count: ``audience-relay partitions
apply`` moves keys between partitions, so a copy built before the move holds keys its partition no
longer owns. Before anything starts, the worker refuses to run while a move is unfinished or while
``RELAY_PARTITIONS`` disagrees with the topics.
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
LAYOUT = "partitions"
EXIT_CONFIG = ExitCode.CONFIG  # a restart cannot help until an operator changes something


def prepare_data_dir(data_dir: Path, partitions: int) -> bool:
    """Keep the local table copy when it was built for ``partitions``; else remove it. True when kept."""
    layout = data_dir / LAYOUT
    expected = f"{partitions}\n"
    if layout.exists() and layout.read_text() == expected:
        return True
    if data_dir.exists() and any(p.name != LAYOUT for p in data_dir.iterdir()):
        built = layout.read_text().strip() if layout.exists() else "an unknown number of"
        log.warning(
            f"the local table was built for {built} partitions, the topics have {partitions}: "
            "rebuilding it from the membership topic",
            extra={"data_dir": str(data_dir)},
        )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    layout.write_text(expected)
    return False


def check_partitions(settings: Settings) -> None:
    """Stop with a clear error when a partition move is unfinished or RELAY_PARTITIONS is wrong.

    Then create the topics that do not exist yet (``audience-relay topics create``) and wait until
    the broker describes them with their partitions.
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
        # partition count differs from the table's (PartitionsMismatch).
        log.warning("could not check the topics' partition count", extra={"error": repr(exc)})
    finally:
        loop.close()


def run_worker(settings: Settings) -> None:
    """Run one processors worker; several workers share the partitions through the consumer groups."""
    check_partitions(settings)
    prepare_data_dir(settings.worker_data_dir / app_id(settings), settings.partitions)
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
    worker.execute_from_commandline()
