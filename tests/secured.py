"""A secured local broker for tests: started with `audience-relay kafka start --secure` as a user would,
its printed settings evaluated by a real shell, and the relay's settings for it.

The fixture itself is ``secured_kafka`` in ``tests/conftest.py`` (one broker for the session, started
only when a test asks for it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from audience_relay.settings import Settings
from devtools.localkafka import LocalKafka, free_port, lib_dir
from tests.conftest import LOCAL_DIR, make_settings

#: What `kafka start --secure` prints, in this order.
SETTING_NAMES = [
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CA_FILE",
]


@dataclass(frozen=True)
class SecuredBroker:
    """A running secured local broker and the settings its `kafka start --secure` printed."""

    broker: LocalKafka
    env: dict[str, str]  # the cli's environment for this broker (RELAY_LOCAL_DIR, RELAY_LOCAL_KAFKA_PORT)
    printed: str  # what `kafka start --secure` wrote on stdout
    settings: dict[str, str]  # the KAFKA_* values after a shell evaluated `printed`

    @property
    def bootstrap(self) -> str:
        return self.settings["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def password(self) -> str:
        return self.settings["KAFKA_SASL_PASSWORD"]

    @property
    def ca_file(self) -> str:
        return self.settings["KAFKA_SSL_CA_FILE"]

    def relay_settings(self, **overrides: object) -> Settings:
        """The relay's settings for one test against this broker: its own topic prefix, SASL_SSL with
        SCRAM-SHA-512 from the printed values, then ``overrides``."""
        values: dict[str, object] = {
            "kafka_security_protocol": self.settings["KAFKA_SECURITY_PROTOCOL"],
            "kafka_sasl_mechanism": self.settings["KAFKA_SASL_MECHANISM"],
            "kafka_sasl_username": self.settings["KAFKA_SASL_USERNAME"],
            "kafka_sasl_password": self.password,
            "kafka_ssl_ca_file": self.ca_file,
        }
        values.update(overrides)
        return make_settings(self.bootstrap, **values)


def cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``audience-relay <args>`` with ``env`` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "audience_relay.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def shell_eval(printed: str) -> dict[str, str]:
    """Run ``printed`` in bash (as ``eval "$(audience-relay kafka start --secure)"`` would) and read
    back the variables it set."""
    script = 'eval "$1"; for name in "${@:2}"; do printf "%s\\0" "${!name}"; done'
    out = subprocess.run(
        ["bash", "-c", script, "_", printed, *SETTING_NAMES],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(zip(SETTING_NAMES, out.split("\0")[:-1], strict=True))


@contextmanager
def secured_broker(local: Path) -> Iterator[SecuredBroker]:
    """Start a secured broker under ``local`` with the CLI; stop it on exit."""
    # The jars are shared with every other test broker; this broker's home is its own.
    (local / "kafka").mkdir(parents=True)
    (local / "kafka" / "lib").symlink_to(lib_dir(LOCAL_DIR).resolve())
    port = free_port()
    env = {"RELAY_LOCAL_DIR": str(local), "RELAY_LOCAL_KAFKA_PORT": str(port)}
    broker = LocalKafka(local, port=port, secure=True)
    started = cli(env, "kafka", "start", "--secure")
    try:
        assert started.returncode == 0, started.stderr
        yield SecuredBroker(broker, env, started.stdout, shell_eval(started.stdout))
    finally:
        cli(env, "kafka", "stop")
        broker.stop(kill=True)  # in case the cli could not


@dataclass(frozen=True)
class Ran:
    """What a finished command did."""

    returncode: int
    stdout: str
    stderr: str


def clean_environ() -> dict[str, str]:
    """This process's environment without any relay or Kafka setting (a command then gets exactly
    the settings a test gives it, whatever the shell running the tests has set)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "RELAY_"))}


async def relay_cli(settings: Settings, *args: str, timeout: float = 120) -> Ran:
    """``audience-relay <args>`` with ``settings`` in its environment, without blocking the event loop
    (the test's fake destinations answer on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "audience_relay.cli",
        *args,
        env={**clean_environ(), **settings.to_env()},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
