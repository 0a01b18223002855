"""Fake destinations: real aiohttp servers that record every request and answer as told."""

from __future__ import annotations

import asyncio
import time
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


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"ok": true}'
    delay: float = 0.0


class FakeDestination:
    """Answers the queued ``Answer``s in order, then ``default``; records everything."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[Answer] = []
        self.default = Answer()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._runner: web.AppRunner | None = None
        self.changed = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        answer = self.script.pop(0) if self.script else self.default
        if answer.delay:
            await asyncio.sleep(answer.delay)  # the fake plays a slow destination
        body = orjson.loads(await request.read())
        self.requests.append(Received(time.monotonic(), dict(request.headers), body, answer.status))
        self.changed.set()
        return web.Response(
            status=answer.status, text=answer.body, headers=answer.headers, content_type="application/json"
        )

    async def start(self) -> FakeDestination:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def delivered(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300]
