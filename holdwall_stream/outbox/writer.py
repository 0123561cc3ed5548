"""The transactional outbox: store events and their outbox rows in the caller's transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from aiokafka.partitioner import murmur2
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from holdwall_stream.db.models import Event, Outbox
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER, EventEnvelope, encode_envelope

OUTBOX_CHANNEL = "holdwall_outbox"
EVENT_TYPE_HEADER = "event-type"


class NewEvent(BaseModel):
    """An event as an application submits it; id and occurred_at are filled in when absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Annotated[str, Field(min_length=1, max_length=200)]
    aggregate_id: Annotated[str, Field(min_length=1, max_length=500)]
    data: dict[str, Any]
    id: uuid.UUID | None = None
    occurred_at: AwareDatetime | None = None
    schema_version: Annotated[int, Field(ge=1)] = 1


@dataclass(frozen=True)
class OutboxTarget:
    """Where relayed events go; partitions must equal the events topic's partition count."""

    topic: str
    partitions: int


@dataclass(frozen=True)
class StoredEvents:
    ids: list[uuid.UUID]
    duplicates: list[uuid.UUID]


def partition_for_key(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), so a key lands where any Kafka client puts it."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def to_envelope(event: NewEvent) -> EventEnvelope:
    return EventEnvelope(
        id=event.id or uuid.uuid4(),
        type=event.type,
        aggregate_id=event.aggregate_id,
        occurred_at=event.occurred_at or datetime.now(UTC),
        schema_version=event.schema_version,
        data=event.data,
    )


async def store_events(
    session: AsyncSession, events: Sequence[NewEvent], target: OutboxTarget
) -> StoredEvents:
    """Adds the events and their outbox rows to the session's open transaction.

    The caller commits (or rolls back) both together. An event whose id is already stored
    is not stored again and gets no second outbox row; it is reported as a duplicate.
    """
    envelopes = [to_envelope(event) for event in events]
    if not envelopes:
        return StoredEvents(ids=[], duplicates=[])
    unique = _first_of_each_id(envelopes)
    dialect = session.bind.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    event_rows = [
        {
            "id": envelope.id,
            "type": envelope.type,
            "aggregate_id": envelope.aggregate_id,
            # UTC, as every other timestamp: SQLite keeps no offset, only the wall time.
            "occurred_at": envelope.occurred_at.astimezone(UTC),
            "schema_version": envelope.schema_version,
            "data": envelope.data,
        }
        for envelope in unique
    ]
    inserted = set(
        (
            await session.execute(
                insert(Event).on_conflict_do_nothing(index_elements=["id"]).returning(Event.id),
                event_rows,
            )
        ).scalars()
    )
    fresh = [envelope for envelope in unique if envelope.id in inserted]
    if fresh:
        outbox_rows = [_outbox_row(envelope, target) for envelope in fresh]
        await session.execute(
            insert(Outbox).on_conflict_do_nothing(index_elements=["event_id"]), outbox_rows
        )
        if dialect == "postgresql":
            # Delivered at commit; the payload names the partitions, so the relay wakes
            # only those (an empty payload would wake them all).
            partitions = ",".join(str(p) for p in sorted({row["partition"] for row in outbox_rows}))
            await session.execute(
                text("SELECT pg_notify(:channel, :partitions)"),
                {"channel": OUTBOX_CHANNEL, "partitions": partitions},
            )
    ids = [envelope.id for envelope in envelopes]
    # Each id stored now counts once; any other occurrence (already stored, or repeated
    # within this batch) was not stored and is a duplicate.
    stored_now = {envelope.id for envelope in fresh}
    duplicates = []
    for event_id in ids:
        if event_id in stored_now:
            stored_now.discard(event_id)
        else:
            duplicates.append(event_id)
    return StoredEvents(ids=ids, duplicates=duplicates)


def _first_of_each_id(envelopes: list[EventEnvelope]) -> list[EventEnvelope]:
    seen: dict[uuid.UUID, EventEnvelope] = {}
    for envelope in envelopes:
        seen.setdefault(envelope.id, envelope)
    return list(seen.values())


def _outbox_row(envelope: EventEnvelope, target: OutboxTarget) -> dict[str, Any]:
    key = envelope.aggregate_id.encode()
    return {
        "event_id": envelope.id,
        "topic": target.topic,
        "partition": partition_for_key(key, target.partitions),
        "key": key,
        "payload": encode_envelope(envelope),
        "headers": {EVENT_ID_HEADER: str(envelope.id), EVENT_TYPE_HEADER: envelope.type},
    }
