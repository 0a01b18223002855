"""Pure parts of the foundation and the ingress: settings, credentials, body validation."""

from __future__ import annotations

import string

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from audience_relay.auth import Authenticator
from audience_relay.settings import Settings
from ingress.validation import body_problem


def test_settings_defaults_match_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "RELAY_TOPIC_PREFIX", "RELAY_INGRESS_PORT", "RELAY_MATCH_FIELD"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert s.topic_prefix == "lytics"
    assert (s.ingress_host, s.ingress_port) == ("0.0.0.0", 8080)
    assert s.match_field == "email"
    assert s.ingress_api_keys == []


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("RELAY_TOPIC_PREFIX", "acme")
    monkeypatch.setenv("RELAY_INGRESS_API_KEYS", " new-key , old-key,")
    monkeypatch.setenv("RELAY_OAUTH_CLIENTS", "lytics:secret-1,other:secret-2")
    monkeypatch.setenv("RELAY_SOURCES", '{"crm": {"api_keys": ["crm-key"]}}')
    monkeypatch.setenv("RELAY_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("RELAY_PARTITIONS", "12")
    monkeypatch.setenv("RELAY_MATCH_FIELD", "user_id")
    s = Settings()
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert [k.get_secret_value() for k in s.ingress_api_keys] == ["new-key", "old-key"]
    assert {c: v.get_secret_value() for c, v in s.oauth_clients.items()} == {
        "lytics": "secret-1",
        "other": "secret-2",
    }
    assert s.sources["crm"].api_keys[0].get_secret_value() == "crm-key"
    assert (s.max_body_bytes, s.partitions, s.match_field, s.topic_prefix) == (2048, 12, "user_id", "acme")
    # Secrets never show in a printed settings object.
    assert "new-key" not in repr(s) and "secret-1" not in repr(s) and "crm-key" not in str(s)


@pytest.mark.parametrize(
    "var, value, fragment",
    [
        ("RELAY_PARTITIONS", "0", "RELAY_PARTITIONS"),
        ("RELAY_OAUTH_CLIENTS", "no-secret-here", "client_id:secret"),
        ("RELAY_SOURCES", "{not json", "JSON object"),
        ("RELAY_TOPIC_PREFIX", "bad prefix!", "RELAY_TOPIC_PREFIX"),
        ("RELAY_LOG_LEVEL", "LOUD", "RELAY_LOG_LEVEL"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert fragment in str(err.value)


def test_ingress_refuses_to_start_without_credentials() -> None:
    from ingress.app import run

    with pytest.raises(SystemExit, match="--insecure"):
        run(Settings.model_validate({"ingress_api_keys": []}))


def _auth(**values: object) -> Authenticator:
    return Authenticator(Settings.model_validate({"ingress_api_keys": ["k1", "k2"], **values}))


def test_tokens_expire_and_are_bound_to_their_source() -> None:
    auth = _auth(
        oauth_clients={"any": "s-any"},
        sources={"crm": {"oauth_clients": {"crm-client": "s-crm"}}},
        oauth_signing_key="sign",
    )
    token = auth.issue_token("any", "s-any", now=1000)
    assert token is not None
    assert auth.verify_token(token.access_token, "default", now=1000 + 3599)
    assert not auth.verify_token(token.access_token, "default", now=1000 + 3600)
    crm = auth.issue_token("crm-client", "s-crm")
    assert crm is not None
    assert auth.verify_token(crm.access_token, "crm")
    assert not auth.verify_token(crm.access_token, "default")
    assert auth.issue_token("any", "wrong") is None
    assert auth.issue_token("nobody", "s-any") is None
    # A token signed by another ingress (other key) is refused.
    other = _auth(oauth_clients={"any": "s-any"}, oauth_signing_key="other")
    foreign = other.issue_token("any", "s-any")
    assert foreign is not None and not auth.verify_token(foreign.access_token, "default")


def test_anonymous_only_with_insecure_and_no_credentials() -> None:
    open_auth = Authenticator(Settings.model_validate({"ingress_api_keys": []}), allow_anonymous=True)
    assert open_auth.authenticate("default", {}, {}) is not None
    keyed = Authenticator(Settings.model_validate({"ingress_api_keys": ["k"]}), allow_anonymous=True)
    assert keyed.authenticate("default", {}, {}) is None


json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_any_json_object_is_accepted(obj: dict[str, object]) -> None:
    assert body_problem(orjson.dumps(obj)) is None


@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=5))
def test_any_array_of_objects_is_accepted(batch: list[dict[str, object]]) -> None:
    assert body_problem(orjson.dumps(batch)) is None


@given(json_scalars)
def test_scalars_are_refused(value: object) -> None:
    problem = body_problem(orjson.dumps(value))
    assert problem is not None and "expected an object or an array of objects" in problem


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    problem = body_problem(data)
    assert problem is None or isinstance(problem, str)


@given(
    st.text(alphabet=string.printable, min_size=1, max_size=30).filter(lambda t: t.strip()[:1] not in "{[")
)
def test_text_that_is_not_an_object_or_array_is_refused(text: str) -> None:
    assert body_problem(text.encode()) is not None


# --- the connection guard's head meter (ingress/guard.py) --------------------------------------------


@given(
    lines=st.lists(st.text(alphabet=string.ascii_letters + ": /-", min_size=1, max_size=40), max_size=8),
    leading=st.integers(0, 3),
    body=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_the_head_meter_finds_the_end_of_a_head_however_it_is_cut(
    lines: list[str], leading: int, body: bytes, cuts: list[int]
) -> None:
    from ingress.guard import HeadMeter

    head = b"\r\n" * leading + b"GET / HTTP/1.1\r\n" + b"".join(f"{x}\r\n".encode() for x in lines) + b"\r\n"
    stream = head + body
    meter = HeadMeter(limit=10_000)
    offset = 0
    for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
        if cut <= offset:
            continue
        used = meter.feed(stream[offset:cut])
        if used is not None:
            assert offset + used == len(head)  # the body's first byte is not part of the head
            assert meter.size == len(head)
            return
        offset = cut
    raise AssertionError("the head's end was never found")


def test_a_head_over_the_limit_is_refused_and_leading_empty_lines_do_not_end_one() -> None:
    from ingress.guard import HeadMeter, HeadTooLarge

    meter = HeadMeter(limit=64)
    assert meter.feed(b"\r\n\r\n") is None  # empty lines before the request line end nothing
    assert meter.feed(b"GET / HTTP/1.1\r\nA: b\r\n") is None
    assert meter.feed(b"\r\nbody") == 2
    with pytest.raises(HeadTooLarge):
        HeadMeter(limit=64).feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 60)
