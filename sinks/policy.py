"""What each destination wants of a change (pure): which identifier, hashed or not, which audiences.

- **Identifier.** A change carries ``identifier`` (the value of ``RELAY_MATCH_FIELD``, which keys
  state and topics) and ``identifiers`` (every identifier field the Lytics record exported,
  normalized: e.g. ``{"_id": "4f1b…", "email": "a@b.c", "user_id": "u1"}``). A destination sends the
  value of its *source* field (Pushly and analytics: the match field; ODP: ``_id``, the Lytics ID)
  under its *field* name, as is or as the lower-case hex SHA-256 of the normalized value
  (trimmed; lower-cased when it is an e-mail address). A change without that value is not sent:
  it is dead-lettered with a reason naming the Lytics Export Field to add.
- **Audiences.** Include and exclude lists of globs matched against the audience id and slug
  (``fnmatch``, case-sensitive): with an include list only matching audiences go; an exclude match
  always stays out. Empty lists: every audience. A filtered change is never sent.
- **Field changes** (``<prefix>.field-changes``) only go to destinations that take them (analytics).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from audience_relay.exits import ExitCode, Fatal
from audience_relay.names import SINKS
from audience_relay.settings import Settings

Identifier = str | list[str]


@dataclass(frozen=True)
class Policy:
    """One destination's choices."""

    destination: str
    #: The identifier field whose value is sent.
    source: str
    #: The name it is sent under (Lytics-format destinations).
    field: str
    hash: Literal["none", "sha256"] = "none"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    field_changes: bool = False


@dataclass(frozen=True)
class Send:
    """The change goes, with this identifier value."""

    identifier: Identifier


@dataclass(frozen=True)
class Skip:
    """The change does not go: ``outcome`` is ``filtered`` or ``unknown_identifier``."""

    outcome: Literal["filtered", "unknown_identifier"]
    reason: str


def policy_for(name: str, settings: Settings) -> Policy:
    """The policy of the destination ``name`` from the settings."""
    match = settings.match_field
    if name == "pushly":
        source = settings.pushly_identifier_source or match
        return Policy(
            name,
            source,
            settings.pushly_identifier_field or source,
            settings.pushly_identifier_hash,
            tuple(settings.pushly_audiences_include),
            tuple(settings.pushly_audiences_exclude),
        )
    if name == "odp":
        return Policy(
            name,
            settings.odp_identifier_source,
            settings.odp_identifier_field,
            settings.odp_identifier_hash,
            tuple(settings.odp_audiences_include),
            tuple(settings.odp_audiences_exclude),
        )
    if name == "analytics":
        source = settings.analytics_identifier_source or match
        return Policy(
            name,
            source,
            source,
            settings.analytics_identifier_hash,
            tuple(settings.analytics_audiences_include),
            tuple(settings.analytics_audiences_exclude),
            field_changes=True,
        )
    raise Fatal(f"unknown sink {name!r}: one of {', '.join(SINKS)}", ExitCode.USAGE)


def normalized(value: str) -> str:
    """The form that is hashed: trimmed; e-mail addresses lower-cased."""
    text = value.strip()
    return text.lower() if "@" in text else text


def sha256_hex(value: str) -> str:
    """Lower-case hex SHA-256 of the normalized value."""
    return hashlib.sha256(normalized(value).encode()).hexdigest()


def _values(value: Any) -> Identifier | None:
    if isinstance(value, list):
        items = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return items or None
    if value is None or isinstance(value, dict):
        return None
    text = str(value).strip()
    return text or None


def identifier_of(change: dict[str, Any], source: str) -> Identifier | None:
    """The value of the identifier field ``source`` in ``change``, or None when it is unknown."""
    if source == change.get("match_field"):
        return _values(change.get("identifier"))
    identifiers = change.get("identifiers")
    if isinstance(identifiers, dict) and source in identifiers:
        return _values(identifiers[source])
    return None


def export_field_hint(source: str) -> str:
    """How the Lytics job must change so that ``source`` is exported."""
    if source == "_id":
        return "add 'Lytics ID' (exported as _id) to the Export Fields of the Lytics webhook job"
    return f"add '{source}' to the Export Fields of the Lytics webhook job"


def audience_wanted(policy: Policy, audience_id: str, slug: str | None) -> bool:
    """True when the destination's audience lists let this audience through."""
    if not policy.include and not policy.exclude:
        return True  # the default, every audience: no matching per change
    return _lists_let_through(policy.include, policy.exclude, audience_id, slug)


@functools.lru_cache(maxsize=4096)
def _lists_let_through(
    include: tuple[str, ...], exclude: tuple[str, ...], audience_id: str, slug: str | None
) -> bool:
    # Cached: a job has a handful of audiences, and every change of a backfill asks about them.
    names = [audience_id] + ([slug] if slug else [])
    if include and not any(fnmatchcase(n, g) for n in names for g in include):
        return False
    return not any(fnmatchcase(n, g) for n in names for g in exclude)


def decide(policy: Policy, change: dict[str, Any], field_change: bool = False) -> Send | Skip:
    """Whether ``change`` goes to the destination, and with which identifier value."""
    if field_change:
        if not policy.field_changes:
            return Skip("filtered", f"{policy.destination} does not take field-change events")
    elif not audience_wanted(policy, str(change.get("audience_id", "")), change.get("audience_slug")):
        return Skip("filtered", f"audience not in the audience lists of {policy.destination}")
    value = identifier_of(change, policy.source)
    if value is None:
        return Skip(
            "unknown_identifier",
            f"{policy.destination} is sent the '{policy.source}' identifier and this change has none: "
            + export_field_hint(policy.source),
        )
    if policy.hash == "sha256":
        value = [sha256_hex(v) for v in value] if isinstance(value, list) else sha256_hex(value)
    return Send(value)
