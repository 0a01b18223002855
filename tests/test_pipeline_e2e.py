"""The whole pipeline: webhooks in → worker → Pushly, ODP and analytics out."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from audience_relay.kafkautil import read_topic
from audience_relay.topics import TopicNames, create_topics
from devtools.processes import start_worker, wait_group
from devtools.wait import until, until_async
from tests.conftest import SAMPLES, start_ingress
from tests.fakes import FakeDestination
from tests.test_sinks import Running, sink_settings

AUDIENCE = "42976a269a5e6b9d06c681b1c27292df"


async def test_webhook_to_every_destination(kafka_bootstrap: str, tmp_path: Path) -> None:
    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    # The samples carry no Lytics ID (_id), ODP's default identifier: send it the match field here
    # (tests/test_sinks.py shows ODP getting the Lytics ID from a change's identifiers).
    settings = sink_settings(kafka_bootstrap, pushly, odp, odp_identifier_source="email")
    await create_topics(settings)
    topics = TopicNames.from_settings(settings)
    ingress = await start_ingress(settings)
    worker = start_worker(settings, tmp_path)
    sinks = [Running(settings, name) for name in ("pushly", "odp", "analytics")]
    try:
        await wait_group(settings, 1)
        enter = (SAMPLES / "default-format-enter.json").read_bytes()
        leave = orjson.loads(enter)
        leave["data"]["segment_events"] = [
            {
                "id": AUDIENCE,
                "event": "exit",
                "slug": "emailzz5",
                "exit": "2020-10-15T13:27:33.916374949-07:00",
            }
        ]
        async with aiohttp.ClientSession(headers={"X-API-KEY": "key-current"}) as http:
            # The user enters (three formats, one real change), a backfill repeats it, then they exit.
            for name in (
                "default-format-enter.json",
                "legacy-format-enter.json",
                "cloudevents-format-enter.json",
            ):
                async with http.post(ingress.url + "/v1/lytics", data=(SAMPLES / name).read_bytes()) as resp:
                    assert resp.status == 200
            await until(lambda: len(pushly.delivered()) == 1, 120, "the entered change at pushly")
            async with http.post(ingress.url + "/v1/lytics", data=b"[" + enter + b"," + enter + b"]") as resp:
                assert resp.status == 200
            async with http.post(ingress.url + "/v1/lytics", data=orjson.dumps(leave)) as resp:
                assert resp.status == 200
        await until(lambda: len(pushly.delivered()) == 2, 120, "the exited change at pushly")
        await until(lambda: sum(len(r.body) for r in odp.delivered()) == 2, 120, "both changes at odp")

        async def analytics() -> bool:
            return len(await read_topic(kafka_bootstrap, topics.analytics)) == 2

        await until_async(analytics, 60, "both changes on the analytics topic")
    finally:
        for s in sinks:
            await s.close()
        worker.stop()
        await ingress.runner.cleanup()
        await pushly.stop()
        await odp.stop()
    assert [r.body["data"]["segment_events"][0]["event"] for r in pushly.requests] == ["enter", "exit"]
    assert all(r.body["data"]["email"] == "user@example.com" for r in pushly.requests)
    assert [rec["data"]["_id"] for r in odp.requests for rec in r.body] == ["user@example.com"] * 2
    events = [orjson.loads(r.value) for r in await read_topic(kafka_bootstrap, topics.analytics)]
    assert [e["type"] for e in events] == [
        "com.audience-relay.membership.entered",
        "com.audience-relay.membership.exited",
    ]
    assert events[1]["data"]["seconds_in_audience"] == 86400.0


async def test_the_member_query_shows_what_each_destination_was_sent(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The delivery log, read back beside the membership: Pushly took the change, ODP refused it."""
    from tests.fakes import Answer

    pushly, odp = await FakeDestination().start(), await FakeDestination().start()
    odp.default = Answer(400, body='{"error": "bad record"}')
    settings = sink_settings(kafka_bootstrap, pushly, odp, odp_identifier_source="email")
    await create_topics(settings)
    ingress = await start_ingress(settings)
    worker = start_worker(settings, tmp_path)
    sinks = [Running(settings, name) for name in ("pushly", "odp")]
    port = worker.env["RELAY_WORKER_WEB_PORT"]
    try:
        await wait_group(settings, 1)
        async with aiohttp.ClientSession(headers={"X-API-KEY": "key-current"}) as http:
            enter = (SAMPLES / "default-format-enter.json").read_bytes()
            async with http.post(ingress.url + "/v1/lytics", data=enter) as resp:
                assert resp.status == 200
            answer: dict[str, object] = {}

            async def both_logged() -> bool:
                nonlocal answer
                async with http.get(f"http://127.0.0.1:{port}/v1/members/user@example.com") as resp:
                    if resp.status != 200:
                        return False
                    answer = await resp.json()
                [membership] = answer["audiences"]  # type: ignore[index]
                return set(membership["deliveries"]) == {"pushly", "odp"}

            await until_async(both_logged, 120, "both destinations' outcomes in the member query")
    finally:
        for s in sinks:
            await s.close()
        worker.stop()
        await ingress.runner.cleanup()
        await pushly.stop()
        await odp.stop()
    [membership] = answer["audiences"]  # type: ignore[index]
    assert membership["audience_id"] == AUDIENCE
    pushly_outcome, odp_outcome = membership["deliveries"]["pushly"], membership["deliveries"]["odp"]
    assert (pushly_outcome["outcome"], pushly_outcome["status"], pushly_outcome["change"]) == (
        "delivered",
        200,
        "entered",
    )
    assert (odp_outcome["outcome"], odp_outcome["status"]) == ("dead_lettered", 400)
