"""A single-node Apache Kafka (KRaft) run from the jars Maven resolves from Maven Central.

Used by ``audience-relay kafka start|stop|status|fetch``, by ``audience-relay up`` and by the test
fixtures when neither ``KAFKA_BOOTSTRAP_SERVERS`` nor a Docker engine is available. Everything lives
under one work directory (git-ignored): the jars in ``<local_dir>/kafka/lib``, each broker's
configuration, data, log and pid file in ``<local_dir>/kafka/<port>/``.

Two modes, chosen when the broker's storage is formatted and kept with it (``<home>/security``):

- plaintext (the default; the demo and the tests): one ``PLAINTEXT`` listener on ``port``;
- secured (``LocalKafka(secure=True)``, ``audience-relay kafka start --secure``): clients connect to a
  ``SASL_SSL`` listener named ``CLIENT`` on ``port`` (SCRAM-SHA-512 and SCRAM-SHA-256, user
  ``relay``); the broker talks to itself (transaction markers, anything inter-broker) over a second
  ``SASL_SSL`` listener named ``INTERNAL`` on its own loopback port, as user ``broker`` with
  SCRAM-SHA-512, so the clients' credentials and mechanisms can change without touching it. Both
  present a certificate for ``localhost`` and ``127.0.0.1`` signed by a self-signed CA made under
  ``<home>/tls/``. The SCRAM users are written into the metadata log when the storage is formatted
  (``StorageTool format --add-scram``), so the broker can authenticate its own inter-broker
  connections from its first start. No authorizer: any authenticated user may do anything, but a
  wrong password, an untrusted certificate or a plaintext client is refused.

In both modes the KRaft ``CONTROLLER`` listener stays ``PLAINTEXT`` on a loopback port: only this
node's own broker half connects to it, and it serves no client requests.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from devtools.localtls import (
    CertificateAuthority,
    TlsMaterialError,
    make_ca,
    make_server_keystore,
    new_password,
    private_dir,
    write_private,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POM = PROJECT_ROOT / "deploy" / "kafka" / "pom.xml"
KAFKA_VERSION = "3.9.2"
READY_MARKER = "Kafka Server started"
#: The SCRAM user the relay's clients log in as on a secured local broker.
CLIENT_USER = "relay"
#: The SCRAM user the broker logs in as on its own INTERNAL listener.
BROKER_USER = "broker"
PLAINTEXT = "PLAINTEXT"
SASL_SSL = "SASL_SSL"
TLS_HOSTS = ["localhost", "127.0.0.1"]
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


def new_cluster_id() -> str:
    """A KRaft cluster id as ``StorageTool random-uuid`` makes it: 16 random bytes, base64url, no padding.

    Made here rather than by the tool to save a JVM start (and the tool prints log lines on stdout).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka refuses ids that look like a command-line option
            return text


def mask(text: str, secrets: list[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


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


@dataclass(frozen=True)
class ClientSecurity:
    """What a client needs to connect to a secured local broker (the password stays in its file)."""

    bootstrap: str
    username: str
    password_file: Path
    ca_file: Path
    mechanism: str = "SCRAM-SHA-512"
    protocol: str = SASL_SSL

    def password(self) -> str:
        return self.password_file.read_text()

    def exports(self) -> list[str]:
        """Shell lines setting the relay's KAFKA_* variables; the password is read from its file."""
        q = shlex.quote
        return [
            f"export KAFKA_BOOTSTRAP_SERVERS={q(self.bootstrap)}",
            f"export KAFKA_SECURITY_PROTOCOL={self.protocol}",
            f"export KAFKA_SASL_MECHANISM={self.mechanism}",
            f"export KAFKA_SASL_USERNAME={q(self.username)}",
            f'export KAFKA_SASL_PASSWORD="$(cat {q(str(self.password_file.resolve()))})"',
            f"export KAFKA_SSL_CA_FILE={q(str(self.ca_file.resolve()))}",
        ]


@dataclass
class LocalKafka:
    """One single-node KRaft broker listening on ``127.0.0.1:port`` (plaintext, or SASL_SSL when secure)."""

    local_dir: Path
    port: int = 9092
    controller_port: int | None = None
    #: Where this broker's config, data and log go (default ``<local_dir>/kafka/<port>``); the jars
    #: always come from ``<local_dir>/kafka/lib``, so throw-away test brokers share one download.
    home_dir: Path | None = None
    #: Clients must use SASL_SSL (SCRAM) with the CA under ``<home>/tls``; see the module docstring.
    secure: bool = False
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

    @property
    def tls_dir(self) -> Path:
        """The CA, the broker's keystore and the SCRAM passwords of a secured broker (mode 0700)."""
        return self.home / "tls"

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(self.tls_dir)

    @property
    def client_password_file(self) -> Path:
        return self.tls_dir / f"{CLIENT_USER}.password"

    @property
    def _broker_password_file(self) -> Path:
        return self.tls_dir / f"{BROKER_USER}.password"

    def formatted_protocol(self) -> str | None:
        """``PLAINTEXT`` or ``SASL_SSL`` for formatted storage (kept from its format), else None."""
        if not (self.home / "data" / "meta.properties").exists():
            return None
        mode = self.home / "security"
        # Storage formatted before the secured mode existed is plaintext.
        return mode.read_text().strip() if mode.exists() else PLAINTEXT

    @property
    def protocol(self) -> str:
        return SASL_SSL if self.secure else PLAINTEXT

    def client_security(self) -> ClientSecurity:
        """The settings a client of this secured broker uses (it must have been started secure)."""
        if not self.secure:
            raise LocalKafkaError("this local broker is plaintext: no client security to print")
        return ClientSecurity(self.bootstrap, CLIENT_USER, self.client_password_file, self.ca.cert)

    def _saved_port(self, name: str, value: int | None) -> int:
        saved = self.home / f"{name}.port"
        if value is None:
            value = int(saved.read_text()) if saved.exists() else free_port()
        saved.write_text(str(value))
        return value

    def _controller_port(self) -> int:
        self.controller_port = self._saved_port("controller", self.controller_port)
        return self.controller_port

    def _listener_lines(self, cport: int) -> list[str]:
        controller = f"CONTROLLER://127.0.0.1:{cport}"
        if not self.secure:
            return [
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},{controller}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            ]
        iport = self._saved_port("internal", None)
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required"
        broker_password = self._broker_password_file.read_text()
        keystore = make_server_keystore(self.ca, self.tls_dir / "broker.p12", hosts=TLS_HOSTS)
        return [
            f"listeners=CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{iport},{controller}",
            # INTERNAL must be advertised to be the inter-broker listener; a client is only ever
            # told about the listener it connected through, so clients never see it.
            f"advertised.listeners=CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{iport}",
            "listener.security.protocol.map=CLIENT:SASL_SSL,INTERNAL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=INTERNAL",
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
            "listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256",
            f"listener.name.client.scram-sha-512.sasl.jaas.config={scram};",
            f"listener.name.client.scram-sha-256.sasl.jaas.config={scram};",
            "listener.name.internal.sasl.enabled.mechanisms=SCRAM-SHA-512",
            # Server and client side of the broker's own connection to INTERNAL.
            f'listener.name.internal.scram-sha-512.sasl.jaas.config={scram} username="{BROKER_USER}" '
            f'password="{broker_password}";',
            "ssl.keystore.type=PKCS12",
            f"ssl.keystore.location={keystore.store.resolve()}",
            f"ssl.keystore.password={keystore.password()}",
            f"ssl.key.password={keystore.password()}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.ca.cert.resolve()}",
            "ssl.endpoint.identification.algorithm=https",
            # A client may also present a certificate (KAFKA_SSL_CERT_FILE); one from another CA is
            # refused. Not required: SCRAM is the login, as on MSK or Confluent Cloud. (Kafka applies
            # the unprefixed setting to SSL listeners only, so it is set per listener.)
            "listener.name.client.ssl.client.auth=requested",
        ]

    def _write_config(self) -> Path:
        private_dir(self.home)
        cport = self._controller_port()
        data = (self.home / "data").resolve()
        props = self.home / "server.properties"
        # 0600: a secured broker's file holds its keystore and SCRAM passwords.
        write_private(
            props,
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{cport}",
                    *self._listener_lines(cport),
                    "controller.listener.names=CONTROLLER",
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
            ),
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

    def _check_mode(self) -> None:
        formatted = self.formatted_protocol()
        if formatted is not None and formatted != self.protocol:
            flag = "with --secure" if formatted == SASL_SSL else "without --secure"
            raise LocalKafkaError(
                f"the broker in {self.home} was formatted {formatted}: start it {flag}, or "
                "`audience-relay kafka wipe` it first (its topics are lost)"
            )

    def _make_secrets(self) -> None:
        """CA, broker keystore and SCRAM passwords under ``tls_dir`` (kept when already there)."""
        private_dir(self.tls_dir)
        try:
            make_ca(self.tls_dir)
        except TlsMaterialError as exc:
            raise LocalKafkaError(str(exc)) from None
        for path in (self.client_password_file, self._broker_password_file):
            if not path.exists():
                write_private(path, new_password())

    def _format(self, props: Path) -> None:
        args = ["format", "-t", new_cluster_id(), "-c", str(props)]
        secrets: list[str] = []
        if self.secure:
            client, broker = self.client_password_file.read_text(), self._broker_password_file.read_text()
            secrets = [client, broker]
            args += [
                "--add-scram",
                f"SCRAM-SHA-512=[name={CLIENT_USER},password={client}]",
                "--add-scram",
                f"SCRAM-SHA-256=[name={CLIENT_USER},password={client}]",
                "--add-scram",
                f"SCRAM-SHA-512=[name={BROKER_USER},password={broker}]",
            ]
        # The tool's arguments go in a 0600 java argument file, so no password shows in `ps`.
        argfile = write_private(self.home / "format.args", "\n".join(["kafka.tools.StorageTool", *args]))
        try:
            fmt = subprocess.run(
                self._java(f"@{argfile.resolve()}"), capture_output=True, text=True, check=False
            )
        finally:
            argfile.unlink(missing_ok=True)
        if fmt.returncode != 0:
            # The tool echoes its arguments when it refuses them: never pass a password on.
            detail = mask(fmt.stderr[-2000:], secrets)
            raise LocalKafkaError(f"formatting the broker storage failed: {detail}")
        (self.home / "security").write_text(self.protocol)

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker (formatting its storage the first time) and wait until it serves."""
        self._check_mode()
        if self.pid() is not None:
            self._wait_ready(timeout)
            return self.bootstrap
        if port_open("127.0.0.1", self.port):
            raise LocalKafkaError(f"port {self.port} is taken by another process; set RELAY_LOCAL_KAFKA_PORT")
        fetch_jars(self.local_dir)
        if self.secure:
            self._make_secrets()
        try:
            props = self._write_config()
        except TlsMaterialError as exc:
            raise LocalKafkaError(str(exc)) from None
        if self.formatted_protocol() is None:
            self._format(props)
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
                if self.secure:
                    self._check_tls()
                return
            time.sleep(0.1)  # polling a condition: the broker says when it is ready
        raise LocalKafkaError(f"the broker did not become ready within {timeout:.0f}s; see {self.log_file}")

    def _check_tls(self) -> None:
        """A TLS handshake as a client will do it: the chain verifies against the CA, the name matches."""
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return
        except (OSError, ssl.SSLError) as exc:
            raise LocalKafkaError(
                f"the broker's TLS listener refused a client trusting {self.ca.cert}: {exc}"
            ) from None

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
