"""Every long-running command answers SIGHUP and SIGTERM as README "Signals" says: real processes.

(The ingress's SIGHUP key rotation under load is ``tests/test_ingress_keys.py``.)
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from audience_relay import signals
from audience_relay.topics import create_topics
from devtools.localkafka import free_port
from devtools.processes import Component, start_worker
from devtools.wait import until, until_async
from tests.conftest import make_settings


def write_keys(path: Path, document: dict[str, Any]) -> None:
    aside = path.with_suffix(".tmp")
    aside.write_bytes(orjson.dumps(document))
    os.replace(aside, path)


@pytest.fixture
def hangup_restored() -> Iterator[None]:
    """The test process's own SIGHUP disposition back to what it was."""
    before = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, before)


async def test_a_hangup_before_the_handlers_exist_is_answered_once_they_do(hangup_restored: None) -> None:
    reloads: list[int] = []
    stops: list[int] = []
    signals.defer_hangup()
    os.kill(os.getpid(), signal.SIGHUP)  # during "start-up": remembered, not fatal
    loop = asyncio.get_running_loop()
    remove = signals.install(loop, "test", stop=lambda: stops.append(1), reload=lambda: reloads.append(1))
    try:
        await until(lambda: reloads == [1], 10, "the remembered SIGHUP to be answered")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: reloads == [1, 1], 10, "a SIGHUP to reload")
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: stops == [1], 10, "SIGTERM to stop")
    finally:
        remove()
    # After shutdown has begun a SIGHUP is ignored: it must not cut the final flush short.
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGHUP)
    assert reloads == [1, 1]


async def test_sighup_reloads_a_worker_s_query_credentials_and_sigterm_stops_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    write_keys(keys, {"api_keys": ["old-key"]})
    settings = make_settings(
        kafka_bootstrap, ingress_api_keys=[], ingress_keys_file=keys, table_store="memory"
    )
    await create_topics(settings)
    worker = start_worker(settings, tmp_path)
    url = f"http://127.0.0.1:{worker.env['RELAY_WORKER_WEB_PORT']}/v1/audiences/aud-0/count"
    try:
        async with aiohttp.ClientSession() as http:

            async def status(key: str) -> int:
                assert worker.alive(), worker.log.read_text()[-3000:]
                try:
                    async with http.get(url, headers={"X-API-KEY": key}) as resp:
                        return resp.status
                except aiohttp.ClientError:
                    return 0

            async def answers(key: str, expected: int) -> bool:
                return await status(key) == expected

            await until_async(lambda: answers("old-key", 200), 120, "the worker to answer a count")
            assert await status("new-key") == 401
            write_keys(keys, {"api_keys": ["new-key"]})
            worker.proc.send_signal(signal.SIGHUP)
            await until_async(lambda: answers("new-key", 200), 30, "the new key to be accepted", interval=0.2)
            assert await status("old-key") == 401
            # A broken file keeps what is in force, and the worker alive.
            keys.write_bytes(b"{not json")
            worker.proc.send_signal(signal.SIGHUP)
            await until(
                lambda: "credentials not reloaded" in worker.log.read_text(), 30, "the bad file to be refused"
            )
            assert await status("new-key") == 200
        worker.proc.terminate()
        assert await asyncio.to_thread(worker.proc.wait, 90) == 0
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert log.count("credentials reloaded") == 1
    assert "old-key" not in log and "new-key" not in log


async def test_a_sink_survives_sighup_and_stops_cleanly_on_sigterm(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = make_settings(kafka_bootstrap)
    await create_topics(settings)
    port = free_port()
    sink = Component(settings, ["sink", "analytics"], tmp_path / "sink.log", RELAY_SINK_WEB_PORT=str(port))
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert sink.alive(), sink.log.read_text()[-3000:]
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await until_async(ready, 60, "the sink to be ready", interval=0.2)
            sink.proc.send_signal(signal.SIGHUP)

            def logged() -> bool:
                assert sink.alive(), f"SIGHUP killed the sink: {sink.log.read_text()[-2000:]}"
                return "nothing to reload" in sink.log.read_text()

            await until(logged, 30, "the SIGHUP to be logged")
            assert await ready()
        sink.proc.terminate()
        assert await asyncio.to_thread(sink.proc.wait, 60) == 0
    finally:
        sink.stop()
