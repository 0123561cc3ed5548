"""The dead_letters table: what the DLQ agent keeps, and what the dlq CLI lists and replays."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from holdwall_stream.db.models import DeadLetter
from holdwall_stream.errors import RequeueRefusedError
from holdwall_stream.messaging import dead_letter as headers_
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.outbox.requeue import requeue_parked_event
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER
from holdwall_stream.settings import Settings


@dataclass(frozen=True, slots=True)
class DlqMessage:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def _to_row(message: DlqMessage) -> dict[str, object]:
    headers = headers_.decode_headers(message.headers)
    topic = headers.get(headers_.DLQ_ORIGINAL_TOPIC)
    return {
        "event_id": _uuid_or_none(headers.get(EVENT_ID_HEADER)),
        "key": message.key,
        "raw": message.value,
        "reason": _text(headers.get(headers_.DLQ_REASON, "unknown"))[:100],
        "error": _text(headers.get(headers_.DLQ_ERROR_MESSAGE, "")),
        "headers": headers,
        "original_topic": _text(topic) if topic is not None else None,
        "original_partition": _int_or_none(headers.get(headers_.DLQ_ORIGINAL_PARTITION)),
        "original_offset": _int_or_none(headers.get(headers_.DLQ_ORIGINAL_OFFSET)),
        "attempts": _int_or_none(headers.get(headers_.DLQ_ATTEMPTS)) or 0,
        "dlq_partition": message.partition,
        "dlq_offset": message.offset,
    }


async def store_dead_letters(engine: AsyncEngine, messages: Sequence[DlqMessage]) -> int:
    """Keeps each DLQ message once, keyed by its DLQ position; redelivery is harmless."""
    if not messages:
        return 0
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    async with engine.begin() as connection:
        result = await connection.execute(
            insert(DeadLetter)
            .on_conflict_do_nothing(index_elements=["dlq_partition", "dlq_offset"])
            .returning(DeadLetter.id),
            [_to_row(message) for message in messages],
        )
        return len(result.all())


async def list_dead_letters(
    engine: AsyncEngine, *, limit: int = 50, include_replayed: bool = False
) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(DeadLetter.id).limit(limit)
    if not include_replayed:
        query = query.where(DeadLetter.replayed_at.is_(None))
    async with engine.connect() as connection:
        return [DeadLetter(**row._mapping) for row in await connection.execute(query)]


async def get_dead_letter(engine: AsyncEngine, dead_letter_id: int) -> DeadLetter | None:
    async with engine.connect() as connection:
        row = (
            await connection.execute(select(DeadLetter).where(DeadLetter.id == dead_letter_id))
        ).first()
    return DeadLetter(**row._mapping) if row else None


async def count_dead_letters(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(DeadLetter)) or 0)


@dataclass(frozen=True)
class ReplayOutcome:
    replayed: list[int]
    # Each id asked for but not replayed, with why, worded for the operator who asked.
    not_replayed: dict[int, str]


async def replay(
    engine: AsyncEngine, producer: KafkaProducer, settings: Settings, ids: Sequence[int]
) -> ReplayOutcome:
    """Re-sends dead letters to the events topic with their original key and event id.

    The pipeline dedupes by event id, so replaying twice does not process twice. A
    ``too_large`` letter of the relay kept no message: its outbox row, which kept the
    payload, goes back to the relay instead (outbox/requeue.py). An unknown id, or another
    letter that kept no message, is not replayed; the outcome says why and where the
    message can still be found.
    """
    replayed: list[int] = []
    not_replayed: dict[int, str] = {}
    for dead_letter_id in ids:
        letter = await get_dead_letter(engine, dead_letter_id)
        if letter is not None and _parked_in_outbox(letter):
            try:
                await _requeue_outbox_row(engine, producer, settings, letter)
            except RequeueRefusedError as exc:
                not_replayed[dead_letter_id] = (
                    f"dead letter {dead_letter_id} ({letter.reason}): {exc}"
                )
                continue
        elif letter is None or letter.raw is None:
            not_replayed[dead_letter_id] = _why_not_replayable(dead_letter_id, letter)
            continue
        else:
            await _resend(engine, producer, settings.kafka_events_topic, letter)
        replayed.append(dead_letter_id)
    return ReplayOutcome(replayed, not_replayed)


def _parked_in_outbox(letter: DeadLetter) -> bool:
    return (
        letter.reason == "too_large"
        and letter.event_id is not None
        and (letter.headers or {}).get(headers_.DLQ_SOURCE) == "outbox"
    )


async def _requeue_outbox_row(
    engine: AsyncEngine, producer: KafkaProducer, settings: Settings, letter: DeadLetter
) -> None:
    create_batch = (await producer.get()).create_batch
    async with engine.begin() as connection:
        await requeue_parked_event(
            connection, letter.event_id, create_batch, settings.kafka_max_message_bytes
        )
        await _mark_replayed(connection, letter.id)


async def _resend(
    engine: AsyncEngine, producer: KafkaProducer, events_topic: str, letter: DeadLetter
) -> None:
    kept = [
        (name, value.encode())
        for name, value in (letter.headers or {}).items()
        if not name.startswith("dlq-")
    ]
    kept.append(("dlq-replayed-from", str(letter.id).encode()))
    await producer.send(events_topic, letter.raw, key=letter.key, headers=kept)
    async with engine.begin() as connection:
        await _mark_replayed(connection, letter.id)


async def _mark_replayed(connection: AsyncConnection, dead_letter_id: int) -> None:
    await connection.execute(
        update(DeadLetter)
        .where(DeadLetter.id == dead_letter_id)
        .values(replayed_at=datetime.now(UTC))
    )


def _why_not_replayable(dead_letter_id: int, letter: DeadLetter | None) -> str:
    if letter is None:
        return f"dead letter {dead_letter_id}: no such id (see `dlq list`)"
    if letter.reason != "too_large" or letter.original_offset is None:
        return f"dead letter {dead_letter_id} ({letter.reason}): its message had no value to replay"
    return (
        f"dead letter {dead_letter_id} ({letter.reason}) kept no message to replay, as it was "
        f"larger than the topics accept: read it from {letter.original_topic} partition "
        f"{letter.original_partition} offset {letter.original_offset} while the topic still "
        "retains it"
    )


async def purge(engine: AsyncEngine, *, replayed_only: bool) -> int:
    statement = delete(DeadLetter)
    if replayed_only:
        statement = statement.where(DeadLetter.replayed_at.is_not(None))
    async with engine.begin() as connection:
        return int((await connection.execute(statement)).rowcount or 0)


def _text(value: str) -> str:
    """PostgreSQL text columns cannot hold NUL, which an error message quoting a bad
    message's field names can contain; one unstorable row would block the DLQ agent."""
    return value.replace("\x00", "\ufffd")


def _uuid_or_none(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
