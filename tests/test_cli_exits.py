"""The real CLI, as a subprocess: every failure an operator can fix ends within 30 s with one line on
stderr naming what to fix, its documented exit code (``audience_relay.exits``) and no traceback;
several sinks and workers start side by side on one host with their default ports."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from audience_relay.exits import ExitCode
from audience_relay.names import SINK_WEB_PORTS
from audience_relay.topics import create_topics
from devtools.localkafka import port_open
from devtools.wait import until
from tests.conftest import PROJECT, make_settings

PASSWORD = "sasl-Secret-0123456789"
DEADLINE = 30.0


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_cli(args: list[str], env: dict[str, str], timeout: float = DEADLINE + 15) -> Outcome:
    """``audience-relay args`` with only ``env`` (not the test run's environment)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", *args],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Outcome(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def one_line(outcome: Outcome, code: int, *fragments: str) -> str:
    """The outcome is ``code`` with exactly one ``error:`` line on stderr holding ``fragments``."""
    text = outcome.stdout + outcome.stderr
    assert "Traceback" not in text and PASSWORD not in text, text
    assert outcome.seconds < DEADLINE, outcome
    assert outcome.code == code, outcome
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on (bound, never listening: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process-like holder is listening on."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def base_env(bootstrap: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "RELAY_TOPIC_PREFIX": f"exits{os.getpid()}",
        "RELAY_WORKER_DATA_DIR": str(tmp / "worker"),
        "RELAY_TABLE_STORE": "memory",
        "RELAY_INGRESS_API_KEYS": "a-webhook-key",
        # Any free port: 8080 and 9102 may be in use on a shared test host.
        "RELAY_INGRESS_PORT": "0",
        "RELAY_INGRESS_METRICS_PORT": "0",
        "PUSHLY_WEBHOOK_URL": "http://127.0.0.1:9/pushly",
        "PUSHLY_API_KEY": "a-pushly-key",
        "ODP_WEBHOOK_URL": "http://127.0.0.1:9/odp",
        "ODP_AUTH_TOKEN": "an-odp-token",
        **extra,
    }


def in_parallel(runs: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, Outcome]:
    """Run several CLI commands at once (each may wait for its start-up timeout)."""
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(run_cli, args, env) for name, (args, env) in runs.items()}
        return {name: f.result() for name, f in futures.items()}


# --- without a broker ---------------------------------------------------------------------------------


def test_bad_settings_and_missing_files_exit_78(tmp_path: Path, closed_port: int) -> None:
    env = base_env(f"127.0.0.1:{closed_port}", tmp_path)
    outcomes = in_parallel(
        {
            "bad": (["topics", "create"], {**env, "RELAY_PARTITIONS": "zero"}),
            "ca": (
                ["worker"],
                {**env, "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_FILE": str(tmp_path / "ca.pem")},
            ),
            "sasl": (["sink", "odp"], {**env, "KAFKA_SASL_PASSWORD": PASSWORD}),
            "pushly": (["sink", "pushly"], {k: v for k, v in env.items() if k != "PUSHLY_API_KEY"}),
        }
    )
    one_line(outcomes["bad"], ExitCode.CONFIG, "RELAY_PARTITIONS")
    one_line(
        outcomes["ca"], ExitCode.CONFIG, f"KAFKA_SSL_CA_FILE={tmp_path / 'ca.pem'}: the file does not exist"
    )
    one_line(
        outcomes["sasl"], ExitCode.CONFIG, "KAFKA_SASL_PASSWORD is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"
    )
    one_line(outcomes["pushly"], ExitCode.CONFIG, "PUSHLY_API_KEY")


def test_a_taken_port_exits_74_naming_its_setting(tmp_path: Path, closed_port: int, taken_port: int) -> None:
    env = base_env(f"127.0.0.1:{closed_port}", tmp_path)
    port = str(taken_port)
    outcomes = in_parallel(
        {
            "sink": (["sink", "analytics"], {**env, "RELAY_SINK_WEB_PORT": port}),
            "worker": (["worker"], {**env, "RELAY_WORKER_WEB_PORT": port}),
            "ingress": (["ingress"], {**env, "RELAY_INGRESS_PORT": port}),
            "metrics": (["ingress"], {**env, "RELAY_INGRESS_METRICS_PORT": port}),
        }
    )
    for name, setting in (
        ("sink", "RELAY_SINK_WEB_PORT"),
        ("worker", "RELAY_WORKER_WEB_PORT"),
        ("ingress", "RELAY_INGRESS_PORT"),
        ("metrics", "RELAY_INGRESS_METRICS_PORT"),
    ):
        one_line(outcomes[name], ExitCode.IOERR, f"port {taken_port} ", "already in use", setting)


def test_an_unreachable_broker_exits_69_within_the_startup_timeout(tmp_path: Path, closed_port: int) -> None:
    bootstrap = f"127.0.0.1:{closed_port}"
    env = base_env(bootstrap, tmp_path, RELAY_STARTUP_TIMEOUT_SECONDS="2")
    outcomes = in_parallel(
        {
            # The worker with the default RELAY_STARTUP_TIMEOUT_SECONDS (15): bounded, not forever.
            "worker": (["worker"], base_env(bootstrap, tmp_path)),
            "sink": (["sink", "pushly"], env),
            "topics": (["topics", "create"], env),
            "replay": (["dead-letter", "replay", "--sink", "odp", "--quiet"], env),
            "partitions": (["partitions", "plan", "--to", "4", "--quiet"], env),
        }
    )
    for name, outcome in outcomes.items():
        line = one_line(
            outcome, ExitCode.UNAVAILABLE, f"Kafka is not reachable at KAFKA_BOOTSTRAP_SERVERS={bootstrap}"
        )
        assert "connection refused" in line, name
    assert "waited 15s" in outcomes["worker"].stderr and outcomes["worker"].seconds > 14
    assert "waited 2s" in outcomes["sink"].stderr


# --- against the (plaintext) broker --------------------------------------------------------------------


@pytest.fixture
async def prefix(kafka_bootstrap: str) -> str:
    settings = make_settings(kafka_bootstrap)
    await create_topics(settings)
    return settings.topic_prefix


def test_a_secured_client_against_a_plaintext_listener_exits_77(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    tls = base_env(kafka_bootstrap, tmp_path, RELAY_TOPIC_PREFIX=prefix, KAFKA_SECURITY_PROTOCOL="SSL")
    sasl = base_env(
        kafka_bootstrap,
        tmp_path,
        RELAY_TOPIC_PREFIX=prefix,
        KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="relay",
        KAFKA_SASL_PASSWORD=PASSWORD,
    )
    outcomes = in_parallel(
        {
            "worker": (["worker"], tls),
            "sink": (["sink", "analytics"], tls),
            "ingress": (["ingress"], tls),
            "topics": (["topics", "create"], tls),
            "partitions": (["partitions", "plan", "--to", "6", "--quiet"], tls),
            "sasl worker": (["worker"], sasl),
            "sasl replay": (["dead-letter", "replay", "--sink", "pushly", "--quiet"], sasl),
        }
    )
    for name in ("worker", "sink", "ingress", "topics", "partitions"):
        one_line(outcomes[name], ExitCode.NOPERM, "TLS handshake", "KAFKA_SECURITY_PROTOCOL=SSL")
    for name in ("sasl worker", "sasl replay"):
        one_line(
            outcomes[name], ExitCode.NOPERM, "does not use SASL", "KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT"
        )


def test_the_ingress_refuses_a_missing_keys_file_with_78(kafka_bootstrap: str, tmp_path: Path) -> None:
    missing = tmp_path / "keys.json"
    env = base_env(kafka_bootstrap, tmp_path, RELAY_INGRESS_KEYS_FILE=str(missing))
    one_line(run_cli(["ingress"], env), ExitCode.CONFIG, str(missing))


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``audience-relay args`` in the background, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "audience_relay.cli", *args],
            env=env,
            cwd=PROJECT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _ports_logged(log: Path, event: str) -> list[int]:
    ports = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = orjson.loads(line)
            if record.get("event") == event:
                ports.append(int(record["port"]))
    return ports


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def test_sinks_and_workers_start_side_by_side_with_defaults(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """No port setting at all: the three sinks take their own defaults, a second pushly sink and a
    second worker (whose defaults are taken) fall back to free ports they log, and all serve."""
    free_at_start = {name: not port_open("127.0.0.1", port) for name, port in SINK_WEB_PORTS.items()}
    worker_free = not port_open("127.0.0.1", 6066)
    env = base_env(
        kafka_bootstrap,
        tmp_path,
        RELAY_TOPIC_PREFIX=prefix,
        RELAY_PARTITIONS="3",
        RELAY_WORKER_WEB_HOST="127.0.0.1",
    )
    full_env = {**os.environ, **env}
    for var in ("RELAY_SINK_WEB_PORT", "RELAY_WORKER_WEB_PORT"):
        full_env.pop(var, None)
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for name, args, extra in (
            ("pushly", ["sink", "pushly"], {}),
            ("odp", ["sink", "odp"], {}),
            ("analytics", ["sink", "analytics"], {}),
            ("pushly-2", ["sink", "pushly"], {}),
            ("w1", ["worker"], {"RELAY_WORKER_DATA_DIR": str(tmp_path / "w1")}),
            ("w2", ["worker"], {"RELAY_WORKER_DATA_DIR": str(tmp_path / "w2")}),
        ):
            log = tmp_path / f"{name}.log"
            procs[name] = (start(args, {**full_env, **extra}, log), log)
            if name in ("pushly", "w1"):  # the first of a kind takes its default before the second starts
                event = "sink web server listening" if name == "pushly" else "worker web server"
                await until(lambda log=log, e=event: bool(_ports_logged(log, e)), 60, what=f"{name}'s port")
        ports: dict[str, int] = {}
        for name, (proc, log) in procs.items():
            event = "worker web server" if name.startswith("w") else "sink web server listening"

            def started(proc: subprocess.Popen[bytes] = proc, log: Path = log, event: str = event) -> bool:
                assert proc.poll() is None, log.read_text()[-3000:]
                return bool(_ports_logged(log, event))

            await until(started, 90, what=f"{name} to start")
            [ports[name]] = _ports_logged(log, event)
        for name, (proc, log) in procs.items():

            def healthy(
                proc: subprocess.Popen[bytes] = proc, log: Path = log, port: int = ports[name]
            ) -> bool:
                assert proc.poll() is None, log.read_text()[-3000:]
                return _healthy(port)

            await until(healthy, 90, what=f"{name}'s /healthz")
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(60)
    assert len(set(ports.values())) == len(ports), ports
    for name, free in free_at_start.items():
        if free:
            assert ports[name] == SINK_WEB_PORTS[name], (name, ports)
    if worker_free:
        assert ports["w1"] == 6066, ports
    # The ones whose default was taken said so, naming the setting.
    assert "RELAY_SINK_WEB_PORT" in procs["pushly-2"][1].read_text()
    assert "RELAY_WORKER_WEB_PORT" in procs["w2"][1].read_text()
