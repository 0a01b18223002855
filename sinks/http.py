"""What an HTTP answer means for a delivery (pure), and the shared HTTP destination."""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from sinks.base import Change, Delivered, GiveUp, Result, RetryAfter, idempotency_key

EXCERPT = 500


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None when absent or invalid."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify(status: int, retry_after: str | None, body: str, do_not_retry: Collection[int]) -> Result:
    """2xx delivered; a do-not-retry status given up; anything else retried (honouring Retry-After)."""
    if 200 <= status < 300:
        return Delivered()
    excerpt = body[:EXCERPT]
    if status in do_not_retry:
        return GiveUp(f"the destination answered {status}", status, excerpt)
    return RetryAfter(f"the destination answered {status}", retry_after_seconds(retry_after))


class HttpDestination:
    """POSTs a JSON body built from the batch; headers carry credentials and an idempotency key."""

    def __init__(
        self,
        name: str,
        url: str,
        headers: dict[str, str],
        body: Callable[[list[Change]], Any],
        do_not_retry: Collection[int],
        timeout: float,
    ) -> None:
        self.name = name
        self.url = url
        self._headers = {"Content-Type": "application/json", **headers}
        self._body = body
        self._do_not_retry = frozenset(do_not_retry)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def write(self, batch: list[Change]) -> Result:
        assert self._session is not None, "start() first"
        headers = {**self._headers, "Idempotency-Key": idempotency_key(batch)}
        try:
            async with self._session.post(
                self.url, data=orjson.dumps(self._body(batch)), headers=headers
            ) as resp:
                text = await resp.text(errors="replace")
                return classify(resp.status, resp.headers.get("Retry-After"), text, self._do_not_retry)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return RetryAfter(f"no answer from the destination: {type(exc).__name__}")
