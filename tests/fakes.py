"""Fake destinations: real aiohttp servers that record every request and answer as told.

A ``FakeDestination`` accepts any method on any path (so it can also stand for "another origin" a
redirect points at), answers its queued ``script`` first, then ``decide(body)`` when set, else
``default``; each answer may be slow (``delay``, or ``latency()`` for every request). It records
each request when it arrives (``arrivals``) and when it is answered (``requests``), and counts the
requests being handled at once (``inflight``, ``max_inflight``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from devtools.localkafka import free_port


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: Any
    status: int
    method: str = "POST"
    path: str = "/hook"


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"ok": true}'
    delay: float = 0.0


class FakeDestination:
    """Answers the queued ``Answer``s in order, then ``decide(body)`` or ``default``; records everything."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.arrivals: list[Received] = []
        self.script: list[Answer] = []
        self.default = Answer()
        self.decide: Callable[[Any], Answer] | None = None
        self.latency: Callable[[], float] | None = None
        self.inflight = 0
        self.max_inflight = 0
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.origin}/hook"
        self._runner: web.AppRunner | None = None
        self.changed = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        arrived = Received(time.monotonic(), dict(request.headers), body, 0, request.method, request.path)
        self.arrivals.append(arrived)
        if self.script:
            answer = self.script.pop(0)
        elif self.decide is not None:
            answer = self.decide(body)
        else:
            answer = self.default
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            delay = answer.delay or (self.latency() if self.latency else 0.0)
            if delay:
                await asyncio.sleep(delay)  # the fake plays a slow destination
        finally:
            self.inflight -= 1
        self.requests.append(
            Received(time.monotonic(), arrived.headers, body, answer.status, request.method, request.path)
        )
        self.changed.set()
        return web.Response(
            status=answer.status, text=answer.body, headers=answer.headers, content_type="application/json"
        )

    async def start(self) -> FakeDestination:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def delivered(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300]
