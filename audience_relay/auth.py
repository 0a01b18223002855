"""Who may post: static API keys, query-parameter keys and OAuth 2.0 client-credentials tokens.

Every comparison is constant-time over SHA-256 digests (so neither the key nor its length leaks
through timing), every configured key is tried (no early exit on the first match), and nothing here
ever logs or returns a secret.

A token names its client and the source it was issued for, and every use checks it against the
client's *current* grant: narrowing a client to another source, or removing it, takes effect on its
tokens at the next reload, not at their expiry.

The same ``Authenticator`` serves the ingress and a worker's query routes; both reload it on SIGHUP
(``try_reload``), from the environment's snapshot and ``RELAY_INGRESS_KEYS_FILE``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from audience_relay.keys import ANY_SOURCE, Credentials, KeysFileError, digest, load_credentials
from audience_relay.settings import Settings

DEFAULT_SOURCE = "default"
TOKEN_PREFIX = "rt1."

log = logging.getLogger("audience_relay.auth")


def _matches_any(presented: str, digests: tuple[bytes, ...]) -> bool:
    probe = digest(presented)
    found = False
    for candidate in digests:
        found |= hmac.compare_digest(probe, candidate)
    return found


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Principal:
    """Who a request was authenticated as: the source and the kind of credential (never its value)."""

    source: str
    method: str


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int


class Authenticator:
    """Checks credentials for a source and issues/verifies OAuth bearer tokens.

    Its credentials are one immutable snapshot (``Credentials``), swapped whole by ``reload`` (on
    SIGHUP): a request is checked against either the old or the new set, never a mix.
    """

    def __init__(self, settings: Settings, *, allow_anonymous: bool = False) -> None:
        self._settings = settings
        self.query_param = settings.ingress_query_param
        self.ttl = settings.oauth_token_ttl_seconds
        # Without a configured key, tokens die with the process and are not shared across replicas;
        # the per-process key survives reloads so a reload does not void the tokens already issued.
        self._process_key = secrets.token_bytes(32)
        self._creds = load_credentials(settings)
        if allow_anonymous and settings.ingress_keys_file is not None and not self._creds.any():
            # A keys file is where credentials are meant to be: one that holds none is a mistake
            # (or a file emptied by accident), never a request to open the door.
            raise KeysFileError(
                f"the keys file {settings.ingress_keys_file} leaves no credential at all; --insecure "
                "accepts requests without credentials only when no credential source is configured "
                "(no RELAY_INGRESS_KEYS_FILE either)"
            )
        # Decided once, at start: a reload can never switch an ingress to accepting anyone.
        self._anonymous = allow_anonymous and not self._creds.any()

    @property
    def allow_anonymous(self) -> bool:
        """Only with ``--insecure`` and no credential source configured at all: every request is let in."""
        return self._anonymous

    @property
    def ephemeral_signing_key(self) -> bool:
        return not self._creds.signing_keys

    @property
    def credentials(self) -> Credentials:
        return self._creds

    def reload(self) -> Credentials:
        """Re-read the environment's snapshot and the keys file; swap them in only if usable.

        Raises ``KeysFileError`` (the old credentials stay in force) for a bad file, or for a file
        that would leave no credential at all (with or without ``--insecure``).
        """
        fresh = load_credentials(self._settings)
        if not fresh.any() and not self._anonymous:
            raise KeysFileError("the keys file leaves no credential at all; keeping the previous ones")
        self._creds = fresh
        return fresh

    def try_reload(self) -> bool:
        """``reload`` for a SIGHUP: logs the outcome (counts only, never a secret); True when swapped in."""
        try:
            credentials = self.reload()
        except KeysFileError as exc:
            log.error("credentials not reloaded; the previous ones stay in force", extra={"error": str(exc)})
            return False
        log.info("credentials reloaded", extra=credentials.summary())
        return True

    def _signing_keys(self) -> tuple[bytes, ...]:
        return self._creds.signing_keys or (self._process_key,)

    def knows_source(self, source: str) -> bool:
        return source == DEFAULT_SOURCE or source in self._creds.source_keys

    def _keys_for(self, source: str) -> tuple[bytes, ...]:
        creds = self._creds
        return creds.global_keys + creds.source_keys.get(source, ())

    def authenticate(
        self, source: str, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> Principal | None:
        """The principal a request's credentials prove for ``source``, or None."""
        if self.allow_anonymous:
            return Principal(source, "anonymous")
        keys = self._keys_for(source)
        api_key = headers.get("X-API-KEY")
        if api_key is not None and _matches_any(api_key.strip(), keys):
            return Principal(source, "x-api-key")
        authorization = headers.get("Authorization")
        if authorization is not None:
            value = authorization.strip()
            scheme, _, rest = value.partition(" ")
            bearer = rest.strip() if scheme.lower() == "bearer" else None
            if bearer is not None and bearer.startswith(TOKEN_PREFIX):
                return Principal(source, "oauth") if self.verify_token(bearer, source) else None
            if _matches_any(bearer if bearer is not None else value, keys):
                return Principal(source, "authorization")
        query_key = query.get(self.query_param)
        if query_key is not None and _matches_any(query_key, keys):
            return Principal(source, "query")
        return None

    def issue_token(self, client_id: str, client_secret: str, now: float | None = None) -> IssuedToken | None:
        """A signed, expiring bearer token for valid client credentials, else None."""
        entry = self._creds.clients.get(client_id)
        # Compare against a dummy when the client is unknown, so both paths take the same time.
        expected, scope = entry if entry is not None else (digest(secrets.token_bytes(16)), "")
        if not hmac.compare_digest(digest(client_secret), expected) or entry is None:
            return None
        exp = int((time.time() if now is None else now) + self.ttl)
        payload = _b64(orjson.dumps({"cid": client_id, "src": scope, "exp": exp, "n": secrets.token_hex(8)}))
        return IssuedToken(
            f"{TOKEN_PREFIX}{payload}.{self._sign(payload, self._signing_keys()[0])}", self.ttl
        )

    @staticmethod
    def _sign(payload: str, key: bytes) -> str:
        return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())

    def verify_token(self, token: str, source: str, now: float | None = None) -> bool:
        """True for an unexpired token signed with a current signing key, valid for ``source``."""
        try:
            payload, _, signature = token[len(TOKEN_PREFIX) :].partition(".")
            signed = False
            for key in self._signing_keys():
                signed |= hmac.compare_digest(self._sign(payload, key), signature)
            if not signed:
                return False
            claims = orjson.loads(_unb64(payload))
            exp = float(claims["exp"])
            scope = str(claims["src"])
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return False
        if exp <= (time.time() if now is None else now):
            return False
        # The client's grant as configured now, not as it was when the token was issued: a token
        # outlives a rotation of its client's secret (until it expires), but not the removal of the
        # client nor a change of the source it is granted.
        entry = self._creds.clients.get(str(claims.get("cid", "")))
        if entry is None:
            return False
        return _grants(entry[1], source) and _grants(scope, source)


def _grants(scope: str, source: str) -> bool:
    return scope in (ANY_SOURCE, source)
