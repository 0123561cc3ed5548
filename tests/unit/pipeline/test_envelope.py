"""Envelope: wire format, round trip, every rejection reason, and no other exception ever."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from holdwall_stream.errors import HoldwallError
from holdwall_stream.pipeline.envelope import (
    EVENT_ID_HEADER,
    EventEnvelope,
    InvalidMessage,
    encode_envelope,
    parse_envelope,
)

MAX = 1_000_000
REASONS = {"too_large", "not_utf8", "not_json", "not_object", "invalid_envelope", "key_mismatch"}
EVENT_ID = UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
WHEN = datetime(2024, 5, 1, 12, 30, 15, 250_000, tzinfo=UTC)


def envelope(**overrides: Any) -> EventEnvelope:
    fields: dict[str, Any] = {
        "id": EVENT_ID,
        "type": "order.created",
        "aggregate_id": "order-42",
        "occurred_at": WHEN,
        "data": {"total": 12.5, "items": [{"sku": "a", "qty": 2}], "note": "grüße ✓"},
    }
    fields.update(overrides)
    return EventEnvelope(**fields)


def valid_object(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": str(EVENT_ID),
        "type": "order.created",
        "aggregate_id": "order-42",
        "occurred_at": "2024-05-01T12:30:15+02:00",
        "schema_version": 1,
        "data": {},
    }
    obj.update(overrides)
    return obj


def raw_of(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def reject(raw: bytes | None, key: bytes | None = None, max_bytes: int = MAX) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        parse_envelope(raw, key=key, max_bytes=max_bytes)
    assert caught.value.reason in REASONS
    assert str(caught.value) == f"{caught.value.reason}: {caught.value.detail}"
    return caught.value


# --- encoding ---


def test_encoding_is_compact_ordered_utf8_with_offset() -> None:
    assert encode_envelope(envelope()) == (
        b'{"id":"0f8fad5b-d9cb-469f-a165-70867728950e","type":"order.created",'
        b'"aggregate_id":"order-42","occurred_at":"2024-05-01T12:30:15.250000+00:00",'
        b'"schema_version":1,"data":{"total":12.5,"items":[{"sku":"a","qty":2}],'
        b'"note":"gr\xc3\xbc\xc3\x9fe \xe2\x9c\x93"}}'
    )


def test_encoding_keeps_the_producers_offset() -> None:
    plus_two = timezone(timedelta(hours=2))
    encoded = json.loads(encode_envelope(envelope(occurred_at=WHEN.astimezone(plus_two))))
    assert encoded["occurred_at"] == "2024-05-01T14:30:15.250000+02:00"


def test_sub_minute_offset_is_encoded_as_utc_not_truncated() -> None:
    odd = timezone(timedelta(minutes=19, seconds=32))  # e.g. Amsterdam LMT
    env = envelope(occurred_at=WHEN.astimezone(odd))
    encoded = json.loads(encode_envelope(env))
    assert encoded["occurred_at"] == "2024-05-01T12:30:15.250000+00:00"
    assert parse_envelope(encode_envelope(env), max_bytes=MAX).occurred_at == WHEN


def test_round_trip_with_key() -> None:
    env = envelope()
    assert parse_envelope(encode_envelope(env), key=b"order-42", max_bytes=MAX) == env


def test_header_name() -> None:
    assert EVENT_ID_HEADER == "event-id"


# --- the model ---


def test_schema_version_defaults_to_one() -> None:
    assert envelope().schema_version == 1
    obj = valid_object()
    del obj["schema_version"]
    assert parse_envelope(raw_of(obj), max_bytes=MAX).schema_version == 1


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        envelope(occurred_at=datetime(2024, 5, 1, 12, 0))


def test_envelope_is_immutable() -> None:
    with pytest.raises(ValidationError):
        envelope().type = "other"  # type: ignore[misc]


def test_invalid_message_is_a_holdwall_error() -> None:
    assert issubclass(InvalidMessage, HoldwallError)


# --- rejections, one per reason ---


@pytest.mark.parametrize("raw", [None, b""])
def test_missing_value(raw: bytes | None) -> None:
    error = reject(raw)
    assert error.reason == "not_json"
    assert "empty" in error.detail


def test_too_large_is_checked_before_parsing() -> None:
    raw = encode_envelope(envelope())
    assert parse_envelope(raw, max_bytes=len(raw))
    error = reject(raw, max_bytes=len(raw) - 1)
    assert error.reason == "too_large"
    assert str(len(raw)) in error.detail


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b'{"type":"\xc3"}', b"\x80"])
def test_not_utf8(raw: bytes) -> None:
    assert reject(raw).reason == "not_utf8"


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b'{"a":1,}', b"\xef\xbb\xbf{}", b'{"a":"\\ud800"}', b"[" * 5000]
)
def test_not_json(raw: bytes) -> None:
    error = reject(raw)
    assert error.reason == "not_json"
    assert error.detail.startswith("message value is not JSON")


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"[1, 2]", "an array"),
        (b'"x"', "a string"),
        (b"42", "a number"),
        (b"1.5", "a number"),
        (b"true", "a boolean"),
        (b"null", "null"),
    ],
)
def test_not_object(raw: bytes, kind: str) -> None:
    error = reject(raw)
    assert error.reason == "not_object"
    assert kind in error.detail


@pytest.mark.parametrize(
    ("obj", "fields"),
    [
        (valid_object(id="not-a-uuid"), ["id"]),
        (valid_object(type=""), ["type"]),
        (valid_object(type="t" * 201), ["type"]),
        (valid_object(aggregate_id=""), ["aggregate_id"]),
        (valid_object(aggregate_id="a" * 501), ["aggregate_id"]),
        (valid_object(aggregate_id=42), ["aggregate_id"]),
        (valid_object(occurred_at="2024-05-01T12:30:15"), ["occurred_at"]),
        (valid_object(occurred_at="yesterday"), ["occurred_at"]),
        (valid_object(schema_version=0), ["schema_version"]),
        (valid_object(schema_version="1"), ["schema_version"]),
        (valid_object(schema_version=True), ["schema_version"]),
        (valid_object(data=[1, 2]), ["data"]),
        (valid_object(extra="x"), ["extra"]),
        (valid_object(id=None, type=None), ["id", "type"]),
        ({"data": {}}, ["id", "type", "aggregate_id", "occurred_at"]),
    ],
)
def test_invalid_envelope_names_the_fields(obj: dict[str, Any], fields: list[str]) -> None:
    error = reject(raw_of(obj))
    assert error.reason == "invalid_envelope"
    for field in fields:
        assert f"{field}:" in error.detail


def test_invalid_envelope_detail_is_bounded() -> None:
    obj = {f"unexpected_{'x' * 500}_{n}": n for n in range(50)}
    error = reject(raw_of(obj))
    assert error.reason == "invalid_envelope"
    assert len(error.detail) <= 1000
    assert "more" in error.detail


@pytest.mark.parametrize("key", [b"order-43", b"", b"\xff"])
def test_key_mismatch(key: bytes) -> None:
    error = reject(encode_envelope(envelope()), key=key)
    assert error.reason == "key_mismatch"
    assert "order-42" in error.detail


def test_key_is_compared_as_utf8() -> None:
    env = envelope(aggregate_id="kunde-ä")
    assert parse_envelope(encode_envelope(env), key="kunde-ä".encode(), max_bytes=MAX) == env


# --- properties ---

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
offsets = st.integers(min_value=-23 * 3600, max_value=23 * 3600).map(
    lambda s: timezone(timedelta(seconds=s))
)
envelopes = st.builds(
    EventEnvelope,
    id=st.uuids(),
    type=st.text(min_size=1, max_size=200),
    aggregate_id=st.text(min_size=1, max_size=500),
    occurred_at=st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets
    ),
    schema_version=st.integers(min_value=1, max_value=2**31),
    data=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


@given(envelopes)
def test_round_trip(env: EventEnvelope) -> None:
    raw = encode_envelope(env)
    parsed = parse_envelope(raw, key=env.aggregate_id.encode(), max_bytes=len(raw))
    assert parsed == env
    assert encode_envelope(parsed) == raw


@given(raw=st.binary(max_size=300), key=st.none() | st.binary(max_size=20))
def test_arbitrary_bytes_only_ever_raise_invalid_message(raw: bytes, key: bytes | None) -> None:
    try:
        parse_envelope(raw, key=key, max_bytes=200)
    except InvalidMessage as error:
        assert error.reason in REASONS
        assert error.detail


@given(json_values)
def test_arbitrary_json_only_ever_raises_invalid_message(value: Any) -> None:
    raw = json.dumps(value).encode()
    with pytest.raises(InvalidMessage) as caught:
        parse_envelope(raw, max_bytes=MAX)
    expected = "not_object" if not isinstance(value, dict) else "invalid_envelope"
    assert caught.value.reason == expected


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values | st.uuids().map(str),
            "type": json_values,
            "aggregate_id": json_values,
            "occurred_at": json_values | st.datetimes().map(datetime.isoformat),
            "schema_version": json_values,
            "data": json_values,
        },
    ),
    st.none() | st.binary(max_size=10),
)
def test_envelope_shaped_json_only_ever_raises_invalid_message(
    obj: dict[str, Any], key: bytes | None
) -> None:
    raw = json.dumps(obj).encode()
    try:
        env = parse_envelope(raw, key=key, max_bytes=MAX)
    except InvalidMessage as error:
        assert error.reason in {"invalid_envelope", "key_mismatch"}
    else:
        assert key is None or key == env.aggregate_id.encode()
