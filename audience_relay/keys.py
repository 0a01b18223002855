"""The ingress's credentials: from the environment plus an optional keys file, re-read on SIGHUP.

Environment variables cannot change under a running process, so rotation without a restart goes
through ``RELAY_INGRESS_KEYS_FILE``, a JSON document (every field optional)::

    {
      "api_keys": ["new-key", "old-key"],
      "oauth_clients": {"lytics": "client-secret"},
      "oauth_signing_keys": ["signing-key-now", "signing-key-before"],
      "sources": {"crm": {"api_keys": ["crm-key"], "oauth_clients": {"crm-job": "secret"}}}
    }

What the file holds is added to what the environment holds (``RELAY_INGRESS_API_KEYS``,
``RELAY_OAUTH_CLIENTS``, ``RELAY_SOURCES``, ``RELAY_OAUTH_SIGNING_KEY``); a client id in both takes
the file's definition whole (its secret and the source it is granted). The first of
``oauth_signing_keys`` signs new tokens, every listed key (and the environment's) still verifies, so
tokens issued before a signing-key rotation live out their TTL.

An OAuth client is granted exactly one source, or every source (``oauth_clients`` at the top level).
The same client id twice within one layer (the environment, or the file) is refused with an error
naming the id and both places: silently keeping one of the two would disable the other.

Only SHA-256 digests of keys and client secrets are kept in memory. Nothing here puts a secret in an
exception message: a bad file is reported by field path and line/column only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from audience_relay.settings import Settings, check_source_name

ANY_SOURCE = "*"


class KeysFileError(Exception):
    """The credentials cannot be used (a bad keys file, or a client id configured twice).

    The message names the problem (field path, line, client id), never a secret.
    """


class SourceKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[SecretStr] = Field(default_factory=list)
    oauth_clients: dict[str, SecretStr] = Field(default_factory=dict)


class KeysFile(BaseModel):
    """The document ``RELAY_INGRESS_KEYS_FILE`` points at."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[SecretStr] = Field(default_factory=list)
    oauth_clients: dict[str, SecretStr] = Field(default_factory=dict)
    oauth_signing_keys: list[SecretStr] = Field(default_factory=list)
    sources: dict[str, SourceKeys] = Field(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _names(cls, value: dict[str, SourceKeys]) -> dict[str, SourceKeys]:
        for name in value:
            check_source_name(name)
        return value

    @field_validator("api_keys", "oauth_signing_keys")
    @classmethod
    def _not_blank(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not k.get_secret_value().strip() for k in value):
            raise ValueError("keys must not be empty")
        return value


def digest(value: str | bytes) -> bytes:
    """SHA-256 of a secret: what is kept and compared (in constant time) instead of the secret."""
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


@dataclass(frozen=True)
class Credentials:
    """One consistent snapshot of everything that can authenticate a request."""

    global_keys: tuple[bytes, ...] = ()
    source_keys: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    #: client id -> (secret digest, source the tokens are good for, or ANY_SOURCE)
    clients: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    #: HMAC keys: the first signs, all verify. Empty: the caller supplies a per-process key.
    signing_keys: tuple[bytes, ...] = ()

    def any(self) -> bool:
        return bool(self.global_keys or self.clients or any(self.source_keys.values()))

    def sources(self) -> set[str]:
        return set(self.source_keys)

    def summary(self) -> dict[str, int]:
        """Counts only, for a log line."""
        return {
            "api_keys": len(self.global_keys),
            "sources": len(self.source_keys),
            "source_keys": sum(len(v) for v in self.source_keys.values()),
            "oauth_clients": len(self.clients),
            "signing_keys": len(self.signing_keys),
        }


def read_keys_file(path: Path) -> KeysFile:
    """Parse and validate the keys file; ``KeysFileError`` (without any secret) when unusable."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeysFileError(
            f"cannot read the keys file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise KeysFileError(
            f"the keys file {path} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    try:
        return KeysFile.model_validate(document)
    except ValidationError as exc:
        # include_input=False: a wrongly typed field would otherwise echo its (secret) value.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False, include_context=False)
        )
        raise KeysFileError(f"the keys file {path} is invalid: {problems}") from None


def _secrets(values: list[SecretStr]) -> list[bytes]:
    return [digest(v.get_secret_value()) for v in values]


def _client_grants(
    layer: str,
    everywhere: dict[str, SecretStr],
    everywhere_name: str,
    per_source: dict[str, dict[str, SecretStr]],
    source_name: str,
) -> dict[str, tuple[bytes, str]]:
    """client id -> (secret digest, granted source) for one layer; a client id twice is an error."""
    grants: dict[str, tuple[bytes, str]] = {}
    places: dict[str, str] = {}
    declared = [(everywhere_name, ANY_SOURCE, everywhere)] + [
        (source_name.format(name), name, clients) for name, clients in per_source.items()
    ]
    for place, scope, clients in declared:
        for cid, secret in clients.items():
            if cid in grants:
                raise KeysFileError(
                    f"the OAuth client id {cid!r} is configured twice in {layer} ({places[cid]} and "
                    f"{place}): a client is granted one source, or all of them at the top level"
                )
            grants[cid] = (digest(secret.get_secret_value()), scope)
            places[cid] = place
    return grants


def build_credentials(settings: Settings, keys_file: KeysFile | None = None) -> Credentials:
    """The environment's credentials plus the keys file's (pure: no I/O).

    Raises ``KeysFileError`` when a client id is configured twice within the environment or within
    the file; a client id in both takes the file's secret and grant.
    """
    keys_file = keys_file or KeysFile()
    source_keys: dict[str, tuple[bytes, ...]] = {
        name: tuple(_secrets(src.api_keys)) for name, src in settings.sources.items()
    }
    for name, src in keys_file.sources.items():
        source_keys[name] = source_keys.get(name, ()) + tuple(_secrets(src.api_keys))
    clients = _client_grants(
        "the environment",
        settings.oauth_clients,
        "RELAY_OAUTH_CLIENTS",
        {name: src.oauth_clients for name, src in settings.sources.items()},
        "RELAY_SOURCES.{}",
    )
    clients.update(
        _client_grants(
            "the keys file",
            keys_file.oauth_clients,
            "oauth_clients",
            {name: src.oauth_clients for name, src in keys_file.sources.items()},
            "sources.{}",
        )
    )
    signing = [k.get_secret_value().encode() for k in keys_file.oauth_signing_keys]
    if settings.oauth_signing_key is not None:
        env_key = settings.oauth_signing_key.get_secret_value().encode()
        if env_key not in signing:
            signing.append(env_key)
    return Credentials(
        global_keys=tuple(_secrets(settings.ingress_api_keys) + _secrets(keys_file.api_keys)),
        source_keys=source_keys,
        clients=clients,
        signing_keys=tuple(signing),
    )


def load_credentials(settings: Settings) -> Credentials:
    """The credentials in force now: environment plus ``RELAY_INGRESS_KEYS_FILE`` when set."""
    path = settings.ingress_keys_file
    return build_credentials(settings, read_keys_file(path) if path is not None else None)
