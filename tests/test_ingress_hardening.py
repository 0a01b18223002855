"""Slow and abusive clients, deny-by-default auth, per-source rate limits and TLS, over real sockets.

The ingress runs in the test's loop behind its real listener (``ingress.server.start_listeners``:
the guarded site, the operations port); clients are raw asyncio streams where the test needs to
misbehave byte by byte, aiohttp where it plays a well-behaved Lytics.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from pydantic import ValidationError

from audience_relay.auth import Authenticator
from audience_relay.kafkautil import read_topic, topic_size
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import free_port
from devtools.wait import until
from ingress import metrics
from ingress.access import PUBLIC_ROUTES
from ingress.app import AUTH, BUDGET, PUBLISHER, build_app
from ingress.ratelimit import RateLimiter
from ingress.server import Listeners, TlsError, reload_secrets, start_listeners, tls_context
from tests.conftest import NO_BROKER, make_settings

KEY = {"X-API-KEY": "key-current"}


def hardened(bootstrap: str, **overrides: object) -> Settings:
    """Test settings on free loopback ports (the ops port apart from the main one)."""
    values: dict[str, object] = {
        "ingress_host": "127.0.0.1",
        "ingress_port": free_port(),
        "ingress_metrics_port": free_port(),
    }
    values.update(overrides)
    return make_settings(bootstrap, **values)


@asynccontextmanager
async def serving(settings: Settings, *, kafka: bool = True) -> AsyncIterator[Listeners]:
    listeners = await start_listeners(build_app(settings), settings)
    try:
        if kafka:
            assert await listeners.app[PUBLISHER].wait_connected(timeout=60), "never connected to Kafka"
        yield listeners
    finally:
        await listeners.close()


async def read_all(reader: asyncio.StreamReader, fail_after: float = 60) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed).

    ``fail_after`` only turns a server that never hangs up into a failure instead of a hang.
    """
    chunks = []

    async def drain() -> None:
        try:
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass

    try:
        await asyncio.wait_for(drain(), fail_after)
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {fail_after}s") from None
    return b"".join(chunks)


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> int:
    """Send ``data`` a byte at a time; returns how many bytes went out before the server hung up."""
    sent = 0
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            sent += 1
            await asyncio.sleep(every)  # the client's own pace: this is what a slowloris does
    except (ConnectionResetError, BrokenPipeError):
        pass
    return sent


def timeouts(phase: str) -> float:
    """How many connections the ingress cut for a late head or body so far (its own counter)."""
    return float(metrics.TIMEOUTS.labels(phase)._value.get())


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(match.group(1)) if match else 0


def body_of(answer: bytes) -> dict[str, object]:
    return dict(orjson.loads(answer.split(b"\r\n\r\n", 1)[1]))


async def post(
    url: str, body: bytes, headers: dict[str, str], ssl_context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, object], dict[str, str]]:
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(url, data=body, headers=headers) as resp,
    ):
        raw = await resp.read()
        return resp.status, (orjson.loads(raw) if raw else {}), dict(resp.headers)


# --- slow clients -----------------------------------------------------------------------------


async def test_slowloris_heads_are_cut_while_others_are_served(kafka_bootstrap: str) -> None:
    settings = hardened(kafka_bootstrap, ingress_header_timeout_seconds=1.0, ingress_max_connections=50)
    await create_topics(settings)
    head = b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nX-API-KEY: key-current\r\nX-Slow: " + b"a" * 400
    async with serving(settings) as ingress:
        clients = 20
        conns = [await asyncio.open_connection("127.0.0.1", ingress.site.port) for _ in range(clients)]
        started = time.monotonic()
        cut_before = timeouts("headers")
        trickles = [asyncio.create_task(trickle(w, head, 0.05)) for _, w in conns]
        await until(lambda: ingress.limits.open == clients, 30, "every slow client to be connected")
        # A well-behaved client is served while the slow ones hold their connections.
        status, answer, _ = await post(ingress.url + "/v1/lytics", b'{"data": {"email": "a@b.c"}}', KEY)
        assert status == 200, answer
        answers = await asyncio.gather(*(read_all(r) for r, _ in conns))
        cut_after = time.monotonic() - started
        sent = await asyncio.gather(*trickles)
        for _, w in conns:
            w.close()
        # Each got a 408 and was cut long before it finished its head: the server hung up, not the client.
        assert {status_of(a) for a in answers} == {408}
        assert body_of(answers[0])["error"] == "request_timeout"
        assert max(sent) < len(head)
        assert timeouts("headers") == cut_before + clients  # cut by the head deadline, nothing else
        await until(lambda: ingress.limits.open == 0, 30, "the cut connections to be released")
        await until(lambda: not ingress.runner.server.connections, 30, "aiohttp to drop its handlers")  # type: ignore[union-attr]
    print(f"slowloris: {clients} slow heads cut {cut_after:.2f}s after connecting (header timeout 1 s)")


async def test_a_silent_connection_is_closed_after_the_head_deadline() -> None:
    settings = hardened(NO_BROKER, ingress_header_timeout_seconds=0.5)
    async with serving(settings, kafka=False) as ingress:
        before = timeouts("headers")
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress.site.port)
        answer = await read_all(reader)  # nothing sent: closed without an answer
        writer.close()
        assert answer == b""
        assert timeouts("headers") == before + 1
        await until(lambda: ingress.limits.open == 0, 30, "the silent connection to be released")


async def test_slow_body_is_cut_with_408_and_stores_nothing(kafka_bootstrap: str) -> None:
    settings = hardened(kafka_bootstrap, ingress_header_timeout_seconds=5.0, ingress_body_timeout_seconds=1.0)
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    body = b'{"data": {"email": "slow@example.com", "pad": "' + b"p" * 200 + b'"}}'
    head = (
        f"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nX-API-KEY: key-current\r\nX-Request-Id: slow-body\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with serving(settings) as ingress:
        cut_before = timeouts("body")
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress.site.port)
        writer.write(head)
        started = time.monotonic()
        sending = asyncio.create_task(trickle(writer, body, 0.05))
        await until(lambda: ingress.app[BUDGET].used > 0, 30, "the body's bytes to be reserved")
        answer = await read_all(reader)
        cut_after = time.monotonic() - started
        sent = await sending
        writer.close()
        assert status_of(answer) == 408, answer
        assert body_of(answer) == {
            "error": "request_timeout",
            "detail": "the request body did not arrive within 1 s",
            "request_id": "slow-body",
        }
        assert sent < len(body) and timeouts("body") == cut_before + 1
        await until(lambda: ingress.limits.open == 0, 30, "the connection to be released")
        assert ingress.app[BUDGET].used == 0  # the reservation went with it
    assert await topic_size(kafka_bootstrap, topics.raw) == 0
    assert await topic_size(kafka_bootstrap, topics.dead_letter) == 0
    print(f"slow body: cut {cut_after:.2f}s after its headers (body timeout 1 s), {sent} bytes in")


async def test_an_answer_sent_before_a_slow_body_is_not_followed_by_a_408() -> None:
    settings = hardened(NO_BROKER, ingress_header_timeout_seconds=1.0)
    head = b"POST /v1/lytics HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n"  # no credentials
    async with serving(settings, kafka=False) as ingress:
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress.site.port)
        writer.write(head)
        sending = asyncio.create_task(trickle(writer, b"x" * 400, 0.05))
        answer = await read_all(reader)
        sent = await sending
        writer.close()
        # The 401 went out at once; the unread body then got no more than a head's time, and no 408.
        assert status_of(answer) == 401 and answer.count(b"HTTP/1.1 ") == 1
        assert sent < 400
        await until(lambda: ingress.limits.open == 0, 30, "the connection to be released")


async def test_connection_cap_answers_503_quickly_and_frees_up(kafka_bootstrap: str) -> None:
    cap = 4
    settings = hardened(kafka_bootstrap, ingress_max_connections=cap, ingress_header_timeout_seconds=60.0)
    await create_topics(settings)
    async with serving(settings) as ingress:
        held = [await asyncio.open_connection("127.0.0.1", ingress.site.port) for _ in range(cap)]
        await until(lambda: ingress.limits.open == cap, 30, "the cap to be reached")
        # One more (raw): answered at once with a 503 and closed, without sending anything.
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress.site.port)
        answer = await read_all(reader)
        refused_in = time.monotonic() - started
        writer.close()
        assert status_of(answer) == 503
        assert b"\r\nRetry-After: 5\r\n" in answer
        assert body_of(answer)["error"] == "too_many_connections"
        # A real client that sends its request straight away gets the same 503 (not a reset).
        status, body, headers = await post(ingress.url + "/v1/lytics", b"{}", KEY)
        assert status == 503 and body["error"] == "too_many_connections" and headers["Retry-After"] == "5"
        # A burst far beyond the cap: every connection is answered 503 or closed, none is left hanging
        # (read_all fails on a connection the server neither answers nor closes).
        burst = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", ingress.site.port) for _ in range(300))
        )
        outcomes = await asyncio.gather(*(read_all(r, fail_after=30) for r, _ in burst))
        for _, w in burst:
            w.close()
        assert any(status_of(o) == 503 for o in outcomes)
        assert all(o == b"" or status_of(o) == 503 for o in outcomes)
        assert ingress.limits.open == cap  # the held connections were not disturbed
        # A slot frees up: the next client is served.
        held[0][1].close()
        await until(lambda: ingress.limits.open == cap - 1, 30, "a slot to free up")
        status, body, _ = await post(ingress.url + "/v1/lytics", b'{"data": {}}', KEY)
        assert status == 200, body
        for _, w in held[1:]:
            w.close()
        await until(lambda: ingress.limits.open == 0 and ingress.limits.refusing == 0, 30, "all released")
    print(f"connection cap {cap}: the next connection got its 503 in {refused_in * 1000:.1f} ms")


# --- rate limit ---------------------------------------------------------------------------------


def test_token_bucket_arithmetic() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [0, 0, 0]  # the burst
    assert limiter.check("a") == 1  # empty: a token in 0.5 s, rounded up to whole seconds
    assert limiter.check("b") == 0  # another source has its own bucket
    now[0] += 0.5
    assert limiter.check("a") == 0 and limiter.check("a") == 1
    now[0] += 100
    assert [limiter.check("a") for _ in range(4)] == [0, 0, 0, 1]  # refilled to the burst, not beyond
    slow = RateLimiter(rate=0.01, burst=1, clock=lambda: now[0])
    assert slow.check("a") == 0 and slow.check("a") == 100
    assert RateLimiter(rate=0, burst=1).check("a") == 0  # 0 turns the limit off


async def test_rate_limit_is_per_source(kafka_bootstrap: str) -> None:
    settings = hardened(
        kafka_bootstrap,
        ingress_rate_limit_per_second=0.01,  # one token per 100 s: no refill during the test
        ingress_rate_limit_burst=3,
        sources={"crm": {"api_keys": ["crm-key"]}, "web": {"api_keys": ["web-key"]}},
    )
    await create_topics(settings)
    async with serving(settings) as ingress:
        crm, web = ingress.url + "/v1/lytics/crm", ingress.url + "/v1/lytics/web"
        for _ in range(3):
            assert (await post(crm, b'{"a": 1}', {"X-API-KEY": "crm-key"}))[0] == 200
        status, body, headers = await post(crm, b'{"a": 1}', {"X-API-KEY": "crm-key", "X-Request-Id": "r9"})
        assert status == 429
        assert body["error"] == "rate_limited" and body["request_id"] == "r9"
        assert 1 <= int(headers["Retry-After"]) <= 100
        assert headers["Content-Type"].startswith("application/json")
        # Another source is still served, and unauthenticated requests do not spend crm's tokens.
        assert (await post(web, b'{"a": 2}', {"X-API-KEY": "web-key"}))[0] == 200
        assert (await post(crm, b'{"a": 3}', {"X-API-KEY": "wrong"}))[0] == 401
    records = await read_topic(kafka_bootstrap, TopicNames.from_settings(settings).raw)
    assert len(records) == 4


# --- auth on every route ---------------------------------------------------------------------------


async def test_every_non_public_route_requires_credentials() -> None:
    port = free_port()
    # Metrics on the main port, so that /metrics is one of this app's routes too.
    settings = hardened(NO_BROKER, ingress_port=port, ingress_metrics_port=port)
    async with serving(settings, kafka=False) as ingress:
        routes = [
            (route.method, re.sub(r"\{[^}]+\}", "default", route.resource.canonical))
            for route in ingress.app.router.routes()
            if route.resource is not None
        ]
        assert ("POST", "/v1/lytics") in routes and ("GET", "/metrics") in routes
        checked = 0
        async with aiohttp.ClientSession() as http:
            for method, path in routes:
                # /oauth/token gets a well-formed grant request, only without client credentials.
                body = b"grant_type=client_credentials" if path == "/oauth/token" else b"{}"
                kind = "application/x-www-form-urlencoded" if path == "/oauth/token" else "application/json"
                async with http.request(
                    method, ingress.url + path, data=body, headers={"Content-Type": kind}
                ) as resp:
                    text = await resp.text()
                    if path in PUBLIC_ROUTES and path != "/oauth/token":
                        assert resp.status != 401, (method, path)
                        continue
                    # /oauth/token is public but checks the client's own credentials: none -> 401 too.
                    assert resp.status == 401, (method, path, resp.status)
                    if path != "/oauth/token" and method != "HEAD":
                        assert orjson.loads(text)["error"] == "unauthorized"
                    checked += 1
            # Paths and methods no route serves need credentials too (no probing without them).
            for method, path in [("GET", "/nope"), ("POST", "/healthz"), ("GET", "/v1/lytics")]:
                async with http.request(method, ingress.url + path) as resp:
                    assert resp.status == 401, (method, path)
            async with http.get(ingress.url + "/nope", headers=KEY) as resp:
                assert resp.status == 404 and (await resp.json())["error"] == "not_found"
            async with http.get(ingress.url + "/v1/lytics", headers=KEY) as resp:
                assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"
                assert resp.headers["Allow"] == "POST"
    assert checked >= 3
    print(f"{checked} non-public route/method pairs answered 401 without credentials")


async def test_metrics_live_on_their_own_port() -> None:
    settings = hardened(NO_BROKER)
    async with serving(settings, kafka=False) as ingress, aiohttp.ClientSession() as http:
        assert ingress.ops_site is not None
        async with http.get(ingress.ops_url + "/metrics") as resp:
            assert resp.status == 200 and "relay_ingress_connections_open" in await resp.text()
        async with http.get(ingress.ops_url + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(ingress.url + "/metrics") as resp:
            assert resp.status == 401  # not served on the webhook port, and no probing without a key
        async with http.get(ingress.url + "/metrics", headers=KEY) as resp:
            assert resp.status == 404


async def test_every_bad_credential_gets_the_same_401() -> None:
    settings = hardened(
        NO_BROKER,
        oauth_clients={"lytics": "client-secret-1"},
        oauth_signing_key="signing-key-1",
        sources={"crm": {"api_keys": ["crm-key"], "oauth_clients": {"crm-job": "crm-secret"}}},
    )
    async with serving(settings, kafka=False) as ingress:
        auth: Authenticator = ingress.app[AUTH]
        good = auth.issue_token("lytics", "client-secret-1")
        expired = auth.issue_token("lytics", "client-secret-1", now=0)
        crm_only = auth.issue_token("crm-job", "crm-secret")
        other_key = Authenticator(
            make_settings(NO_BROKER, oauth_clients={"lytics": "x"}, oauth_signing_key="another-key")
        ).issue_token("lytics", "x")
        assert good and expired and crm_only and other_key
        payload, _, signature = good.access_token.partition(".")[2].partition(".")
        bad: list[dict[str, str]] = [
            {},
            {"X-API-KEY": "wrong"},
            {"X-API-KEY": "key-curren"},
            {"X-API-KEY": "key-currentt"},
            {"X-API-KEY": "crm-key"},  # a real key, of another source
            {"Authorization": "key-previous-not"},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {expired.access_token}"},
            {"Authorization": f"Bearer {good.access_token[:-3]}"},
            {"Authorization": f"Bearer rt1.{payload}.{signature[::-1]}"},
            {"Authorization": f"Bearer {other_key.access_token}"},
            {"Authorization": f"Bearer {crm_only.access_token}"},  # a token for another source
            {"Authorization": "Bearer rt1."},
            {"Authorization": "Basic a2V5LWN1cnJlbnQ6"},
        ]
        seen = set()
        async with aiohttp.ClientSession() as http:
            for headers in bad:
                async with http.post(
                    ingress.url + "/v1/lytics", data=b"{}", headers={**headers, "X-Request-Id": "same"}
                ) as resp:
                    seen.add((resp.status, await resp.read(), resp.headers.get("WWW-Authenticate")))
            async with http.post(
                ingress.url + "/v1/lytics", params={"api_key": "wrong"}, headers={"X-Request-Id": "same"}
            ) as resp:
                seen.add((resp.status, await resp.read(), resp.headers.get("WWW-Authenticate")))
            async with http.post(
                ingress.url + "/v1/lytics",
                data=b"{}",
                headers={"Authorization": f"Bearer {good.access_token}"},
            ) as resp:
                assert resp.status != 401  # the good token passes (the broker is not needed to tell)
            # The token endpoint: unknown client and wrong secret are the same refusal as well.
            token_answers = set()
            for cid, secret in (("lytics", "nope"), ("x", "y")):
                form = {"client_id": cid, "client_secret": secret}
                async with http.post(
                    ingress.url + "/oauth/token", data={"grant_type": "client_credentials", **form}
                ) as resp:
                    token_answers.add((resp.status, await resp.read()))
    assert seen == {
        (
            401,
            b'{"error":"unauthorized","detail":"missing or invalid credentials","request_id":"same"}',
            "Bearer",
        )
    }
    assert token_answers == {(401, b'{"error":"invalid_client"}')}


# --- TLS ------------------------------------------------------------------------------------------


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (openssl CLI)."""
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_with_a_self_signed_certificate_and_reload(kafka_bootstrap: str, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "first")
    settings = hardened(kafka_bootstrap, ingress_tls_cert_file=cert, ingress_tls_key_file=key)
    await create_topics(settings)
    trusts_first = ssl.create_default_context(cafile=str(cert))
    body = b'{"data": {"email": "tls@example.com"}}'
    async with serving(settings) as ingress:
        assert ingress.url.startswith("https://")
        status, answer, _ = await post(ingress.url + "/v1/lytics", body, KEY, trusts_first)
        assert status == 200, answer
        # Plain HTTP on the TLS port gets nowhere.
        with pytest.raises(aiohttp.ClientError):
            await post(ingress.url.replace("https://", "http://") + "/v1/lytics", body, KEY)
        # A renewed certificate is picked up by SIGHUP's reload, for new connections.
        new_cert, new_key = self_signed(tmp_path, "second")
        new_cert.replace(cert)
        new_key.replace(key)
        trusts_second = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await post(ingress.url + "/v1/lytics", body, KEY, trusts_second)
        assert reload_secrets(ingress, settings)
        assert (await post(ingress.url + "/v1/lytics", body, KEY, trusts_second))[0] == 200
    records = await read_topic(kafka_bootstrap, TopicNames.from_settings(settings).raw)
    assert [r.value for r in records] == [body, body]


def test_tls_needs_both_files_and_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="RELAY_INGRESS_TLS_CERT_FILE and RELAY_INGRESS_TLS_KEY_FILE"):
        Settings.model_validate({"ingress_tls_cert_file": tmp_path / "c.pem"})
    with pytest.raises(ValidationError, match="RELAY_INGRESS_TLS_CERT_FILE and RELAY_INGRESS_TLS_KEY_FILE"):
        Settings.model_validate({"ingress_tls_key_file": tmp_path / "k.pem"})
    missing = Settings.model_validate(
        {"ingress_tls_cert_file": tmp_path / "c.pem", "ingress_tls_key_file": tmp_path / "k.pem"}
    )
    with pytest.raises(TlsError, match="cannot read the TLS certificate"):
        tls_context(missing)
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    mismatched = Settings.model_validate({"ingress_tls_cert_file": cert, "ingress_tls_key_file": other_key})
    with pytest.raises(TlsError, match="cannot use the TLS certificate"):
        tls_context(mismatched)
