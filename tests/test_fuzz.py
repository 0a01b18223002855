"""Fuzzing a live ingress (a real subprocess, real broker) and a real split worker.

- schemathesis drives every operation of ingress/openapi.yaml: each answer conforms to the document
  and none is a 5xx (the broker is up here, so not even a 503).
- a hypothesis-drawn corpus of hostile bodies (tests/hostile.py) goes to the ingress: each answer is
  one the corpus allows, with a JSON body naming the problem; the process stays alive with bounded
  RSS; every 200 body is in ``webhooks.raw`` and every 400 body in ``dead-letter``, by request id and
  bytes. The same bodies are produced straight into the raw topic too; a worker subprocess must then
  commit to the end of the raw topic, stay alive, and account for every raw record as exactly the
  segment events and dead letters the split function gives for it (each dead letter the rejected
  record's original bytes, with its reason code and element index).

``pytest`` runs a short corpus; ``pytest --run-slow`` (``make test``) adds the 10,000-case one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from audience_relay.kafkautil import produce_all, read_topic
from audience_relay.settings import Settings
from audience_relay.topics import TopicNames, create_topics
from devtools.localkafka import free_port
from devtools.processes import Component, start_worker, wait_caught_up, wait_group
from processors.split import Context, split_body
from tests.conftest import make_settings
from tests.hostile import Case, draw_corpus

KEY = {"X-API-KEY": "key-current"}
QUICK_CASES = 300
FULL_CASES = 10_000
# The ingress holds at most one parsed body at a time (validation is synchronous) plus the bodies in
# flight; orjson's objects take up to ~25x the text of a body of empty objects (10 MiB → ~250 MiB).
RSS_LIMIT = 700 * 1024 * 1024


class RssSampler(threading.Thread):
    """Samples a process's RSS every 20 ms and keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.baseline = self.peak
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def stop(self) -> None:
        self._done.set()
        self.join(5)


@dataclass
class LiveIngress:
    settings: Settings
    url: str
    component: Component
    sampler: RssSampler
    names: TopicNames = field(init=False)

    def __post_init__(self) -> None:
        self.names = TopicNames.from_settings(self.settings)


def start_live_ingress(settings: Settings, tmp: Path) -> LiveIngress:
    """``audience-relay ingress`` as a real process on a free port, once it is ready."""
    port = free_port()
    component = Component(
        settings,
        ["ingress"],
        tmp / "ingress.log",
        RELAY_INGRESS_HOST="127.0.0.1",
        RELAY_INGRESS_PORT=str(port),
        # /metrics on the webhook port, where the document (and so schemathesis) looks for it.
        RELAY_INGRESS_METRICS_PORT=str(port),
        RELAY_LOG_LEVEL="WARNING",
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:  # poll readiness: the process has no event to wait on from here
        assert component.alive(), component.log.read_text()[-3000:]
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the ingress never became ready"
        time.sleep(0.1)
    sampler = RssSampler(component.proc.pid)
    sampler.start()
    return LiveIngress(settings, url, component, sampler)


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveIngress]:
    settings = make_settings(kafka_bootstrap, partitions=2)
    asyncio.run(create_topics(settings))
    running = start_live_ingress(settings, tmp_path_factory.mktemp("schemathesis"))
    try:
        yield running
    finally:
        running.sampler.stop()
        running.component.stop()


# ---------------------------------------------------------------------------------------------------
# schemathesis: the document against the live ingress


SCHEMATHESIS_EXAMPLES = 25  # per operation and generation mode


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_answer_conforms_to_the_document(live: LiveIngress, mode: GenerationMode) -> None:
    # Loaded from the live ingress, so the served document is the one under test (schemathesis
    # leaves out the operation it loaded the document from: tests/test_openapi.py covers that one).
    # schemathesis' pytest plugin does not run under pytest 9, so hypothesis drives its strategies.
    api = schemathesis.openapi.from_url(live.url + "/openapi.yaml", headers=KEY)
    api.config.update(base_url=live.url)
    statuses: Counter[str] = Counter()
    for result in api.get_all_operations():
        operation = result.ok()

        @hypothesis_settings(
            max_examples=SCHEMATHESIS_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            # Credentials as a webhook job sends them (a generated credential header wins).
            response = case.call_and_validate(headers={**KEY, **(case.headers or {})})
            assert response.status_code < 500, response.text
            statuses[f"{case.method} {case.path} {response.status_code}"] += 1

        try:
            check()
        except Unsatisfiable:
            # No input of this operation can break the document (GET /healthz has none).
            assert mode == GenerationMode.NEGATIVE
    assert live.component.alive(), live.component.log.read_text()[-3000:]
    print(f"schemathesis ({mode}):", dict(sorted(statuses.items())))


# ---------------------------------------------------------------------------------------------------
# the hostile corpus


@dataclass
class Answer:
    case: Case
    request_id: str
    status: int
    body: dict[str, Any]


async def _post(http: aiohttp.ClientSession, url: str, case: Case, request_id: str) -> Answer:
    headers = {**KEY, **case.headers, "X-Request-Id": request_id, "Content-Type": "application/json"}
    try:
        async with http.post(url + "/v1/lytics", data=case.body, headers=headers) as resp:
            raw = await resp.read()
            assert resp.content_type == "application/json", (resp.status, raw[:200], case.describe())
            return Answer(case, request_id, resp.status, orjson.loads(raw))
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        # The ingress answers 413 from Content-Length and closes; sending a 50 MB body may then break.
        # Only a refused case may end like this, and the next request must still be answered.
        assert case.expect <= {413, 415}, f"{case.describe()}: {exc!r}"
        return Answer(case, request_id, 413 if 413 in case.expect else 415, {"error": "connection closed"})


def _check_answer(answer: Answer) -> str | None:
    """What is wrong with one answer, or None."""
    case, body = answer.case, answer.body
    if answer.status not in case.expect:
        return f"{case.describe()}: answered {answer.status} {body}, expected one of {sorted(case.expect)}"
    if body.get("error") == "connection closed":
        return None
    if answer.status == 200:
        if body != {"status": "stored", "request_id": answer.request_id}:
            return f"{case.describe()}: 200 with {body}"
        return None
    if set(body) != {"error", "detail", "request_id"} or body["request_id"] != answer.request_id:
        return f"{case.describe()}: {answer.status} with {body}"
    if not isinstance(body["detail"], str) or not body["detail"]:
        return f"{case.describe()}: {answer.status} without a detail naming the problem"
    return None


async def post_corpus(live: LiveIngress, cases: list[Case], prefix: str) -> list[Answer]:
    """Every case to the live ingress, 8 at a time, each with its own request id."""
    gate = asyncio.Semaphore(8)
    timeout = aiohttp.ClientTimeout(total=120)

    async def one(http: aiohttp.ClientSession, i: int, case: Case) -> Answer:
        async with gate:
            return await _post(http, live.url, case, f"{prefix}-{i}")

    async with aiohttp.ClientSession(timeout=timeout) as http:
        return await asyncio.gather(*(one(http, i, c) for i, c in enumerate(cases)))


def _header(record: Any, name: str) -> bytes | None:
    return dict(record.headers).get(name)


async def check_stored(live: LiveIngress, answers: list[Answer]) -> None:
    """Every 200 body is in raw, every 400 body in dead-letter (by request id and bytes); nothing else."""
    bootstrap = live.settings.kafka_bootstrap_servers
    raw = {_header(r, "request-id"): r.value for r in await read_topic(bootstrap, live.names.raw)}
    dead = {
        _header(r, "request-id"): r.value
        for r in await read_topic(bootstrap, live.names.dead_letter)
        if _header(r, "stage") == b"ingress"
    }
    problems = []
    for a in answers:
        rid = a.request_id.encode()
        where = "raw" if rid in raw else "dead-letter" if rid in dead else None
        stored = raw.get(rid, dead.get(rid))
        if a.status == 200 and (where != "raw" or stored != a.case.body):
            problems.append(f"{a.case.describe()}: answered 200 but is {where or 'nowhere'}")
        elif a.status == 400 and (where != "dead-letter" or stored != a.case.body):
            problems.append(f"{a.case.describe()}: answered 400 but is {where or 'nowhere'}")
        elif a.status not in (200, 400) and where is not None:
            problems.append(f"{a.case.describe()}: answered {a.status} but is in {where}")
    assert not problems, "\n".join(problems[:20])


async def check_split_accounts_for_raw(settings: Settings, worker: Component) -> dict[str, int]:
    """The worker committed the whole raw topic, and each raw record became what split_body says."""
    await wait_caught_up(settings, [worker], timeout=400)
    assert worker.alive(), worker.log.read_text()[-3000:]
    names = TopicNames.from_settings(settings)
    bootstrap = settings.kafka_bootstrap_servers
    events = Counter(
        orjson.loads(r.value)["request_id"] for r in await read_topic(bootstrap, names.segment_events)
    )
    # Per raw record: each dead letter's (element index, reason code, bytes).
    dead: dict[tuple[int, int], list[tuple[int | None, str, bytes]]] = {}
    codes = Counter[str]()
    for r in await read_topic(bootstrap, names.dead_letter):
        if _header(r, "stage") == b"split":
            assert _header(r, "raw-topic") == names.raw.encode()
            at = (int(_header(r, "raw-partition") or b"-1"), int(_header(r, "raw-offset") or b"-1"))
            index = _header(r, "element-index")
            code = (_header(r, "reason-code") or b"").decode()
            dead.setdefault(at, []).append((None if index is None else int(index), code, r.value))
            codes[code] += 1
    assert codes["internal_error"] == 0, "the split function raised on some record (see the worker log)"
    ctx = Context(source="default", request_id="", received_at=datetime.now(UTC), match_field="email")
    problems = []
    raw_records = await read_topic(bootstrap, names.raw)
    for r in raw_records:
        expected = split_body(r.value, ctx)
        got_events = events[(_header(r, "request-id") or b"").decode()]
        got_dead = sorted(dead.get((r.partition, r.offset), []), key=repr)
        # A dead letter is the rejected record's original bytes: the body, or the batch element as sent.
        want_dead = sorted(((j.index, j.code, j.record) for j in expected.rejected), key=repr)
        # ... and is a piece of the raw record, never a re-encoding (which would lose a duplicate key).
        pieces = all(value in r.value for _, _, value in got_dead)
        if got_events != len(expected.events) or got_dead != want_dead or not pieces:
            problems.append(
                f"raw {r.partition}:{r.offset} ({r.value[:80]!r}): {got_events} events and dead letters "
                f"{[(i, c, v[:60]) for i, c, v in got_dead][:5]}, expected {len(expected.events)} and "
                f"{[(i, c, v[:60]) for i, c, v in want_dead][:5]}"
            )
    assert not problems, "\n".join(problems[:20])
    return {"raw records": len(raw_records), "segment events": sum(events.values()), **codes}


async def run_corpus(kafka_bootstrap: str, tmp: Path, count: int) -> dict[str, Any]:
    settings = make_settings(kafka_bootstrap, partitions=2, table_store="memory")
    await create_topics(settings)
    started = time.monotonic()
    cases = await asyncio.to_thread(draw_corpus, count)
    generated = time.monotonic() - started
    live = await asyncio.to_thread(start_live_ingress, settings, tmp)
    worker = start_worker(settings, tmp, RELAY_LOG_LEVEL="WARNING")
    try:
        await wait_group(settings, 1)
        answers = await post_corpus(live, cases, "fz")
        live.sampler.stop()
        assert live.component.alive(), live.component.log.read_text()[-3000:]
        # Still answering after the corpus.
        assert (await post_corpus(live, [Case("after", b"{}", frozenset({200}))], "after"))[0].status == 200
        problems = [p for a in answers if (p := _check_answer(a))]
        assert not problems, f"{len(problems)} wrong answers:\n" + "\n".join(problems[:20])
        await check_stored(live, answers)
        # The same bodies straight into the raw topic (what the ingress refused included).
        direct = [
            (None, c.body, [("request-id", f"raw-{i}".encode()), ("source", b"default")])
            for i, c in enumerate(cases)
            if len(c.body) <= settings.max_body_bytes
        ]
        await produce_all(kafka_bootstrap, TopicNames.from_settings(settings).raw, direct)
        split = await check_split_accounts_for_raw(settings, worker)
        worker_rss = psutil.Process(worker.proc.pid).memory_info().rss
    finally:
        worker.stop()
        live.sampler.stop()
        live.component.stop()
    assert live.sampler.peak - live.sampler.baseline < RSS_LIMIT
    return {
        "cases": len(cases),
        "generated in s": round(generated, 1),
        "answers by status": dict(sorted(Counter(a.status for a in answers).items())),
        "cases by kind": dict(Counter(c.kind for c in cases).most_common()),
        "ingress RSS MiB baseline/peak": (live.sampler.baseline >> 20, live.sampler.peak >> 20),
        "worker RSS MiB at the end": worker_rss >> 20,
        "split": split,
        "seconds": round(time.monotonic() - started, 1),
    }


async def test_hostile_corpus_quick(kafka_bootstrap: str, tmp_path: Path) -> None:
    summary = await run_corpus(kafka_bootstrap, tmp_path, QUICK_CASES)
    print("fuzz summary (quick):", orjson.dumps(summary, option=orjson.OPT_NON_STR_KEYS).decode())


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_hostile_corpus_full(kafka_bootstrap: str, tmp_path: Path) -> None:
    summary = await run_corpus(kafka_bootstrap, tmp_path, FULL_CASES)
    print(
        "fuzz summary:", orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    )
