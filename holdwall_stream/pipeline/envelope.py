"""The message format on the events topic, and its strict, fast parser.

key = aggregate_id (UTF-8); value = compact JSON envelope; header ``event-id``.
Parsing sits on the hot path: the happy path is one ``model_validate_json`` call (Rust);
only a failure pays for working out the precise reason, which the DLQ records.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_serializer,
)

from holdwall_stream.errors import HoldwallError

EVENT_ID_HEADER = "event-id"

InvalidReason = Literal[
    "too_large", "not_utf8", "not_json", "not_object", "invalid_envelope", "key_mismatch"
]

_MAX_DETAIL_CHARS = 1000
_MAX_ERRORS_LISTED = 5
_MAX_LOC_CHARS = 80
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


EventType = Annotated[str, Field(min_length=1, max_length=200)]
# The message key, and the database's key of the aggregate.
AggregateId = Annotated[str, Field(min_length=1, max_length=500)]


class EventEnvelope(BaseModel):
    """One event as it travels through Kafka; unknown fields are rejected, not dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: UUID
    type: EventType
    aggregate_id: AggregateId
    occurred_at: AwareDatetime
    schema_version: StrictInt = Field(1, ge=1)
    data: dict[str, Any]

    @field_serializer("occurred_at", when_used="json")
    def _iso_with_offset(self, value: datetime) -> str:
        """``+00:00`` rather than ``Z``; a sub-minute offset (not ISO-8601) becomes UTC."""
        offset = value.utcoffset()
        if offset is not None and offset.total_seconds() % 60:
            value = value.astimezone(UTC)
        return value.isoformat()


class InvalidMessage(HoldwallError):
    """A consumed message is not a valid envelope; ``reason`` is machine-readable (DLQ
    header, metrics label) and ``detail`` names the offending field(s)."""

    def __init__(self, reason: InvalidReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: InvalidReason = reason
        self.detail = detail


def encode_envelope(env: EventEnvelope) -> bytes:
    """Compact UTF-8 JSON, keys in field order, ``occurred_at`` ISO-8601 with offset."""
    return env.model_dump_json().encode()


def parse_envelope(raw: bytes | None, *, key: bytes | None = None, max_bytes: int) -> EventEnvelope:
    """Validates a message value (and its key, when present) into an EventEnvelope.

    Raises InvalidMessage for anything else, and never any other exception.
    """
    if not raw:
        raise InvalidMessage("not_json", "message value is empty (null or zero bytes)")
    if len(raw) > max_bytes:
        raise InvalidMessage(
            "too_large", f"message value is {len(raw)} bytes, the limit is {max_bytes}"
        )
    try:
        env = EventEnvelope.model_validate_json(raw)
    except ValidationError as exc:
        raise _explain(raw, exc) from None
    if key is not None and key != env.aggregate_id.encode():
        raise InvalidMessage(
            "key_mismatch",
            f"message key {_clip(repr(key))} does not match "
            f"aggregate_id {_clip(repr(env.aggregate_id))}",
        )
    return env


def _explain(raw: bytes, exc: ValidationError) -> InvalidMessage:
    """Turns a validation failure into the precise reason and a readable detail."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return InvalidMessage("not_utf8", f"message value is not UTF-8 (byte {bad.start})")
        return InvalidMessage(
            "not_json", f"message value is not JSON: {first.get('ctx', {}).get('error', '')}"
        )
    if first["type"] == "model_type" and not first["loc"]:
        kind = _JSON_KINDS.get(type(first["input"]), "not an object")
        return InvalidMessage("not_object", f"message value is {kind}, expected a JSON object")
    problems = [f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:_MAX_ERRORS_LISTED]]
    if len(errors) > _MAX_ERRORS_LISTED:
        problems.append(f"and {len(errors) - _MAX_ERRORS_LISTED} more")
    return InvalidMessage("invalid_envelope", _clip("; ".join(problems), _MAX_DETAIL_CHARS))


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(_clip(str(part), _MAX_LOC_CHARS) for part in loc) or "value"


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
