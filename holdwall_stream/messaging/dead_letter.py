"""The headers every dead-letter message carries, wherever it was dead-lettered from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import get_args

from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER, InvalidReason

DLQ_REASON = "dlq-reason"
DLQ_ERROR_TYPE = "dlq-error-type"
DLQ_ERROR_MESSAGE = "dlq-error-message"
DLQ_ORIGINAL_TOPIC = "dlq-original-topic"
DLQ_ORIGINAL_PARTITION = "dlq-original-partition"
DLQ_ORIGINAL_OFFSET = "dlq-original-offset"
DLQ_ATTEMPTS = "dlq-attempts"
DLQ_FIRST_FAILURE = "dlq-first-failure-at"
DLQ_LAST_FAILURE = "dlq-last-failure-at"
DLQ_SOURCE = "dlq-source"
MAX_ERROR_MESSAGE_CHARS = 2000
# Every dlq-reason there is: why a message is not a valid event (too_large also for an
# outbox row larger than the broker accepts), an event of a type with no handler, and one
# whose handler failed on every attempt.
DEAD_LETTER_REASONS: tuple[str, ...] = (*get_args(InvalidReason), "unknown_type", "handler_failed")


@dataclass(frozen=True)
class DeadLetterInfo:
    """Why and where a message failed; becomes the DLQ message's headers."""

    source: str  # "pipeline" or "outbox"
    reason: str
    error_type: str
    error_message: str
    attempts: int
    first_failure_at: datetime
    last_failure_at: datetime
    event_id: str | None = None
    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        values: dict[str, object | None] = {
            DLQ_SOURCE: self.source,
            DLQ_REASON: self.reason,
            DLQ_ERROR_TYPE: self.error_type,
            DLQ_ERROR_MESSAGE: self.error_message[:MAX_ERROR_MESSAGE_CHARS],
            DLQ_ATTEMPTS: self.attempts,
            DLQ_FIRST_FAILURE: self.first_failure_at.isoformat(),
            DLQ_LAST_FAILURE: self.last_failure_at.isoformat(),
            EVENT_ID_HEADER: self.event_id,
            DLQ_ORIGINAL_TOPIC: self.original_topic,
            DLQ_ORIGINAL_PARTITION: self.original_partition,
            DLQ_ORIGINAL_OFFSET: self.original_offset,
        }
        return [(name, str(value).encode()) for name, value in values.items() if value is not None]


def decode_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka headers as text; undecodable bytes are replaced, never fatal."""
    return {name: value.decode("utf-8", "replace") for name, value in headers or [] if value}
