"""How long to wait before retrying, and what to log about a batch (pure)."""

from __future__ import annotations

import random
from typing import Any


def backoff(attempt: int, cap: float, base: float = 0.2, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return (rng or random).uniform(0, min(cap, base * 2 ** min(attempt, 30)))


def retry_delay(
    attempt: int, told: float | None, floor: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds before retry ``attempt`` of a batch: the longest of the floor, the destination's own
    Retry-After (capped at ten backoff caps) and the jittered backoff.

    The floor holds for every wait: a ``Retry-After: 0`` or a date in the past must not make a
    client hammer the destination, and the backoff keeps growing under a destination that keeps
    saying "now".
    """
    told_capped = min(told, cap * 10) if told is not None else 0.0
    return max(floor, told_capped, backoff(attempt, cap, rng=rng))


def correlation(changes: list[dict[str, Any]], limit: int = 20) -> dict[str, Any]:
    """Log fields naming the changes of a batch: their change ids and the ingress request ids.

    At most ``limit`` of each, so a 300-change batch stays one readable line; ``records`` gives
    the full count.
    """
    change_ids = [str(c.get("change_id", "")) for c in changes[:limit]]
    request_ids = list(dict.fromkeys(str(c.get("request_id", "")) for c in changes if c.get("request_id")))
    return {"records": len(changes), "change_ids": change_ids, "request_ids": request_ids[:limit]}
