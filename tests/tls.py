"""Throw-away TLS material (openssl CLI) and a TLS listener that is not Kafka, for the connection tests.

``TlsListener`` accepts TLS connections and hangs up after reading the first bytes, which is what a
Kafka TLS listener does to a client speaking the wrong protocol; it lets the start-up check's TLS
classification (untrusted CA, wrong host name, client certificate, plaintext client) be tested
without a secured broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from devtools.localkafka import free_port

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def make_ca(folder: Path, name: str = "test-ca") -> Pem:
    """A self-signed CA."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl(
        "req", "-x509", *_EC, "-nodes", "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return Pem(cert, key)


def make_cert(
    folder: Path, ca: Pem, name: str, san: str = "IP:127.0.0.1", password: str | None = None
) -> Pem:
    """A certificate for ``san`` signed by ``ca``; its key encrypted with ``password`` when given."""
    cert, key, csr, ext = (folder / f"{name}{s}" for s in (".crt", ".key", ".csr", ".ext"))
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("req", *_EC, "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-days", "1", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    if password is not None:
        plain = key.with_suffix(".plain")
        key.rename(plain)
        _openssl("pkey", "-in", str(plain), "-aes256", "-passout", f"pass:{password}", "-out", str(key))
    return Pem(cert, key)


@dataclass
class TlsListener:
    """A TLS server on 127.0.0.1:``port`` (see the module docstring)."""

    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def tls_listener(server: Pem, client_ca: Path | None = None) -> AsyncIterator[TlsListener]:
    """Serve TLS with ``server``'s certificate; with ``client_ca``, demand a client certificate it signed.

    (Python's TLS server hangs up on a missing or untrusted client certificate without the alert a
    Java broker sends, so it cannot stand in for a broker's mTLS refusal.)
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.cert, server.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(64)
        writer.close()

    port = free_port()
    listener = await asyncio.start_server(hang_up, "127.0.0.1", port, ssl=context)
    try:
        yield TlsListener(port)
    finally:
        listener.close()
        await listener.wait_closed()
