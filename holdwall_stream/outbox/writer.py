"""The transactional outbox: store events and their outbox rows in the caller's transaction."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from aiokafka.partitioner import murmur2
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from holdwall_stream.db.engine import psycopg_connection
from holdwall_stream.db.models import Event, Outbox
from holdwall_stream.pipeline.envelope import (
    AggregateId,
    EventEnvelope,
    EventType,
    encode_envelope,
)

OUTBOX_CHANNEL = "holdwall_outbox"
EVENT_TYPE_HEADER = "event-type"
# Objects and arrays inside ``data``, at most. The pipeline's JSON parser stops at 200
# levels (a deeper envelope is dead-lettered as not_json) and the envelope's encoder at
# 255: an event nested deeper than either would be stored and never processed, or fail
# to store with an internal error.
MAX_DATA_DEPTH = 100
# The events table keeps it in an INTEGER column.
MAX_SCHEMA_VERSION = 2**31 - 1


def _without_nul(value: str) -> str:
    """The events table's text columns cannot hold NUL on PostgreSQL. (The pipeline takes
    such envelopes from other producers, and records the type with U+FFFD in its place.)"""
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000), which the events table cannot hold")
    return value


class NewEvent(BaseModel):
    """An event as an application submits it; id and occurred_at are filled in when absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Annotated[EventType, AfterValidator(_without_nul)]
    aggregate_id: Annotated[AggregateId, AfterValidator(_without_nul)]
    data: dict[str, Any]
    id: uuid.UUID | None = None
    occurred_at: AwareDatetime | None = None
    schema_version: Annotated[int, Field(ge=1, le=MAX_SCHEMA_VERSION)] = 1

    @field_validator("data")
    @classmethod
    def _storable(cls, data: dict[str, Any]) -> dict[str, Any]:
        if json_depth(data) > MAX_DATA_DEPTH:
            raise ValueError(f"nests deeper than {MAX_DATA_DEPTH} levels of objects and arrays")
        if any(isinstance(node, float) and not math.isfinite(node) for node, _ in _nodes(data)):
            # JSON has no such number: the envelope would carry null in its place.
            raise ValueError("holds a number out of range (larger than about 1.8e308)")
        return data


def json_depth(value: object) -> int:
    """Levels of objects and arrays in a JSON value ({} is 1, 1 is 0)."""
    return max(depth + isinstance(node, dict | list) for node, depth in _nodes(value))


def _nodes(value: object) -> Iterator[tuple[object, int]]:
    """Every value inside a JSON value, with how many containers enclose it; without
    recursion, so no depth can overflow the interpreter's stack."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


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
    Outbox ids follow the order of ``events``: the order the relay publishes per key.
    """
    envelopes = [to_envelope(event) for event in events]
    if not envelopes:
        return StoredEvents(ids=[], duplicates=[])
    unique = _first_of_each_id(envelopes)
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        stored_now = await _store_postgresql(connection, unique, target)
    else:
        stored_now = await _store_sqlite(session, unique, target)
    ids = [envelope.id for envelope in envelopes]
    # Each id stored now counts once; any other occurrence (already stored, or repeated
    # within this batch) was not stored and is a duplicate.
    duplicates = []
    for event_id in ids:
        if event_id in stored_now:
            stored_now.discard(event_id)
        else:
            duplicates.append(event_id)
    return StoredEvents(ids=ids, duplicates=duplicates)


# PostgreSQL: events, outbox rows and the relay's wake-up in one round trip, from arrays
# (a statement per row, or SQLAlchemy's per-row parameter processing, costs the writing
# application several times the CPU; binary parameters skip the text escaping of every
# array element). The outbox insert follows the input order
# (ORDER BY position), so ids, and with them the relay's order per key, follow it too.
# The NOTIFY is delivered at commit and names the partitions written, so the relay wakes
# only those.
_PG_STORE = f"""
    WITH new_events AS (
        INSERT INTO events (id, type, aggregate_id, occurred_at, schema_version, data)
        SELECT * FROM unnest(%(ids)b::uuid[], %(types)b::text[], %(aggregate_ids)b::text[],
                             %(occurred_at)b::timestamptz[], %(versions)b::int[],
                             %(data)b::json[])
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    ), new_outbox AS (
        INSERT INTO outbox (event_id, topic, partition, key, payload, headers)
        SELECT row.event_id, %(topic)s, row.partition, row.key, row.payload, row.headers
        FROM unnest(%(ids)b::uuid[], %(partitions)b::int[], %(keys)b::bytea[],
                    %(payloads)b::bytea[], %(headers)b::json[])
             WITH ORDINALITY AS row(event_id, partition, key, payload, headers, position)
        WHERE row.event_id IN (SELECT id FROM new_events)
        ORDER BY row.position
        ON CONFLICT (event_id) DO NOTHING
        RETURNING partition
    )
    SELECT (SELECT array_agg(id) FROM new_events),
           (SELECT pg_notify('{OUTBOX_CHANNEL}', string_agg(DISTINCT partition::text, ','))
            FROM new_outbox HAVING count(*) > 0)
    """


async def _store_postgresql(
    connection: AsyncConnection, envelopes: list[EventEnvelope], target: OutboxTarget
) -> set[uuid.UUID]:
    # The same outbox rows as on SQLite (one place decides key, partition, payload,
    # headers), passed as columns.
    outbox_rows = [_outbox_row(envelope, target) for envelope in envelopes]
    parameters = {
        "ids": [envelope.id for envelope in envelopes],
        "types": [envelope.type for envelope in envelopes],
        "aggregate_ids": [envelope.aggregate_id for envelope in envelopes],
        "occurred_at": [envelope.occurred_at for envelope in envelopes],
        "versions": [envelope.schema_version for envelope in envelopes],
        "data": [json.dumps(envelope.data) for envelope in envelopes],
        "topic": target.topic,
        "partitions": [row["partition"] for row in outbox_rows],
        "keys": [row["key"] for row in outbox_rows],
        "payloads": [row["payload"] for row in outbox_rows],
        "headers": [json.dumps(row["headers"]) for row in outbox_rows],
    }
    driver = await psycopg_connection(connection)
    async with driver.cursor() as cursor:
        await cursor.execute(_PG_STORE, parameters)
        row = await cursor.fetchone()
    assert row is not None  # an aggregate query always returns its one row
    return set(row[0] or ())


async def _store_sqlite(
    session: AsyncSession, envelopes: list[EventEnvelope], target: OutboxTarget
) -> set[uuid.UUID]:
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
        for envelope in envelopes
    ]
    inserted = set(
        (
            await session.execute(
                insert(Event).on_conflict_do_nothing(index_elements=["id"]).returning(Event.id),
                event_rows,
            )
        ).scalars()
    )
    fresh = [envelope for envelope in envelopes if envelope.id in inserted]
    if fresh:
        await session.execute(
            insert(Outbox).on_conflict_do_nothing(index_elements=["event_id"]),
            [_outbox_row(envelope, target) for envelope in fresh],
        )
    return {envelope.id for envelope in fresh}


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
        "headers": _headers(envelope),
    }


def _headers(envelope: EventEnvelope) -> dict[str, str]:
    """Kafka headers besides ``event-id``, which the relay takes from the event_id column
    (so the relay parses each distinct header set once, not every row's)."""
    return {EVENT_TYPE_HEADER: envelope.type}
