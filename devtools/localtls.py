"""Self-signed TLS material for the local secured broker, made with the JDK's ``keytool``.

The local broker already needs OpenJDK, so ``keytool`` is always there and no Python package is
added for certificates. Everything is written into one folder (mode 0700): the CA's certificate as
PEM (what the Python clients trust), the CA's key in a PKCS12 store, and the broker's key and
certificate chain in a PKCS12 store that Kafka reads. Store passwords are random and never passed on
a command line (``keytool -storepass:env``), so they do not show in ``ps``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Faster JVM start for a short-lived tool; keytool does a few milliseconds of work per call.
_KEYTOOL_JVM = ["-J-XX:TieredStopAtLevel=1", "-J-XX:+UseSerialGC"]
_VALIDITY_DAYS = "825"
_STORE_PASSWORD_ENV = "RELAY_KEYTOOL_STOREPASS"
_CA_PASSWORD_ENV = "RELAY_KEYTOOL_CAPASS"


class TlsMaterialError(RuntimeError):
    """keytool is missing or refused to make a key, a request or a certificate."""


def new_password() -> str:
    """A random password of URL-safe characters (nothing a properties file or JAAS line must escape)."""
    return secrets.token_urlsafe(24)


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (0600), also when the file existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it accessible to its owner only."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _keytool(*args: str, passwords: dict[str, str]) -> None:
    keytool = shutil.which("keytool")
    if keytool is None:
        raise TlsMaterialError("keytool (part of OpenJDK 17) is not on PATH: it makes the local TLS keys")
    proc = subprocess.run(
        [keytool, *_KEYTOOL_JVM, *args],
        env={**os.environ, **passwords},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        # keytool never echoes a password; its output names the file or option it refused.
        output = f"{proc.stdout}{proc.stderr}".strip()
        raise TlsMaterialError(f"keytool {args[0]} failed (exit {proc.returncode}): {output}")


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA: ``cert`` (PEM, public) and its key in ``store`` (PKCS12, 0600)."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def store(self) -> Path:
        return self.directory / "ca.p12"

    @property
    def password_file(self) -> Path:
        return self.directory / "ca.p12.password"

    def exists(self) -> bool:
        return self.cert.exists() and self.store.exists() and self.password_file.exists()

    def sign(self, csr: Path, out: Path, *, hosts: list[str]) -> Path:
        """Sign a PKCS#10 request for a TLS server/client certificate valid for ``hosts``."""
        sans = ",".join(f"ip:{h}" if _is_ip(h) else f"dns:{h}" for h in hosts)
        _keytool(
            "-gencert",
            "-alias",
            "ca",
            "-keystore",
            str(self.store),
            "-storepass:env",
            _CA_PASSWORD_ENV,
            "-infile",
            str(csr),
            "-outfile",
            str(out),
            "-rfc",
            "-validity",
            _VALIDITY_DAYS,
            "-ext",
            f"SAN={sans}",
            "-ext",
            "KeyUsage:c=digitalSignature",
            "-ext",
            "EKU=serverAuth,clientAuth",
            passwords={_CA_PASSWORD_ENV: self.password_file.read_text()},
        )
        return out


def _is_ip(host: str) -> bool:
    return all(part.isdigit() for part in host.split(".")) and host.count(".") == 3


def make_ca(directory: Path, name: str = "audience-relay local CA") -> CertificateAuthority:
    """A new self-signed CA in ``directory`` (reused when it is already there)."""
    ca = CertificateAuthority(private_dir(directory))
    if ca.exists():
        return ca
    for stale in (ca.cert, ca.store):
        stale.unlink(missing_ok=True)
    password = new_password()
    write_private(ca.password_file, password)
    env = {_CA_PASSWORD_ENV: password}
    _keytool(
        "-genkeypair",
        "-alias",
        "ca",
        "-keyalg",
        "EC",
        "-groupname",
        "secp256r1",
        "-dname",
        f"CN={name}",
        "-ext",
        "bc:c",
        "-ext",
        "KeyUsage:c=keyCertSign,cRLSign",
        "-validity",
        _VALIDITY_DAYS,
        "-keystore",
        str(ca.store),
        "-storetype",
        "PKCS12",
        "-storepass:env",
        _CA_PASSWORD_ENV,
        passwords=env,
    )
    ca.store.chmod(0o600)
    _keytool(
        "-exportcert",
        "-rfc",
        "-alias",
        "ca",
        "-keystore",
        str(ca.store),
        "-storepass:env",
        _CA_PASSWORD_ENV,
        "-file",
        str(ca.cert),
        passwords=env,
    )
    ca.cert.chmod(0o644)
    return ca


@dataclass(frozen=True)
class ServerKeystore:
    """A key and its CA-signed certificate chain in a PKCS12 store (what the broker presents)."""

    store: Path
    password_file: Path

    def exists(self) -> bool:
        return self.store.exists() and self.password_file.exists()

    def password(self) -> str:
        return self.password_file.read_text()


def make_server_keystore(
    ca: CertificateAuthority, store: Path, *, hosts: list[str], common_name: str = "localhost"
) -> ServerKeystore:
    """A PKCS12 store at ``store`` holding a new EC key and its chain signed by ``ca`` for ``hosts``."""
    keystore = ServerKeystore(store, store.with_name(f"{store.name}.password"))
    if keystore.exists():
        return keystore
    store.unlink(missing_ok=True)
    password = new_password()
    write_private(keystore.password_file, password)
    env = {_STORE_PASSWORD_ENV: password}
    common = ["-alias", "server", "-keystore", str(store), "-storepass:env", _STORE_PASSWORD_ENV]
    _keytool(
        "-genkeypair",
        *common,
        "-keyalg",
        "EC",
        "-groupname",
        "secp256r1",
        "-dname",
        f"CN={common_name}",
        "-validity",
        _VALIDITY_DAYS,
        "-storetype",
        "PKCS12",
        passwords=env,
    )
    store.chmod(0o600)
    csr = store.with_suffix(".csr")
    signed = store.with_suffix(".signed.pem")
    try:
        _keytool("-certreq", *common, "-file", str(csr), passwords=env)
        ca.sign(csr, signed, hosts=hosts)
        # The reply must carry the whole chain (CA first is fine: keytool orders it) so the broker
        # presents its certificate together with the CA's.
        signed.write_text(ca.cert.read_text() + signed.read_text())
        _keytool("-importcert", "-noprompt", *common, "-file", str(signed), passwords=env)
    finally:
        csr.unlink(missing_ok=True)
        signed.unlink(missing_ok=True)
    return keystore


@dataclass(frozen=True)
class ClientPem:
    """A client certificate (PEM, CA-signed) and its private key (PEM, PKCS#8, encrypted)."""

    cert: Path
    key: Path


def make_client_pem(ca: CertificateAuthority, directory: Path, name: str, key_password: str) -> ClientPem:
    """A client key encrypted with ``key_password`` and a certificate for ``CN=name`` signed by ``ca``.

    What ``KAFKA_SSL_CERT_FILE`` / ``KAFKA_SSL_KEY_FILE`` / ``KAFKA_SSL_KEY_PASSWORD`` point at. keytool
    cannot write a private key as PEM, so the key and its request come from ``openssl``; the CA signs.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsMaterialError("openssl is not on PATH: it writes PEM client keys")
    private_dir(directory)
    pem = ClientPem(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    env = {**os.environ, _STORE_PASSWORD_ENV: key_password}
    password = f"env:{_STORE_PASSWORD_ENV}"  # never on the command line
    genkey = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes-256-cbc"]
    request = ["req", "-new", "-key", str(pem.key), "-passin", password, "-subj", f"/CN={name}"]
    steps = [[*genkey, "-pass", password, "-out", str(pem.key)], [*request, "-out", str(csr)]]
    try:
        for step in steps:
            proc = subprocess.run([openssl, *step], env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise TlsMaterialError(f"openssl {step[0]} failed (exit {proc.returncode}): {proc.stderr}")
        pem.key.chmod(0o600)
        ca.sign(csr, pem.cert, hosts=[name])
    finally:
        csr.unlink(missing_ok=True)
    return pem
