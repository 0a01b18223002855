"""The ingress's edges: memory bounded by settings, malformed bytes that carry a key, OAuth grants
checked at every use, the operations port's deadline, and ``--insecure`` with an empty keys file.

Every test drives the real listener (``ingress.server.start_listeners``) or the real process over
sockets; raw asyncio streams where the bytes themselves are the point.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import web

from audience_relay import logs
from audience_relay.auth import Authenticator
from audience_relay.kafkautil import read_topic
from audience_relay.keys import KeysFileError
from audience_relay.logs import JsonFormatter
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import LocalKafka, free_port
from devtools.processes import Component, start_worker
from devtools.wait import until, until_async
from ingress.app import AUTH, BUDGET, TOKEN_BODY_LIMIT, build_app, run
from ingress.memory import INFLIGHT_FACTOR, PER_CONNECTION_BYTES, memory_bound
from ingress.server import reload_secrets, start_listeners
from tests.conftest import make_settings
from tests.test_ingress_hardening import body_of, hardened, read_all, serving, status_of

MiB = 1024 * 1024
KEY_HEADER = b"X-API-KEY: key-current\r\n"


async def answer_of(reader: asyncio.StreamReader, fail_after: float = 30) -> bytes:
    """One HTTP answer (head and Content-Length body) from ``reader``, without waiting for a close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), fail_after)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await asyncio.wait_for(reader.readexactly(length), fail_after)


# --- 12. memory is bounded by the settings, not by the clients ------------------------------------


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        return await read_all(reader, fail_after=60)
    finally:
        writer.close()


class PeakRss:
    """The highest resident set size of a process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.01)

    @contextmanager
    def sampling(self) -> Iterator[PeakRss]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


async def chunked_upload(port: int, path: str, headers: bytes, total: int, chunk: int = 64 * 1024) -> int:
    """POST ``total`` bytes as fast as the server takes them, chunked; the status it answered.

    Stops sending as soon as an answer arrives (a server that answers early must not have to read
    the rest), so what the server holds is what it chose to read.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + headers
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    body = b'{"data": {"pad": "' + b"a" * (total - 22) + b'"}}'
    answered = asyncio.create_task(answer_of(reader, fail_after=120))
    try:
        for start in range(0, len(body), chunk):
            if answered.done():
                break
            part = body[start : start + chunk]
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()
        else:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        return status_of(await answered)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return 0
    finally:
        writer.close()


async def held_upload(port: int, path: str, headers: bytes, total: int, release: asyncio.Event) -> int:
    """POST a ``total``-byte body with its Content-Length, all but its last byte, and hold it there."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {total}\r\n".encode()
        + headers
        + b"\r\n"
    )
    answered = asyncio.create_task(answer_of(reader, fail_after=120))
    body = b"grant_type=client_credentials&pad=" + b"a" * (total - 34)
    try:
        for start in range(0, total - 1, 256 * 1024):
            if answered.done():
                break
            writer.write(body[start : min(start + 256 * 1024, total - 1)])
            await writer.drain()
        if not answered.done():
            await asyncio.wait([answered, asyncio.create_task(release.wait())], return_when="FIRST_COMPLETED")
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        if not answered.done():
            return 0  # still held when the test ended: the server was waiting for the last byte
        return status_of(await answered)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return 0
    finally:
        answered.cancel()
        writer.close()


async def test_memory_stays_within_the_settings_under_a_body_flood(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """12 chunked 9 MiB bodies, 24 held 9 MiB token requests, 24 heads of 1 MiB, then the body that
    costs most to check: the process stays within ``memory_bound`` of its settings, and the flood
    grows it by what the settings allow, not by what the clients send."""
    budget = 10 * MiB
    port, ops_port = free_port(), free_port()
    settings = make_settings(
        kafka_bootstrap,
        ingress_host="127.0.0.1",
        ingress_port=port,
        ingress_metrics_port=ops_port,
        oauth_clients={"lytics": "client-secret"},
        max_inflight_bytes=budget,
        max_body_bytes=budget,
        ingress_body_timeout_seconds=120.0,
        ingress_header_timeout_seconds=60.0,
    )
    await create_topics(settings)
    ingress = Component(settings, ["ingress"], tmp_path / "ingress.log")
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert ingress.alive(), ingress.log.read_text()[-3000:]
                try:
                    async with http.get(f"http://127.0.0.1:{ops_port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await until_async(ready, 60, "the ingress to be ready", interval=0.1)
            for n in range(20):  # warm up: the first requests allocate what every later one reuses
                async with http.post(
                    f"http://127.0.0.1:{port}/v1/lytics",
                    data=orjson.dumps({"n": n}),
                    headers={"X-API-KEY": "key-current"},
                ) as resp:
                    assert resp.status == 200
            baseline = psutil.Process(ingress.proc.pid).memory_info().rss
            release = asyncio.Event()
            big_head = (
                b"GET /healthz HTTP/1.1\r\n"
                + b"X-Pad: "
                + b"a" * 8000
                + b"\r\n" * 1
                + (b"X-More: " + b"b" * 8000 + b"\r\n") * 127
            )
            with PeakRss(ingress.proc.pid).sampling() as flood:
                held = [
                    asyncio.create_task(held_upload(port, "/oauth/token", b"", 9 * MiB, release))
                    for _ in range(24)
                ]
                heads = [asyncio.create_task(exchange(port, big_head)) for _ in range(24)]
                chunked = await asyncio.gather(
                    *(chunked_upload(port, "/v1/lytics", KEY_HEADER, 9 * MiB) for _ in range(12))
                )
                release.set()
                token_statuses = await asyncio.gather(*held)
                head_statuses = [status_of(a) for a in await asyncio.gather(*heads)]
            # The body that costs most to check: 3 million empty objects.
            worst = b"[" + b"{}," * (3 * MiB - 1) + b"{}]"
            with PeakRss(ingress.proc.pid).sampling() as check:
                async with http.post(
                    f"http://127.0.0.1:{port}/v1/lytics", data=worst, headers={"X-API-KEY": "key-current"}
                ) as resp:
                    assert resp.status == 200
        assert ingress.alive()
    finally:
        ingress.stop()
    grown = (flood.peak - baseline) / MiB
    connections = 12 + 24 + 24
    # The flood's bodies are strings (checking them costs one copy): what it may add is the
    # in-flight term, one body checked, and its connections, with 16 MiB of allocator slack.
    allowed = (INFLIGHT_FACTOR * budget + 2 * budget + connections * PER_CONNECTION_BYTES) / MiB + 16
    bound = memory_bound(settings) / MiB
    print(
        f"flood: chunked {sorted(chunked)}, token {sorted(set(token_statuses))}, heads "
        f"{sorted(set(head_statuses))}; RSS {baseline / MiB:.0f} MiB -> peak {flood.peak / MiB:.0f} MiB "
        f"(+{grown:.0f} MiB, allowed {allowed:.0f}); worst body to check: peak {check.peak / MiB:.0f} MiB; "
        f"memory_bound {bound:.0f} MiB"
    )
    assert grown <= allowed, (
        f"the flood grew the ingress by {grown:.0f} MiB, the settings allow {allowed:.0f}"
    )
    assert max(flood.peak, check.peak) / MiB <= bound
    assert set(token_statuses) == {413}, token_statuses  # refused from the head, never read
    assert set(head_statuses) == {431}, head_statuses
    assert chunked.count(429) >= 10 and set(chunked) <= {200, 429}, chunked


async def test_a_chunked_body_is_refused_once_the_budget_is_spent_not_after_it_is_read(
    kafka_bootstrap: str,
) -> None:
    settings = hardened(kafka_bootstrap, max_inflight_bytes=64 * 1024, max_body_bytes=64 * 1024)
    await create_topics(settings)
    async with serving(settings) as ingress:
        budget = ingress.app[BUDGET]
        port = ingress.site.port
        # A body with its Content-Length holds 60 KiB of the 64 KiB budget while it trickles in.
        _, holder_w = await asyncio.open_connection("127.0.0.1", port)
        holder_w.write(
            b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\n" + KEY_HEADER + b"Content-Length: 61440\r\n\r\n{"
        )
        await until(lambda: budget.used == 61440, 30, "the first body's reservation")
        # A Content-Length that does not fit is refused from its head.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\n" + KEY_HEADER + b"Content-Length: 8192\r\n\r\n"
        )
        answer = await answer_of(reader, fail_after=10)
        assert status_of(answer) == 429 and body_of(answer)["error"] == "busy"
        writer.close()
        # A chunked body is refused at the chunk that does not fit: the client never had to send
        # the rest (the old ingress read the whole body before it looked at the budget).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\n"
            + KEY_HEADER
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"2000\r\n"
            + b"a" * 0x2000
            + b"\r\n"
        )
        answer = await answer_of(reader, fail_after=10)
        assert status_of(answer) == 429, answer
        assert b"Retry-After: 5" in answer
        writer.close()
        assert budget.used == 61440 and budget.peak <= budget.limit
        # A chunked body over RELAY_MAX_BODY_BYTES gets 413 once it passes the limit.
        holder_w.close()
        await until(lambda: budget.used == 0, 30, "the first body's reservation to be released")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\n"
            + KEY_HEADER
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"4000\r\n" + b"a" * 0x4000 + b"\r\n") * 5
        )
        answer = await answer_of(reader, fail_after=10)
        assert status_of(answer) == 413 and body_of(answer)["error"] == "body_too_large"
        writer.close()
        await until(lambda: budget.used == 0, 30, "the refused body's reservation to be released")
        # And a chunked body that fits is stored as before.
        async with aiohttp.ClientSession() as http:

            async def chunks() -> AsyncIterator[bytes]:
                yield b'{"data": {"email": '
                yield b'"chunked@example.com"}}'

            async with http.post(
                ingress.url + "/v1/lytics", data=chunks(), headers={"X-API-KEY": "key-current"}
            ) as resp:
                assert resp.status == 200, await resp.text()
        assert budget.used == 0 and budget.peak <= budget.limit


async def test_the_token_endpoint_reads_at_most_a_few_kilobytes(kafka_bootstrap: str) -> None:
    settings = hardened(kafka_bootstrap, oauth_clients={"lytics": "client-secret"})
    async with serving(settings, kafka=False) as ingress:
        port = ingress.site.port
        # A Content-Length over the limit: 413 from the head, the body is never sent.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {9 * MiB}\r\n\r\n".encode()
        )
        answer = await answer_of(reader, fail_after=10)
        assert status_of(answer) == 413 and body_of(answer) == {"error": "invalid_request"}
        writer.close()
        # Chunked: refused once more than the limit arrived, without waiting for the rest.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"1000\r\n"
            + b" " * 0x1000
            + b"\r\n"
            + b"10\r\n"
            + b" " * 16
            + b"\r\n"
        )
        answer = await answer_of(reader, fail_after=10)
        assert status_of(answer) == 413
        writer.close()
        # A real token request (form, JSON, Basic) still works.
        async with aiohttp.ClientSession() as http:
            form = {
                "grant_type": "client_credentials",
                "client_id": "lytics",
                "client_secret": "client-secret",
            }
            async with http.post(ingress.url + "/oauth/token", data=form) as resp:
                assert resp.status == 200 and (await resp.json())["token_type"] == "Bearer"
            async with http.post(ingress.url + "/oauth/token", json=form) as resp:
                assert resp.status == 200
            async with http.post(
                ingress.url + "/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=aiohttp.BasicAuth("lytics", "client-secret"),
            ) as resp:
                assert resp.status == 200
            async with http.post(ingress.url + "/oauth/token", data=b"grant_type=password") as resp:
                assert resp.status == 400 and (await resp.json()) == {"error": "unsupported_grant_type"}
    assert TOKEN_BODY_LIMIT <= 4096


def test_the_kubernetes_memory_limit_holds_the_ingress_s_memory_bound() -> None:
    """deploy/k8s: the ingress's settings bound its memory (``memory_bound``) under its limit."""
    from tests.test_deploy import containers

    [ingress] = [c for c in containers() if c.component.kind == "ingress"]
    limit = ingress.spec["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    bound = memory_bound(ingress.settings)
    print(f"k8s ingress: memory_bound {bound / MiB:.0f} MiB, limit {limit}")
    assert bound <= int(limit[:-2]) * MiB


def test_a_body_limit_over_the_inflight_budget_is_refused() -> None:
    settings = Settings.model_validate(
        {"ingress_api_keys": ["k"], "max_body_bytes": 2 * MiB, "max_inflight_bytes": MiB}
    )
    with pytest.raises(
        ValueError, match=r"RELAY_MAX_BODY_BYTES \(2097152\) is over RELAY_MAX_INFLIGHT_BYTES"
    ):
        build_app(settings)
    with pytest.raises(SystemExit, match="refusing to start: RELAY_MAX_BODY_BYTES"):
        run(settings)


# --- 13. no secret reaches a log line or an answer, whatever bytes arrive ---------------------------

PLANTED = "planted-sekrit-7f3a91"
MALFORMED = [
    # bare LF ending the request line, the key in the query
    b"POST /v1/lytics?api_key=@ HTTP/1.1\nHost: x\r\n\r\n",
    # NUL in the request line
    b"POST /v1/lytics?api_key=@\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    # NUL in a header value
    b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nX-API-KEY: @\x00\r\n\r\n",
    # bare LF inside the headers
    b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nX-API-KEY: @\nX-Other: 1\r\n\r\n",
    # bare CR
    b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nX-API-KEY: @\rX-Other: 1\r\n\r\n",
    # a header without its colon
    b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nX-API-KEY @\r\n\r\n",
    # the key as the method
    b"@ /v1/lytics HTTP/1.1\r\nHost: x\r\n\r\n",
    # the key in a header line over aiohttp's limit
    b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer @" + b"a" * 9000 + b"\r\n\r\n",
    # the key in a request line over the limit
    b"GET /v1/lytics?api_key=@&pad=" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    # a bad Content-Length next to the key
    b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nX-API-KEY: @\r\nContent-Length: 1x\r\n\r\n",
    # a well-formed request, then a malformed one pipelined behind it
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/lytics?api_key=@\x00 HTTP/1.1\r\n\r\n",
]


async def test_malformed_requests_carrying_a_key_leave_it_in_no_log_and_no_answer(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = hardened(
        kafka_bootstrap,
        ingress_api_keys=[PLANTED],
        ingress_body_timeout_seconds=1.0,
        ingress_header_timeout_seconds=2.0,
    )
    caplog.set_level(logging.DEBUG)
    answers: list[bytes] = []
    async with serving(settings, kafka=False) as ingress:
        for template in MALFORMED:
            for port in (ingress.site.port, ingress.ops_site.port if ingress.ops_site else 0):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(template.replace(b"@", PLANTED.encode()))
                answers.append(await read_all(reader, fail_after=20))
                writer.close()
        await until(lambda: ingress.limits.open == 0, 30, "every connection to be closed")
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any("malformed request" in line for line in lines)  # the refusals were logged...
    for line in lines:
        assert PLANTED not in line, f"the key in a log line: {line}"  # ...without the key
    for template, answer in zip([t for t in MALFORMED for _ in (0, 1)], answers, strict=True):
        assert PLANTED.encode() not in answer, answer
        # The last answer on the connection (a pipelined good request gets its own first) is our
        # one JSON shape, and the server closed the connection (read_all returned): never
        # aiohttp's text/plain echo. (Its version is 1.0 when the request line was unreadable.)
        last = answer[answer.rfind(b"HTTP/1.") :]
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", last)
        assert match and int(match.group(1)) == 400, answer
        assert b"Content-Type: application/json" in last, answer
        assert body_of(last)["error"] == "bad_request", template
        assert body_of(last)["detail"] == "the request line or headers are malformed"
    print(f"{len(answers)} malformed requests answered with a fixed JSON 400, key in no log line")


async def test_aiohttp_parser_errors_are_scrubbed_on_every_component_s_web_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker's and a sink's web ports are aiohttp's own server: ``audience_relay.logs`` keeps
    its parser's message (which quotes the raw line) out of the log."""
    logs.scrub_library_loggers()
    caplog.set_level(logging.DEBUG)
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for template in MALFORMED:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(template.replace(b"@", PLANTED.encode()))
            await read_all(reader, fail_after=20)
            writer.close()
    finally:
        await runner.cleanup()
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name.startswith("aiohttp")]
    assert any("malformed HTTP request" in line for line in lines)
    for line in lines:
        assert PLANTED not in line, f"the key in a log line: {line}"


# --- 15. OAuth grants are checked at every use ------------------------------------------------------


async def test_a_token_follows_its_client_s_current_grant(kafka_bootstrap: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_bytes(orjson.dumps({"oauth_clients": {"lytics": "cs-1"}, "oauth_signing_keys": ["sig"]}))
    settings = hardened(
        kafka_bootstrap,
        ingress_api_keys=["key-current"],
        ingress_keys_file=keys,
        sources={"crm": {"api_keys": ["crm-key"]}, "web": {"api_keys": ["web-key"]}},
    )
    await create_topics(settings)
    async with serving(settings) as ingress, aiohttp.ClientSession() as http:

        async def token() -> str:
            form = {"grant_type": "client_credentials", "client_id": "lytics", "client_secret": "cs-1"}
            async with http.post(ingress.url + "/oauth/token", data=form) as resp:
                assert resp.status == 200
                return str((await resp.json())["access_token"])

        async def status(path: str, bearer: str) -> int:
            async with http.post(
                ingress.url + path, data=b"{}", headers={"Authorization": f"Bearer {bearer}"}
            ) as resp:
                return resp.status

        everywhere = await token()
        assert [await status(p, everywhere) for p in ("/v1/lytics", "/v1/lytics/crm", "/v1/lytics/web")] == [
            200
        ] * 3
        # Narrow the client to crm: its token stops working everywhere else at once, not at expiry.
        keys.write_bytes(
            orjson.dumps(
                {"sources": {"crm": {"oauth_clients": {"lytics": "cs-1"}}}, "oauth_signing_keys": ["sig"]}
            )
        )
        assert reload_secrets(ingress, settings)
        assert [await status(p, everywhere) for p in ("/v1/lytics", "/v1/lytics/crm", "/v1/lytics/web")] == [
            401,
            200,
            401,
        ]
        crm_only = await token()
        # Move it to web: the crm token (and the old one) follow the grant.
        keys.write_bytes(
            orjson.dumps(
                {"sources": {"web": {"oauth_clients": {"lytics": "cs-1"}}}, "oauth_signing_keys": ["sig"]}
            )
        )
        assert reload_secrets(ingress, settings)
        assert await status("/v1/lytics/crm", crm_only) == 401
        assert await status("/v1/lytics/web", crm_only) == 401  # issued for crm only, still
        assert await status("/v1/lytics/web", everywhere) == 200
        # The same client id under two sources: refused with a clear error, the previous grant stays.
        keys.write_bytes(
            orjson.dumps(
                {
                    "sources": {
                        "web": {"oauth_clients": {"lytics": "cs-1"}},
                        "crm": {"oauth_clients": {"lytics": "cs-2"}},
                    },
                    "oauth_signing_keys": ["sig"],
                }
            )
        )
        assert not reload_secrets(ingress, settings)
        assert await status("/v1/lytics/web", everywhere) == 200
        with pytest.raises(KeysFileError) as caught:
            ingress.app[AUTH].reload()
    assert "'lytics' is configured twice in the keys file (sources.web and sources.crm)" in str(caught.value)
    assert "cs-1" not in str(caught.value) and "cs-2" not in str(caught.value)


def test_a_client_id_twice_in_the_environment_is_refused_at_start() -> None:
    settings = Settings.model_validate(
        {"oauth_clients": {"lytics": "s1"}, "sources": {"crm": {"oauth_clients": {"lytics": "s2"}}}}
    )
    with pytest.raises(
        KeysFileError,
        match=r"'lytics' is configured twice in the environment "
        r"\(RELAY_OAUTH_CLIENTS and RELAY_SOURCES.crm\)",
    ):
        Authenticator(settings)


async def test_a_worker_refuses_a_client_id_twice_with_exit_78(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The worker's query routes load the same credentials: the same refusal, a clear line, 78."""
    settings = make_settings(
        kafka_bootstrap,
        oauth_clients={"lytics": "client-sekrit-1"},
        sources={"crm": {"oauth_clients": {"lytics": "client-sekrit-2"}}},
    )
    await create_topics(settings)
    worker = start_worker(settings, tmp_path)
    try:
        code = await asyncio.to_thread(worker.proc.wait, 120)
    finally:
        worker.stop()
    text = worker.log.read_text()
    assert code == 78, text[-3000:]
    assert "error: the OAuth client id 'lytics' is configured twice in the environment" in text
    assert "client-sekrit" not in text


# --- 16. the operations port never answers a request it is serving with a 408 ----------------------


async def test_the_operations_port_serves_kept_alive_requests_past_the_head_deadline(
    kafka_bootstrap: str,
) -> None:
    settings = hardened(kafka_bootstrap, ingress_header_timeout_seconds=0.5)
    async with serving(settings, kafka=False) as ingress:
        assert ingress.ops_site is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress.ops_site.port)
        statuses = []
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # four head deadlines on one connection
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            statuses.append(status_of(await answer_of(reader, fail_after=10)))
            await asyncio.sleep(0.1)  # the probe's own pace
        writer.close()
    assert set(statuses) == {200}, statuses


async def test_a_request_in_progress_is_not_cut_by_the_head_deadline_nor_buried_under_pipelining(
    local_kafka: LocalKafka,
) -> None:
    settings = hardened(local_kafka.bootstrap, ingress_header_timeout_seconds=0.5)
    await create_topics(settings)
    async with serving(settings) as ingress:
        assert ingress.ops_site is not None
        pid = local_kafka.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the broker stops answering: /readyz waits its full 2 s
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", ingress.ops_site.port)
            started = time.monotonic()
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await answer_of(reader, fail_after=20)
            took = time.monotonic() - started
            writer.close()
            # Requests sent ahead of the answer wait unparsed; more than 64 KiB of them is cut.
            ahead = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n"
            cut = await exchange(
                ingress.ops_site.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n" + ahead * 80
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        await until(lambda: ingress.limits.open == 0, 30, "the connections to be released")
    assert took > 0.5  # the head deadline passed while the request was being served...
    assert status_of(answer) == 503, answer  # ...and the answer is the handler's, not a 408
    assert cut == b"", cut  # cut before it was answered: nothing of the 80 requests was served


async def test_pipelined_requests_are_served_one_at_a_time_in_order(kafka_bootstrap: str) -> None:
    settings = hardened(kafka_bootstrap, oauth_clients={"lytics": "client-secret"})
    await create_topics(settings)
    async with serving(settings) as ingress:
        form = b"grant_type=client_credentials&client_id=lytics&client_secret=client-secret"
        token = (
            b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(form)}\r\n\r\n".encode()
            + form
        )
        health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answers = await exchange(ingress.site.port, health + token + health + token + last)
        # A 4 MiB body sent with its head arrives over many reads, some before aiohttp has the head:
        # its bytes reach the handler, and Kafka, in order.
        body = b'{"data": {"pad": "' + b"a" * (4 * MiB) + b'"}}'
        big = await exchange(
            ingress.site.port,
            b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + KEY_HEADER
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
        )
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]
    assert statuses == [200] * 5, answers
    assert answers.count(b'"access_token"') == 2 and answers.count(b'"status":"alive"') == 3
    assert status_of(big) == 200, big
    [stored] = await read_topic(kafka_bootstrap, TopicNames.from_settings(settings).raw)
    assert stored.value == body


# --- --insecure never opens an ingress that has a keys file ------------------------------------------


async def test_insecure_with_an_empty_keys_file_refuses_to_start(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_bytes(b"{}")
    settings = make_settings(
        kafka_bootstrap,
        ingress_api_keys=[],
        ingress_keys_file=keys,
        ingress_host="127.0.0.1",
        ingress_port=free_port(),
        ingress_metrics_port=free_port(),
    )
    ingress = Component(settings, ["ingress", "--insecure"], tmp_path / "ingress.log")
    try:
        code = await asyncio.to_thread(ingress.proc.wait, 60)
    finally:
        ingress.stop()
    text = ingress.log.read_text()
    assert code == 78, text  # EX_CONFIG: a person must change the keys file
    assert "error: refusing to start" in text and "leaves no credential at all" in text


async def test_a_reload_never_switches_an_insecure_ingress_to_accepting_anyone(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_bytes(orjson.dumps({"api_keys": ["file-key"]}))
    settings = hardened(kafka_bootstrap, ingress_api_keys=[], ingress_keys_file=keys)
    await create_topics(settings)
    app = build_app(settings, insecure=True)
    assert not app[AUTH].allow_anonymous
    ingress = await start_listeners(app, settings)
    try:
        keys.write_bytes(b"{}")
        assert not reload_secrets(ingress, settings)
        async with aiohttp.ClientSession() as http:
            async with http.post(ingress.url + "/v1/lytics", data=b"{}") as resp:
                assert resp.status == 401
            async with http.post(
                ingress.url + "/v1/lytics", data=b"{}", headers={"X-API-KEY": "file-key"}
            ) as resp:
                assert resp.status != 401
    finally:
        await ingress.close()
