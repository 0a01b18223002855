"""Repeated warnings and errors are written once per interval with a count (audience_relay/logs.py)."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest

from audience_relay.logs import JsonFormatter, RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Captured = tuple[logging.Logger, io.StringIO, RepeatFilter, Clock, logging.Handler]


@pytest.fixture
def captured() -> Iterator[Captured]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    clock = Clock()
    repeats = RepeatFilter(30.0, clock=clock)
    handler.addFilter(repeats)
    logger = logging.getLogger("test.repeats")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, out, repeats, clock, handler
    logger.handlers[:] = []


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_a_repeated_error_is_written_once_per_interval_with_a_count(captured: Captured) -> None:
    logger, out, _, clock, _ = captured
    for _ in range(1000):  # a loop failing while the broker is away
        logger.error("Unable connect to node with id %s: %s", 1, "[Errno 111] Connect call failed")
        logger.error("Unable to update metadata from [1]")
    assert [line["event"] for line in lines(out)] == [
        "Unable connect to node with id 1: [Errno 111] Connect call failed",
        "Unable to update metadata from [1]",
    ]
    clock.now += 29.9
    logger.error("Unable to update metadata from [1]")
    assert len(lines(out)) == 2
    clock.now += 0.2
    logger.error("Unable to update metadata from [1]")
    last = lines(out)[-1]
    assert last["event"] == "Unable to update metadata from [1]"
    assert last["repeated"] == 1000  # 999 in the burst and one at 29.9 s
    assert isinstance(last["repeated_since"], str) and last["repeated_since"].endswith("Z")
    clock.now += 31
    logger.error("Unable to update metadata from [1]")
    assert "repeated" not in lines(out)[-1]  # nothing was left out since the last one


def test_distinct_texts_loggers_and_levels_are_not_folded(captured: Captured) -> None:
    logger, out, _, _, _ = captured
    logger.warning("node 1 away")
    logger.warning("node 2 away")
    logger.error("node 1 away")
    logging.getLogger("test.repeats.other").handlers[:] = logger.handlers
    logging.getLogger("test.repeats.other").warning("node 1 away")
    assert len(lines(out)) == 4


def test_info_and_debug_lines_are_never_folded(captured: Captured) -> None:
    logger, out, _, _, _ = captured
    for _ in range(5):
        logger.info("bad body dead-lettered", extra={"request_id": "r"})
        logger.debug("batch delivered")
    assert len(lines(out)) == 10


def test_flush_writes_the_counts_still_pending(captured: Captured) -> None:
    logger, out, repeats, _, handler = captured
    for _ in range(7):
        logger.warning("could not read consumer lag")
    logger.warning("once only")
    repeats.flush(handler)
    last = lines(out)[-1]
    assert (last["event"], last["repeated"], last["level"]) == ("could not read consumer lag", 6, "warning")
    assert len(lines(out)) == 3
    repeats.flush(handler)
    assert len(lines(out)) == 3  # nothing pending any more


def test_zero_interval_writes_every_line() -> None:
    repeats = RepeatFilter(0.0)
    record = logging.LogRecord("x", logging.ERROR, "", 0, "same", None, None)
    assert all(repeats.filter(record) for _ in range(5))


def test_a_configured_process_folds_aiokafkas_flood() -> None:
    """``configure`` installs the filter on the root handler: library loggers are folded too, and
    the count still pending is written at exit."""
    code = (
        "import logging; from audience_relay import logs; logs.configure('INFO', 30)\n"
        "for _ in range(500): logging.getLogger('aiokafka').error('Unable to update metadata from [1]')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    out = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line.get("repeated")) for line in out] == [("aiokafka", None), ("aiokafka", 499)]
