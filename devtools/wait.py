"""Waiting on a condition another component owns: poll it, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping


async def until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds (polling state another component owns), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():  # the state has no event to wait on
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def until_async(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.5,
    last_seen: Mapping[str, object] | None = None,
) -> None:
    """Like ``until`` for a check that itself does I/O (e.g. asks the broker).

    ``last_seen``: what the predicate last observed (it fills it in), shown when time runs out.
    """
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            seen = f"; last seen: {dict(last_seen)}" if last_seen else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{seen}")
        await asyncio.sleep(interval)
