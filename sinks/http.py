"""What an HTTP answer means for a delivery (pure), and the shared HTTP destination."""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from sinks.base import Delivered, GiveUp, Item, Result, RetryAfter

#: At most this much of an answer's body is read (it only feeds the dead-letter excerpt).
READ_LIMIT = 64 * 1024


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


def origin_of(url: str | None) -> str:
    """``scheme://host[:port]`` of a URL (never its path or query, which may carry a credential)."""
    if not url:
        return "nowhere"
    parsed = urlsplit(url)
    if not parsed.scheme or not parsed.hostname:
        return "a relative location"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.hostname}{port}"


def classify(
    status: int,
    retry_after: str | None,
    body: str,
    do_not_retry: Collection[int],
    location: str | None = None,
) -> Result:
    """2xx delivered; a do-not-retry status given up; anything else retried (honouring Retry-After).

    A 3xx is never followed (credentials must not reach another origin, and a POST turned into a
    GET delivers nothing): it is an answer that did not accept the batch, retried like a 5xx unless
    its status is in the do-not-retry list. The redirect's origin is named in the reason so the
    operator can fix the configured URL.
    """
    if 200 <= status < 300:
        return Delivered(status)
    reason = f"the destination answered {status}"
    if 300 <= status < 400:
        reason += f" (a redirect to {origin_of(location)}, not followed: fix the destination URL)"
    if status in do_not_retry:
        return GiveUp(reason, status, body)
    return RetryAfter(reason, retry_after_seconds(retry_after))


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body: a destination's error page must not cost unbounded memory."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class HttpDestination:
    """POSTs a JSON body built from the batch; headers carry credentials and an idempotency key."""

    def __init__(
        self,
        name: str,
        url: str,
        headers: dict[str, str],
        body: Callable[[list[Item]], Any],
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

    async def write(self, items: list[Item], key: str) -> Result:
        """POST the batch once; the answer classified (a redirect is never followed)."""
        assert self._session is not None, "start() first"
        headers = {**self._headers, "Idempotency-Key": key}
        try:
            # Never follow a redirect: the credentials in the headers must not leave the configured
            # origin, and a followed 302/303 turns the POST into a GET without the body.
            async with self._session.post(
                self.url, data=orjson.dumps(self._body(items)), headers=headers, allow_redirects=False
            ) as resp:
                text = (await _read_bounded(resp, READ_LIMIT)).decode(errors="replace")
                return classify(
                    resp.status,
                    resp.headers.get("Retry-After"),
                    text,
                    self._do_not_retry,
                    resp.headers.get("Location"),
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            return RetryAfter(f"no answer from the destination: {type(exc).__name__}")
