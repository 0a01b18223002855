"""Membership queries: pure counters, the OpenAPI document, and two real workers on the real broker."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from openapi_spec_validator import validate

from audience_relay.auth import Authenticator
from audience_relay.partitioner import partition_for
from audience_relay.settings import Settings
from audience_relay.topics import create_topics
from devtools.localkafka import free_port
from devtools.processes import Component, wait_for_outputs, wait_group
from devtools.wait import until_async
from processors.app import create_app
from processors.membership import decide, fold, identifier_prefix, state_key
from processors.queries import OPENAPI, SERVED_BY, member_view, parse_partitions
from processors.stages import AudienceCounts
from tests.conftest import make_settings
from tests.test_processors_e2e import bodies_for, oracle, preload

KEY = {"X-API-KEY": "key-current"}
QUERY_PREFIXES = ("/v1/", "/internal/", "/openapi.yaml")


# --- pure pieces -------------------------------------------------------------------------------


def _event(user: int, audience: int, kind: str, second: int) -> dict[str, Any]:
    return {
        "identifier": f"u{user}",
        "audience_id": f"a{audience}",
        "audience_slug": f"slug-{audience}",
        "event": kind,
        "event_time": f"2026-01-01T00:00:{second:02d}+00:00",
        "event_id": f"e{user}-{audience}-{kind}-{second}",
        "match_field": "email",
        "source": "default",
        "request_id": "r",
    }


def states_of(table: dict[bytes, Any], ident: str) -> list[dict[str, Any]]:
    """The stored states of one identifier (the values under its key prefix)."""
    return [v for k, v in table.items() if k.startswith(identifier_prefix(ident))]


def identifiers_of(table: dict[bytes, Any]) -> list[str]:
    return sorted({k.split(b"\x1f", 1)[0].decode() for k in table})


def test_incremental_counts_equal_a_rebuild() -> None:
    """Counting every write as it happens ends where counting the final table does."""
    rng = random.Random(7)
    counts, table = AudienceCounts(), {}
    counts.rebuild(0, [])
    for _ in range(3000):
        event = _event(rng.randrange(40), rng.randrange(4), rng.choice(["enter", "exit"]), rng.randrange(60))
        key = state_key(event["identifier"], event["audience_id"])
        old = table.get(key)
        new, _ = decide(old, event)
        if new is not None:
            counts.update(0, new["audience_id"], bool(old and old["member"]), new["member"])
            table[key] = new
    fresh = AudienceCounts()
    fresh.rebuild(0, ((k, orjson.dumps(v)) for k, v in table.items()))
    for audience in ("a0", "a1", "a2", "a3", "nobody"):
        expected = sum(1 for v in table.values() if v["audience_id"] == audience and v["member"])
        assert counts.count(0, audience) == fresh.count(0, audience) == expected
    counts.drop([0])
    assert counts.count(0, "a0") is None  # not counted: never served as 0


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_state_store_reads_what_it_applied_per_partition(store: str, tmp_path: Path) -> None:
    """Writes applied with their changelog offsets read back per partition and by identifier prefix."""
    settings = make_settings("127.0.0.1:1", table_store=store, partitions=4, worker_data_dir=tmp_path)
    app = create_app(settings)
    processors = app.processors
    states, _ = fold([_event(1, 0, "enter", 1), _event(1, 1, "enter", 2), _event(2, 0, "enter", 3)])
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in states.items():
        by_partition.setdefault(processors.store.partition_of(key), []).append((key, orjson.dumps(value)))
    for partition, writes in by_partition.items():
        processors.store.apply(partition, writes, last_offset=10 + len(writes))
        if store == "rocksdb":
            assert processors.store.persisted_offset(partition) == 10 + len(writes)
        keys = [k for k, _ in writes]
        assert processors.store.get_many(partition, [*keys, b"nobody\x1fa0"]) == [v for _, v in writes] + [
            None
        ]
    u1 = partition_for("u1", 4)
    assert [k for k, _ in processors.store.items(u1, identifier_prefix("u1"))] == [b"u1\x1fa0", b"u1\x1fa1"]
    assert list(processors.store.items(u1, identifier_prefix("u"))) == []  # "u" is no identifier here


def test_member_view_lists_current_audiences_only() -> None:
    states, _ = fold([_event(1, 0, "enter", 1), _event(1, 1, "enter", 2), _event(1, 1, "exit", 3)])
    view = member_view("u1", "email", states_of(states, "u1"))
    assert view == {
        "identifier": "u1",
        "match_field": "email",
        "audiences": [
            {
                "audience_id": "a0",
                "audience_slug": "slug-0",
                "entered_at": "2026-01-01T00:00:01Z",
                "updated_at": "2026-01-01T00:00:01Z",
                "deliveries": {},
            }
        ],
    }
    # The sinks' last outcomes go beside the membership they are about, by destination.
    outcome = {"destination": "odp", "audience_id": "a0", "outcome": "delivered", "change": "entered"}
    other = {**outcome, "audience_id": "a1", "destination": "pushly"}  # a1 is left: not shown
    [shown] = member_view("u1", "email", states_of(states, "u1"), [outcome, other])["audiences"]
    assert shown["deliveries"] == {
        "odp": {
            "outcome": "delivered",
            "change": "entered",
            "change_id": None,
            "at": None,
            "status": None,
            "attempts": None,
        }
    }
    gone, _ = fold([_event(2, 0, "enter", 1), _event(2, 0, "exit", 2)])
    assert member_view("u2", "email", states_of(gone, "u2"))["audiences"] == []


def test_partitions_parameter_and_partitioner() -> None:
    assert parse_partitions("3,0,3", 4) == [0, 3]
    assert parse_partitions("4", 4) is None and parse_partitions("x", 4) is None
    assert parse_partitions("", 4) is None and parse_partitions("-1", 4) is None
    # The Kafka default partitioner (the Java client's murmur2), as for the segment-events keys.
    from aiokafka.partitioner import DefaultPartitioner

    for ident in ("user@example.com", "ümlaut@example.com", "x"):
        assert partition_for(ident, 8) == DefaultPartitioner()(ident.encode(), list(range(8)), [])


def _spec_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


def test_openapi_is_valid_and_matches_the_worker_routes() -> None:
    spec = yaml.safe_load(OPENAPI.read_text())
    validate(spec)
    app = create_app(make_settings("127.0.0.1:1"))
    served = set()
    for route in app.web.web_app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or ""
        if route.method != "HEAD" and path.startswith(QUERY_PREFIXES):
            served.add((route.method, path))
    assert served == _spec_routes(spec)
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert "401" in op["responses"], f"{path} must document 401"
            if path != "/openapi.yaml":
                assert "503" in op["responses"], f"{path} must document 503 + Retry-After"
    # faust's unauthenticated table and router pages are off.
    assert not any(
        str(r.resource.canonical).startswith(("/table", "/router")) for r in app.web.web_app.router.routes()
    )


# --- two workers on the real broker ------------------------------------------------------------


class Worker:
    def __init__(self, settings: Settings, tmp: Path, name: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = Component(
            settings,
            ["worker"],
            tmp / f"{name}.log",
            RELAY_WORKER_DATA_DIR=str(tmp / f"{name}-data"),
            RELAY_WORKER_WEB_PORT=str(port),
            RELAY_WORKER_WEB_HOST="127.0.0.1",
        )


async def ask(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = KEY
) -> tuple[int, Any, dict[str, str]]:
    async with http.get(url, headers=headers) as resp:
        body = await resp.read()
        parsed = orjson.loads(body) if resp.content_type == "application/json" else body
        return resp.status, parsed, dict(resp.headers)


def expected_counts(table: dict[bytes, Any], audiences: list[str]) -> dict[str, int]:
    return {a: sum(1 for v in table.values() if v["audience_id"] == a and v["member"]) for a in audiences}


def _raw(email: str, audience: str, kind: str, stamp: str) -> bytes:
    record = {
        "data": {
            "email": email,
            "segment_events": [{"id": audience, "event": kind, "slug": audience, kind: stamp}],
        },
        "meta": {"timestamp": stamp},
    }
    return orjson.dumps(record)


async def test_two_workers_answer_for_each_other(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = make_settings(
        kafka_bootstrap,
        partitions=4,
        oauth_clients={"reporting": "s3cret"},
        oauth_signing_key="query-test-signing-key",
        retry_after_seconds=2,
    )
    await create_topics(settings)
    gone = "gone@example.com"
    bodies = [
        *bodies_for(range(150)),
        # One body, so the enter is processed before the exit and both changes are emitted.
        b"[%s,%s]"
        % (
            _raw(gone, "aud-0", "enter", "2026-01-01T00:00:01Z"),
            _raw(gone, "aud-0", "exit", "2026-01-01T00:00:02Z"),
        ),
    ]
    table, changes = oracle(settings, bodies)
    audiences = ["aud-0", "aud-1", "aud-2"]
    workers: list[Worker] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def counts_answer(*some: Worker) -> bool:
                """True once each answers a count: every partition has a settled owner."""
                for worker in some:
                    assert worker.proc.alive(), worker.proc.log.read_text()[-3000:]
                    try:
                        status, _, _ = await ask(http, f"{worker.url}/v1/audiences/aud-0/count")
                    except aiohttp.ClientError:
                        return False
                    if status != 200:
                        return False
                return True

            w1 = Worker(settings, tmp_path, "w1")
            workers.append(w1)
            await until_async(lambda: counts_answer(w1), 90, what="w1 to settle alone")
            w2 = Worker(settings, tmp_path, "w2")
            workers.append(w2)
            await wait_group(settings, 2)
            await until_async(lambda: counts_answer(w1, w2), 90, what="both workers to settle")
            await preload(settings, bodies)
            await wait_for_outputs(settings, [w.proc for w in workers], changes, table, timeout=120)

            idents = identifiers_of(table)

            async def all_answers(worker: Worker) -> dict[str, tuple[int, Any, dict[str, str]]]:
                return dict(
                    zip(
                        idents,
                        await asyncio.gather(
                            *(ask(http, f"{worker.url}/v1/members/{ident}") for ident in idents)
                        ),
                        strict=True,
                    )
                )

            # Every identifier from either worker: each answers for the other's partitions too.
            for worker in workers:
                answers: dict[str, tuple[int, Any, dict[str, str]]] = {}

                async def settled(worker: Worker = worker) -> bool:
                    nonlocal answers
                    answers = await all_answers(worker)
                    return all(status != 503 for status, _, _ in answers.values())

                await until_async(settled, 60, what=f"{worker.url} to answer without 503")
                served_by = {h[SERVED_BY] for _, _, h in answers.values()}
                assert served_by == {w1.url, w2.url}, "some answers must come from the other worker"
                for ident, (status, body, _) in answers.items():
                    assert status == 200, (ident, status, body)
                    assert body == member_view(ident, "email", states_of(table, ident))
                assert answers[gone][1]["audiences"] == []  # known, in no audience

                for audience, n in expected_counts(table, audiences).items():
                    status, body, _ = await ask(http, f"{worker.url}/v1/audiences/{audience}/count")
                    assert (status, body) == (200, {"audience_id": audience, "members": n, "partitions": 4})
                status, body, _ = await ask(http, f"{worker.url}/v1/audiences/never-seen/count")
                assert body["members"] == 0

                # Unknown identifiers, whichever worker owns them; the query is normalized like events.
                for n in range(4):
                    status, body, _ = await ask(http, f"{worker.url}/v1/members/nobody-{n}@example.com")
                    assert (status, body["error"]) == (404, "unknown_identifier")
                status, body, _ = await ask(http, f"{worker.url}/v1/members/%20User3@EXAMPLE.com")
                assert (status, body) == (
                    200,
                    member_view("user3@example.com", "email", states_of(table, "user3@example.com")),
                )

                # Credentials like the ingress: none or a wrong key is a 401 JSON problem.
                for path in ("/v1/members/user1@example.com", "/v1/audiences/aud-0/count", "/openapi.yaml"):
                    for headers in ({}, {"X-API-KEY": "wrong"}):
                        status, body, h = await ask(http, worker.url + path, headers)
                        assert (status, body["error"], h.get("WWW-Authenticate")) == (
                            401,
                            "unauthorized",
                            "Bearer",
                        )
                token = Authenticator(settings).issue_token("reporting", "s3cret")
                assert token is not None
                bearer = {"Authorization": f"Bearer {token.access_token}"}
                status, body, _ = await ask(http, f"{worker.url}/v1/audiences/aud-1/count", bearer)
                assert status == 200
                status, spec, _ = await ask(http, f"{worker.url}/openapi.yaml?api_key=key-previous", {})
                assert status == 200 and yaml.safe_load(spec) == yaml.safe_load(OPENAPI.read_text())

            # An exit: the user leaves the audience on every worker and the count drops by one.
            member = next(
                v["identifier"]
                for _, v in sorted(table.items())
                if v["audience_id"] == "aud-0" and v["member"]
            )
            exit_body = _raw(member, "aud-0", "exit", "2026-01-02T00:00:00Z")
            after, _ = oracle(settings, [*bodies, exit_body])
            assert (
                expected_counts(after, ["aud-0"])["aud-0"] == expected_counts(table, ["aud-0"])["aud-0"] - 1
            )
            await preload(settings, [exit_body])
            for worker in workers:

                async def left(worker: Worker = worker) -> bool:
                    _, body, _ = await ask(http, f"{worker.url}/v1/members/{member}")
                    return body == member_view(member, "email", states_of(after, member))

                await until_async(left, 60, what="the exit to show")
                status, body, _ = await ask(http, f"{worker.url}/v1/audiences/aud-0/count")
                assert body["members"] == expected_counts(after, ["aud-0"])["aud-0"]

            # w2 leaves: while w1 takes over its partitions every answer is right or a 503 with
            # Retry-After, never a wrong one; then w1 answers everything alone.
            seen: dict[int, int] = {}
            stop = asyncio.Event()

            async def probe() -> None:
                idents = identifiers_of(after)
                while not stop.is_set():
                    for ident in idents[::7]:
                        status, body, h = await ask(http, f"{w1.url}/v1/members/{ident}")
                        seen[status] = seen.get(status, 0) + 1
                        if status == 503:
                            assert h["Retry-After"] == "2" and body["error"] == "unavailable"
                        else:
                            assert (status, body) == (
                                200,
                                member_view(ident, "email", states_of(after, ident)),
                            )
                    status, body, h = await ask(http, f"{w1.url}/v1/audiences/aud-1/count")
                    if status == 503:
                        assert h["Retry-After"] == "2"
                    else:
                        assert body["members"] == expected_counts(after, ["aud-1"])["aud-1"]

            probing = asyncio.create_task(probe())
            await asyncio.to_thread(w2.proc.stop)
            await wait_group(settings, 1)

            async def alone() -> bool:
                assert not probing.done() or probing.exception() is None, probing.exception()
                answers = await all_answers(w1)
                return all(h[SERVED_BY] == w1.url and s == 200 for s, _, h in answers.values())

            await until_async(alone, 60, what="w1 to answer everything itself")
            stop.set()
            await probing
            assert seen.get(200, 0) > 0
            for audience, n in expected_counts(after, audiences).items():
                status, body, _ = await ask(http, f"{w1.url}/v1/audiences/{audience}/count")
                assert (status, body["members"]) == (200, n)
    finally:
        for w in workers:
            w.proc.stop()
