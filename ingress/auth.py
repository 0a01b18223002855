"""Who may post: static API keys, query-parameter keys and OAuth 2.0 client-credentials tokens.

Every comparison is constant-time over SHA-256 digests (so neither the key nor its length leaks
through timing), every configured key is tried (no early exit on the first match), and nothing here
ever logs or returns a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from audience_relay.settings import Settings

DEFAULT_SOURCE = "default"
TOKEN_PREFIX = "rt1."
ANY_SOURCE = "*"


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def _matches_any(presented: str, digests: list[bytes]) -> bool:
    probe = _digest(presented)
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
    """Checks credentials for a source and issues/verifies OAuth bearer tokens."""

    def __init__(self, settings: Settings, *, allow_anonymous: bool = False) -> None:
        #: Only with ``--insecure`` and no credential configured at all: every request is let in.
        self.allow_anonymous = allow_anonymous and not settings.has_credentials()
        self.query_param = settings.ingress_query_param
        self.ttl = settings.oauth_token_ttl_seconds
        self._global_keys = [_digest(k.get_secret_value()) for k in settings.ingress_api_keys]
        self._source_keys = {
            name: [_digest(k.get_secret_value()) for k in src.api_keys]
            for name, src in settings.sources.items()
        }
        # client id -> (secret digest, source the tokens are good for)
        self._clients: dict[str, tuple[bytes, str]] = {
            cid: (_digest(secret.get_secret_value()), ANY_SOURCE)
            for cid, secret in settings.oauth_clients.items()
        }
        for name, src in settings.sources.items():
            for cid, secret in src.oauth_clients.items():
                self._clients[cid] = (_digest(secret.get_secret_value()), name)
        # Without a configured key, tokens die with the process and are not shared across replicas.
        configured = settings.oauth_signing_key
        self.ephemeral_signing_key = configured is None
        self._signing_key = configured.get_secret_value().encode() if configured else secrets.token_bytes(32)

    def knows_source(self, source: str) -> bool:
        return source == DEFAULT_SOURCE or source in self._source_keys

    def _keys_for(self, source: str) -> list[bytes]:
        return self._global_keys + self._source_keys.get(source, [])

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
        entry = self._clients.get(client_id)
        # Compare against a dummy when the client is unknown, so both paths take the same time.
        expected, scope = entry if entry is not None else (_digest(secrets.token_bytes(16)), "")
        if not hmac.compare_digest(_digest(client_secret), expected) or entry is None:
            return None
        exp = int((time.time() if now is None else now) + self.ttl)
        payload = _b64(orjson.dumps({"cid": client_id, "src": scope, "exp": exp, "n": secrets.token_hex(8)}))
        return IssuedToken(f"{TOKEN_PREFIX}{payload}.{self._sign(payload)}", self.ttl)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._signing_key, payload.encode(), hashlib.sha256).digest())

    def verify_token(self, token: str, source: str, now: float | None = None) -> bool:
        """True for an unexpired token this ingress signed, valid for ``source``."""
        try:
            payload, _, signature = token[len(TOKEN_PREFIX) :].partition(".")
            if not hmac.compare_digest(self._sign(payload), signature):
                return False
            claims = orjson.loads(_unb64(payload))
            exp = float(claims["exp"])
            scope = str(claims["src"])
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return False
        if exp <= (time.time() if now is None else now):
            return False
        return scope in (ANY_SOURCE, source)
