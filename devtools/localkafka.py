"""A single-node Apache Kafka (KRaft) run from the jars Maven resolves from Maven Central.

Used by ``audience-relay kafka start|stop|status|fetch``, by ``audience-relay up`` and by the test
fixtures when neither ``KAFKA_BOOTSTRAP_SERVERS`` nor a Docker engine is available. Everything lives
under one work directory (git-ignored): the jars in ``<local_dir>/kafka/lib``, each broker's
configuration, data, log and pid file in ``<local_dir>/kafka/<port>/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POM = PROJECT_ROOT / "deploy" / "kafka" / "pom.xml"
KAFKA_VERSION = "3.9.2"
READY_MARKER = "Kafka Server started"
JAVA_OPTS = [
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, formatted, started or stopped."""


def lib_dir(local_dir: Path) -> Path:
    """Where the broker's jars are kept."""
    return local_dir / "kafka" / "lib"


def jars_present(local_dir: Path) -> bool:
    """True when the Kafka server jar has been resolved already."""
    return any(lib_dir(local_dir).glob(f"kafka_2.13-{KAFKA_VERSION}.jar"))


def fetch_jars(local_dir: Path, *, quiet: bool = True) -> Path:
    """Resolve kafka_2.13 and its runtime dependencies from Maven Central into ``lib_dir``."""
    target = lib_dir(local_dir).resolve()
    if jars_present(local_dir):
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError("Maven ('mvn') is not on PATH: it is needed once to fetch the Kafka jars")
    target.mkdir(parents=True, exist_ok=True)
    cmd = [
        mvn,
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(POM),
        "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies",
        f"-DoutputDirectory={target}",
        "-DincludeScope=runtime",
    ]
    proc = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
    if proc.returncode != 0 or not jars_present(local_dir):
        detail = (proc.stdout or "")[-2000:] + (proc.stderr or "")[-2000:]
        raise LocalKafkaError(
            f"Maven could not resolve Kafka {KAFKA_VERSION} (exit {proc.returncode}): {detail}"
        )
    return target


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    """A TCP port nobody listens on right now (for tests and throw-away brokers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalKafka:
    """One single-node KRaft broker listening on ``127.0.0.1:port``."""

    local_dir: Path
    port: int = 9092
    controller_port: int | None = None
    #: Where this broker's config, data and log go (default ``<local_dir>/kafka/<port>``); the jars
    #: always come from ``<local_dir>/kafka/lib``, so throw-away test brokers share one download.
    home_dir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    @property
    def home(self) -> Path:
        return self.home_dir if self.home_dir is not None else self.local_dir / "kafka" / str(self.port)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    def _controller_port(self) -> int:
        saved = self.home / "controller.port"
        if self.controller_port is None:
            if saved.exists():
                self.controller_port = int(saved.read_text())
            else:
                self.controller_port = free_port()
        saved.write_text(str(self.controller_port))
        return self.controller_port

    def _write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        cport = self._controller_port()
        data = (self.home / "data").resolve()
        props = self.home / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{cport}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{cport}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={data}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=4",
                    "group.initial.rebalance.delay.ms=0",
                    "message.max.bytes=67108864",
                    "replica.fetch.max.bytes=67108864",
                    "log.cleaner.backoff.ms=1000",
                    "auto.create.topics.enable=true",
                    "",
                ]
            )
        )
        (self.home / "log4j.properties").write_text(
            "\n".join(
                [
                    "log4j.rootLogger=INFO, stdout",
                    "log4j.appender.stdout=org.apache.log4j.ConsoleAppender",
                    "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout",
                    "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n",
                    "log4j.logger.kafka.log=WARN",
                    "log4j.logger.org.apache.kafka.storage=WARN",
                    "log4j.logger.kafka.coordinator=WARN",
                    "log4j.logger.state.change.logger=WARN",
                    "",
                ]
            )
        )
        return props

    def _java(self, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise LocalKafkaError("Java ('java') is not on PATH: OpenJDK 17 runs the local broker")
        classpath = str(lib_dir(self.local_dir).resolve() / "*")
        log4j = (self.home / "log4j.properties").resolve()
        return [java, *JAVA_OPTS, f"-Dlog4j.configuration=file:{log4j}", "-cp", classpath, *args]

    def pid(self) -> int | None:
        """The broker's process id when it is running, else None."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        # A zombie or a recycled pid is not our broker.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        return pid if b"kafka.Kafka" in cmdline else None

    def running(self) -> bool:
        return self.pid() is not None and port_open("127.0.0.1", self.port)

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker (formatting its storage the first time) and wait until it serves."""
        if self.pid() is not None:
            self._wait_ready(timeout)
            return self.bootstrap
        if port_open("127.0.0.1", self.port):
            raise LocalKafkaError(f"port {self.port} is taken by another process; set RELAY_LOCAL_KAFKA_PORT")
        fetch_jars(self.local_dir)
        props = self._write_config()
        if not (self.home / "data" / "meta.properties").exists():
            cluster_id = subprocess.run(
                self._java("kafka.tools.StorageTool", "random-uuid"),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            fmt = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)),
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise LocalKafkaError(f"formatting the broker storage failed: {fmt.stderr[-2000:]}")
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                self._java("kafka.Kafka", str(props)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        self._proc = proc
        self._wait_ready(timeout)
        return self.bootstrap

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        offset = self._log_offset
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                raise LocalKafkaError(f"the broker exited with {proc.returncode}; see {self.log_file}")
            if self.pid() is None and proc is None:
                raise LocalKafkaError(f"the broker is not running; see {self.log_file}")
            if port_open("127.0.0.1", self.port) and self._log_since(offset).find(READY_MARKER) >= 0:
                return
            time.sleep(0.1)  # polling a condition: the broker says when it is ready
        raise LocalKafkaError(f"the broker did not become ready within {timeout:.0f}s; see {self.log_file}")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0, *, kill: bool = False) -> bool:
        """Stop the broker (SIGTERM, or SIGKILL with ``kill``); True if one was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        proc = self._proc
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    break
            elif self.pid() is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            if proc is not None:
                proc.wait(10)
        self._proc = None
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return True

    def wipe(self) -> None:
        """Remove this broker's data (it must be stopped)."""
        if self.pid() is not None:
            raise LocalKafkaError("stop the broker before wiping its data")
        shutil.rmtree(self.home, ignore_errors=True)
