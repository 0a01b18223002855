"""Key rotation without a restart: the keys file, its validation, and SIGHUP on a real ingress process."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from audience_relay.auth import Authenticator
from audience_relay.kafkautil import read_topic
from audience_relay.keys import KeysFileError, read_keys_file
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import free_port
from devtools.processes import Component
from devtools.wait import until, until_async
from tests.conftest import NO_BROKER, make_settings


def write_keys(path: Path, document: dict[str, Any] | bytes) -> None:
    """Replace the keys file atomically (write aside, rename), as the README tells operators to."""
    aside = path.with_suffix(".tmp")
    aside.write_bytes(document if isinstance(document, bytes) else orjson.dumps(document))
    os.replace(aside, path)


# --- the file and the in-process reload -----------------------------------------------------------


@pytest.mark.parametrize(
    "content, complaint",
    [
        (b'{"api_keys": ["topsecret-1"', "not valid JSON"),
        (b'{"api_keys": "topsecret-1"}', "api_keys: Input should be a valid list"),
        (b'{"oauth_clients": {"id": ["topsecret-1"]}}', "oauth_clients.id"),
        (b'{"api_keys": ["ok"], "apikeys": ["topsecret-1"]}', "apikeys: Extra inputs are not permitted"),
        (b'{"sources": {"bad/name": {"api_keys": ["topsecret-1"]}}}', "may only hold letters"),
        (b'{"api_keys": [" "]}', "keys must not be empty"),
    ],
)
def test_a_bad_keys_file_is_explained_without_its_secrets(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    path = tmp_path / "keys.json"
    write_keys(path, content)
    with pytest.raises(KeysFileError) as caught:
        read_keys_file(path)
    assert complaint in str(caught.value)
    assert "topsecret" not in str(caught.value)


def test_reload_swaps_keys_keeps_them_on_a_bad_file_and_rotates_signing_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_keys(
        path,
        {"api_keys": ["file-key-1"], "oauth_clients": {"lytics": "cs-1"}, "oauth_signing_keys": ["sig-1"]},
    )
    settings = make_settings(NO_BROKER, ingress_api_keys=["env-key"], ingress_keys_file=path)
    auth = Authenticator(settings)

    def ok(key: str, source: str = "default") -> bool:
        return auth.authenticate(source, {"X-API-KEY": key}, {}) is not None

    assert ok("env-key") and ok("file-key-1") and not ok("file-key-2")
    old_token = auth.issue_token("lytics", "cs-1")
    assert old_token is not None
    # Rotate: new key, new client secret, new signing key (the old one still verifies).
    write_keys(
        path,
        {
            "api_keys": ["file-key-2"],
            "oauth_clients": {"lytics": "cs-2"},
            "oauth_signing_keys": ["sig-2", "sig-1"],
            "sources": {"crm": {"api_keys": ["crm-key"]}},
        },
    )
    assert auth.reload().summary()["sources"] == 1
    assert ok("env-key") and ok("file-key-2") and not ok("file-key-1")
    assert ok("crm-key", "crm") and auth.knows_source("crm")  # a new source, without a restart
    assert auth.issue_token("lytics", "cs-1") is None
    new_token = auth.issue_token("lytics", "cs-2")
    assert new_token is not None
    assert auth.verify_token(old_token.access_token, "default")  # lives out its TTL
    # A broken file changes nothing.
    write_keys(path, b"{not json")
    with pytest.raises(KeysFileError):
        auth.reload()
    assert ok("file-key-2") and auth.verify_token(new_token.access_token, "default")
    # Retiring the old signing key voids the tokens it signed; removing the client voids all of its.
    write_keys(
        path,
        {"api_keys": ["file-key-2"], "oauth_clients": {"lytics": "cs-2"}, "oauth_signing_keys": ["sig-2"]},
    )
    auth.reload()
    assert not auth.verify_token(old_token.access_token, "default")
    assert auth.verify_token(new_token.access_token, "default")
    write_keys(path, {"api_keys": ["file-key-2"], "oauth_signing_keys": ["sig-2"]})
    auth.reload()
    assert not auth.verify_token(new_token.access_token, "default")
    # A file that leaves nothing at all (the env key aside) would lock everyone out only if alone.
    alone = Authenticator(make_settings(NO_BROKER, ingress_api_keys=[], ingress_keys_file=path))
    write_keys(path, {})
    with pytest.raises(KeysFileError, match="no credential"):
        alone.reload()
    assert alone.authenticate("default", {"X-API-KEY": "file-key-2"}, {}) is not None
    # At start-up a missing file is an error, not an ingress without those keys.
    with pytest.raises(KeysFileError, match="cannot read the keys file"):
        Authenticator(make_settings(NO_BROKER, ingress_keys_file=tmp_path / "missing.json"))


# --- SIGHUP on a real process ---------------------------------------------------------------------


async def test_sighup_rotates_keys_on_a_running_ingress_without_dropping_a_request(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    write_keys(
        keys,
        {"api_keys": ["old-key"], "oauth_clients": {"lytics": "cs-1"}, "oauth_signing_keys": ["sig-1"]},
    )
    port, ops_port = free_port(), free_port()
    settings = make_settings(
        kafka_bootstrap,
        ingress_api_keys=[],
        ingress_keys_file=keys,
        ingress_host="127.0.0.1",
        ingress_port=port,
        ingress_metrics_port=ops_port,
    )
    await create_topics(settings)
    url = f"http://127.0.0.1:{port}/v1/lytics"
    ingress = Component(settings, ["ingress"], tmp_path / "ingress.log")
    answered: dict[str, int] = {}  # request id -> status, for every request sent
    failures: list[str] = []
    lytics_key = ["old-key"]  # what the Lytics job is configured with right now
    stop = asyncio.Event()

    async def lytics(http: aiohttp.ClientSession, worker: int) -> None:
        """A Lytics job worker posting steadily through the whole rotation; it must never see a failure."""
        n = 0
        while not stop.is_set():
            n += 1
            rid = f"lytics-{worker}-{n}"
            try:
                async with http.post(
                    url,
                    data=orjson.dumps({"n": n}),
                    headers={"X-API-KEY": lytics_key[0], "X-Request-Id": rid},
                ) as resp:
                    answered[rid] = resp.status
            except aiohttp.ClientError as exc:
                failures.append(f"{rid}: {exc!r}")
            await asyncio.sleep(0.005)  # a steady stream, not a load test

    async def probe(http: aiohttp.ClientSession, headers: dict[str, str]) -> int:
        rid = f"probe-{uuid.uuid4().hex[:8]}"
        async with http.post(url, data=b'{"probe": 1}', headers={**headers, "X-Request-Id": rid}) as resp:
            answered[rid] = resp.status
            return resp.status

    async def token(http: aiohttp.ClientSession, secret: str) -> str | None:
        form = {"grant_type": "client_credentials", "client_id": "lytics", "client_secret": secret}
        async with http.post(f"http://127.0.0.1:{port}/oauth/token", data=form) as resp:
            return str((await resp.json())["access_token"]) if resp.status == 200 else None

    def hup() -> None:
        ingress.proc.send_signal(signal.SIGHUP)

    def reloads(word: str) -> int:
        return ingress.log.read_text().count(word)

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
            old_token = await token(http, "cs-1")
            assert old_token and await probe(http, {"X-API-KEY": "new-key"}) == 401
            jobs = [asyncio.create_task(lytics(http, w)) for w in range(4)]  # Lytics posts in parallel
            await until(lambda: len(answered) > 5, 30, "the Lytics job to be posting")

            # 1. Add the new key next to the old one.
            write_keys(
                keys,
                {
                    "api_keys": ["old-key", "new-key"],
                    "oauth_clients": {"lytics": "cs-1"},
                    "oauth_signing_keys": ["sig-1"],
                },
            )
            hup()

            async def new_key_works() -> bool:
                return await probe(http, {"X-API-KEY": "new-key"}) == 200

            await until_async(new_key_works, 30, "the new key to be accepted", interval=0.1)
            lytics_key[0] = "new-key"  # 2. switch the Lytics job over

            # A broken file on the way is refused; what is in force stays in force.
            write_keys(keys, b'{"api_keys": ["new-key"')
            hup()
            await until(lambda: reloads("credentials not reloaded") == 1, 30, "the bad file to be refused")
            assert await probe(http, {"X-API-KEY": "old-key"}) == 200

            # 3. Remove the old key; rotate the client secret and the signing key (old one verifies).
            write_keys(
                keys,
                {
                    "api_keys": ["new-key"],
                    "oauth_clients": {"lytics": "cs-2"},
                    "oauth_signing_keys": ["sig-2", "sig-1"],
                },
            )
            hup()

            async def old_key_refused() -> bool:
                return await probe(http, {"X-API-KEY": "old-key"}) == 401

            await until_async(old_key_refused, 30, "the old key to be refused", interval=0.1)
            assert await token(http, "cs-1") is None
            new_token = await token(http, "cs-2")
            assert new_token
            assert await probe(http, {"Authorization": f"Bearer {old_token}"}) == 200
            assert await probe(http, {"Authorization": f"Bearer {new_token}"}) == 200

            # 4. Retire the old signing key: the tokens it signed stop working.
            write_keys(
                keys,
                {
                    "api_keys": ["new-key"],
                    "oauth_clients": {"lytics": "cs-2"},
                    "oauth_signing_keys": ["sig-2"],
                },
            )
            hup()

            async def old_token_refused() -> bool:
                return await probe(http, {"Authorization": f"Bearer {old_token}"}) == 401

            await until_async(old_token_refused, 30, "the old token to be refused", interval=0.1)
            assert await probe(http, {"Authorization": f"Bearer {new_token}"}) == 200
            stop.set()
            await asyncio.gather(*jobs)
        ingress.proc.terminate()
        assert await asyncio.to_thread(ingress.proc.wait, 60) == 0
    finally:
        stop.set()
        ingress.stop()
    lytics_answers = {rid: s for rid, s in answered.items() if rid.startswith("lytics-")}
    assert not failures, failures[:5]
    assert set(lytics_answers.values()) == {200}, "the Lytics job saw a refusal during the rotation"
    # Nothing dropped: every request answered 200 is in Kafka, nothing else is.
    stored = {
        dict(r.headers)["request-id"].decode()
        for r in await read_topic(kafka_bootstrap, TopicNames.from_settings(settings).raw)
    }
    assert stored == {rid for rid, s in answered.items() if s == 200}
    assert reloads("credentials reloaded") == 3
    log = ingress.log.read_text()
    for secret in ("old-key", "new-key", "cs-1", "cs-2", "sig-1", "sig-2", old_token, new_token):
        assert secret not in log
    print(f"rotation: {len(lytics_answers)} Lytics requests through 4 SIGHUPs, all 200, all stored")
