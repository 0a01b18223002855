"""No secret — configured key, presented key, client secret, token, signing key — reaches a log line."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from audience_relay.logs import JsonFormatter
from audience_relay.topics import create_topics
from tests.conftest import make_settings, start_ingress

SECRETS = ["sekrit-key-123", "client-sekrit-456", "sign-sekrit-789", "sekrit-key-124"]


async def test_no_secret_in_logs_or_answers(kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(
        kafka_bootstrap,
        ingress_api_keys=["sekrit-key-123"],
        oauth_clients={"lytics": "client-sekrit-456"},
        oauth_signing_key="sign-sekrit-789",
        max_body_bytes=2048,
    )
    await create_topics(settings)
    caplog.set_level(logging.DEBUG)
    running = await start_ingress(settings)
    answers: list[str] = []
    token = ""
    try:
        async with aiohttp.ClientSession() as http:
            for headers, body in [
                ({"X-API-KEY": "sekrit-key-123"}, b"{}"),
                ({"X-API-KEY": "sekrit-key-124"}, b"{}"),
                ({"Authorization": "Bearer sekrit-key-124"}, b"{}"),
                ({"X-API-KEY": "sekrit-key-123"}, b"not json"),
                ({"X-API-KEY": "sekrit-key-123"}, b"x" * 4096),
            ]:
                async with http.post(running.url + "/v1/lytics", data=body, headers=headers) as resp:
                    answers.append(await resp.text())
            async with http.post(running.url + "/v1/lytics", params={"api_key": "sekrit-key-124"}) as resp:
                answers.append(await resp.text())
            for secret in ("client-sekrit-456", "wrong"):
                form = {"grant_type": "client_credentials", "client_id": "lytics", "client_secret": secret}
                async with http.post(running.url + "/oauth/token", data=form) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        token = (await resp.json())["access_token"]
                    else:
                        answers.append(text)
            async with http.post(
                running.url + "/v1/lytics", data=b"{}", headers={"Authorization": f"Bearer {token}x"}
            ) as resp:
                answers.append(await resp.text())
    finally:
        await running.runner.cleanup()
    assert token
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any("unauthenticated request" in line for line in lines)  # the refusals were logged...
    for secret in [*SECRETS, token]:
        for line in lines:
            assert secret not in line, f"secret in log line: {line}"  # ...without any secret
        for answer in answers:
            assert secret not in answer
