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
import ctypes
import ctypes.util
import logging
import shutil
import sys
from pathlib import Path

import faust
from aiokafka.errors import KafkaError

from audience_relay.exits import ExitCode, Fatal
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
        # The preflight reached the broker a moment ago; starting without these checks could place
        # events by the wrong partition count, so this is a refusal (exit 69), not a warning.
        raise Fatal(
            f"Kafka at {settings.kafka_bootstrap_servers} stopped answering while the worker checked "
            f"its topics ({type(exc).__name__}): is the cluster up?",
            ExitCode.UNAVAILABLE,
        ) from None
    finally:
        loop.close()


#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Allocations from this size on get mappings of their own (glibc's default threshold adapts up to
#: 32 MiB, so fetched record batches, produce batches and webhook bodies otherwise come from the
#: main heap, which fragments and never shrinks: measured 306-315 MiB peak RSS for a million
#: memberships through bench/processors.py, 295 MiB with this).
MMAP_THRESHOLD = 128 * 1024


def return_large_buffers_to_the_os() -> bool:
    """Serve large allocations from their own mappings, released when freed (glibc only)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc: leave the allocator as it is
        return False


def run_worker(settings: Settings) -> None:
    """Run one processors worker; several workers share the partitions through the consumer groups."""
    return_large_buffers_to_the_os()
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
