"""Keeping destination credentials out of dead letters and logs (pure functions)."""

from __future__ import annotations

import base64

from audience_relay.settings import Settings

MASK = "***"
#: Characters of a destination's answer kept in the ``response-excerpt`` dead-letter header.
EXCERPT = 500


def secrets_of(settings: Settings) -> list[str]:
    """Every configured destination secret, in the forms a destination may echo back (for scrubbing)."""
    configured = [
        s.get_secret_value() for s in (settings.pushly_api_key, settings.odp_auth_token) if s is not None
    ]
    return secret_variants(configured)


def secret_variants(secrets: list[str]) -> list[str]:
    """Each secret, its credential part (``Bearer <token>`` -> ``<token>``) and their base64 forms.

    Longest first, so that a whole value is scrubbed before a part of it.
    """
    variants: set[str] = set()
    for secret in secrets:
        parts = [secret, *(p for p in secret.split() if len(p) >= 8 and p != secret)]
        for part in parts:
            raw = part.encode()
            variants.add(part)
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                encoded = encode(raw).decode()
                variants.update({encoded, encoded.rstrip("=")})
    return sorted((v for v in variants if v), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def excerpt(text: str, secrets: list[str], limit: int = EXCERPT) -> str:
    """The first ``limit`` characters of ``text`` once every secret in the *whole* text is scrubbed.

    Scrubbing first matters: cut first, and a secret that straddles the cut leaves its first half,
    which no longer matches the secret, in the excerpt.
    """
    return scrub(text, secrets)[:limit]
