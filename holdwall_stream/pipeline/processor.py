"""What the events agent does with a batch of messages: validate, dedupe, handle, park.

Effectively-once: an event id takes effect once because its ``processed_events`` row is
written in the same transaction that the batch's other database effects commit in, and
ids already there are skipped. A message that cannot be processed is sent to the DLQ
(and awaited) before the batch moves on, so the rest of its key keeps its order.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.db.models import ProcessedEvent
from holdwall_stream.messaging.dead_letter import DeadLetterInfo
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.pipeline.envelope import EventEnvelope, InvalidMessage, parse_envelope
from holdwall_stream.pipeline.handlers import Handler, HandlerRegistry, PermanentHandlerError
from holdwall_stream.resilience.backoff import backoff_delay
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class BatchOutcome:
    processed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    skipped_unknown: int = 0


async def record_processed(_envelope: EventEnvelope) -> None:
    """The default handler: its effect is the processed_events row every handled event gets."""


class EventProcessor:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        registry: HandlerRegistry,
        producer: KafkaProducer,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._registry = registry
        self._producer = producer
        self._metrics = metrics
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    async def process(self, messages: Sequence[IncomingMessage]) -> BatchOutcome:
        outcome = BatchOutcome()
        valid: list[tuple[IncomingMessage, EventEnvelope]] = []
        for message in messages:
            try:
                envelope = parse_envelope(
                    message.value, key=message.key, max_bytes=self._settings.kafka_max_message_bytes
                )
            except InvalidMessage as exc:
                await self._dead_letter(message, exc.reason, "InvalidMessage", exc.detail, None, 1)
                outcome.dead_lettered += 1
                continue
            valid.append((message, envelope))
        if not valid:
            return outcome
        done = await self._already_processed([envelope.id for _, envelope in valid])
        handled: dict[uuid.UUID, str] = {}
        for message, envelope in valid:
            if envelope.id in done or envelope.id in handled:
                outcome.duplicates += 1
                self._metrics.events_duplicate.inc()
                continue
            handler = self._handler_for(envelope.type)
            if handler is None:
                self._metrics.events_unknown_type.inc()
                if self._settings.pipeline_unknown_type == "dlq":
                    await self._dead_letter(
                        message,
                        "unknown_type",
                        "UnknownEventType",
                        f"no handler registered for event type {envelope.type!r}",
                        envelope.id,
                        1,
                    )
                    outcome.dead_lettered += 1
                else:
                    outcome.skipped_unknown += 1
                    handled[envelope.id] = envelope.type
                continue
            if await self._run_handler(handler, message, envelope):
                handled[envelope.id] = envelope.type
                outcome.processed += 1
                self._metrics.events_processed.labels(type=envelope.type).inc()
            else:
                outcome.dead_lettered += 1
        await self._mark_processed(handled)
        return outcome

    def _handler_for(self, event_type: str) -> Handler | None:
        handler = self._registry.get(event_type)
        if handler is None and not self._registry.types():
            return record_processed
        return handler

    async def _run_handler(
        self, handler: Handler, message: IncomingMessage, envelope: EventEnvelope
    ) -> bool:
        """True once the handler succeeded; False after it was dead-lettered."""
        first_failure: datetime | None = None
        max_attempts = self._settings.pipeline_max_attempts
        for attempt in range(1, max_attempts + 1):
            try:
                await handler(envelope)
                return True
            except Exception as exc:
                first_failure = first_failure or datetime.now(UTC)
                permanent = isinstance(exc, PermanentHandlerError)
                if permanent or attempt == max_attempts:
                    await self._dead_letter(
                        message,
                        "handler_failed",
                        type(exc).__name__,
                        str(exc),
                        envelope.id,
                        attempt,
                        first_failure,
                    )
                    return False
                self._metrics.events_retried.inc()
                delay = backoff_delay(
                    attempt,
                    self._settings.pipeline_retry_backoff_ms / 1000,
                    self._settings.pipeline_retry_backoff_ms * 50 / 1000,
                )
                log.warning(
                    "Handler for %s failed on event %s (attempt %d/%d), retrying in %.2fs: %r",
                    envelope.type,
                    envelope.id,
                    attempt,
                    max_attempts,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
        return False

    async def _already_processed(self, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        async with self._engine.connect() as connection:
            result = await connection.execute(
                select(ProcessedEvent.event_id).where(ProcessedEvent.event_id.in_(ids))
            )
            return set(result.scalars())

    async def _mark_processed(self, handled: dict[uuid.UUID, str]) -> None:
        if not handled:
            return
        async with self._engine.begin() as connection:
            await connection.execute(
                self._insert(ProcessedEvent).on_conflict_do_nothing(index_elements=["event_id"]),
                [{"event_id": event_id, "type": kind} for event_id, kind in handled.items()],
            )

    async def _dead_letter(
        self,
        message: IncomingMessage,
        reason: str,
        error_type: str,
        error_message: str,
        event_id: uuid.UUID | None,
        attempts: int,
        first_failure_at: datetime | None = None,
    ) -> None:
        now = datetime.now(UTC)
        info = DeadLetterInfo(
            source="pipeline",
            reason=reason,
            error_type=error_type,
            error_message=error_message,
            attempts=attempts,
            first_failure_at=first_failure_at or now,
            last_failure_at=now,
            event_id=str(event_id) if event_id else None,
            original_topic=message.topic,
            original_partition=message.partition,
            original_offset=message.offset,
        )
        headers = [(n, v) for n, v in message.headers if not n.startswith("dlq-")]
        await self._producer.send(
            self._settings.kafka_dlq_topic,
            message.value,
            key=message.key,
            headers=headers + info.headers(),
        )
        self._metrics.dlq_sent.labels(reason=reason).inc()
        log.warning(
            "Dead-lettered %s[%d]@%d (%s): %s",
            message.topic,
            message.partition,
            message.offset,
            reason,
            error_message[:300],
        )
