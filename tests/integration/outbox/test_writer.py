"""store_events on real PostgreSQL and SQLite: in the caller's transaction, deduplicated,
and writing outbox rows exactly as the relay and any Kafka client expect them."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.models import Event, Outbox
from holdwall_stream.db.schema import init_schema
from holdwall_stream.outbox.writer import (
    EVENT_TYPE_HEADER,
    NewEvent,
    OutboxTarget,
    StoredEvents,
    store_events,
)
from holdwall_stream.pipeline.envelope import parse_envelope
from holdwall_stream.settings import load_settings

TARGET = OutboxTarget(topic="orders-events", partitions=3)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(load_settings(database_url=database_url))
    await init_schema(engine)
    async with engine.begin() as connection:  # the application's own business table
        await connection.execute(text("CREATE TABLE orders (id VARCHAR(50) PRIMARY KEY)"))
    try:
        yield engine
    finally:
        await engine.dispose()


def _count_committed(database_url: str, table: str) -> int:
    """Counts rows from an independent connection (another driver): only committed rows."""
    sql = f"SELECT count(*) FROM {table}"
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            return int(connection.execute(sql).fetchone()[0])
    with psycopg.connect(database_url, autocommit=True) as connection:
        row = connection.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


async def count_committed(database_url: str, table: str) -> int:
    return await asyncio.to_thread(_count_committed, database_url, table)


async def counts(database_url: str) -> tuple[int, int, int]:
    return (
        await count_committed(database_url, "orders"),
        await count_committed(database_url, "events"),
        await count_committed(database_url, "outbox"),
    )


async def store(engine: AsyncEngine, events: list[NewEvent]) -> StoredEvents:
    async with AsyncSession(engine) as session, session.begin():
        return await store_events(session, events, TARGET)


async def outbox_rows(engine: AsyncEngine) -> list[Outbox]:
    async with AsyncSession(engine) as session:
        return list((await session.scalars(select(Outbox).order_by(Outbox.id))).all())


async def event_rows(engine: AsyncEngine) -> dict[uuid.UUID, Event]:
    async with AsyncSession(engine) as session:
        return {event.id: event for event in (await session.scalars(select(Event))).all()}


def _event(aggregate_id: str = "order-42", **fields: object) -> NewEvent:
    return NewEvent.model_validate(
        {"type": "order.created", "aggregate_id": aggregate_id, "data": {"total": 99.5}, **fields}
    )


async def test_committed_together_with_the_callers_write(
    engine: AsyncEngine, database_url: str
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await session.execute(text("INSERT INTO orders (id) VALUES ('order-42')"))
        stored = await store_events(session, [_event()], TARGET)
        assert await counts(database_url) == (0, 0, 0), "visible before the caller committed"
    assert await counts(database_url) == (1, 1, 1)
    assert stored.duplicates == []
    [row] = await outbox_rows(engine)
    assert row.event_id == stored.ids[0]
    assert set(await event_rows(engine)) == set(stored.ids)


async def test_rollback_leaves_neither_event_nor_outbox_row(
    engine: AsyncEngine, database_url: str
) -> None:
    with pytest.raises(RuntimeError, match="business rule"):
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(text("INSERT INTO orders (id) VALUES ('order-42')"))
            stored = await store_events(session, [_event(), _event("order-43")], TARGET)
            assert len(stored.ids) == 2
            raise RuntimeError("business rule failed after the events were written")
    assert await counts(database_url) == (0, 0, 0)


async def test_batch_keeps_input_order(engine: AsyncEngine, database_url: str) -> None:
    events = [_event(f"order-{i % 7}", data={"n": i}) for i in range(40)]
    stored = await store(engine, events)
    assert len(stored.ids) == 40 and len(set(stored.ids)) == 40
    assert stored.duplicates == []
    assert await counts(database_url) == (0, 40, 40)
    # outbox ids follow the input order: that is the order the relay publishes per key
    assert [row.event_id for row in await outbox_rows(engine)] == stored.ids
    stored_events = await event_rows(engine)
    assert [stored_events[i].data for i in stored.ids] == [{"n": i} for i in range(40)]


async def test_empty_batch_stores_nothing(engine: AsyncEngine, database_url: str) -> None:
    assert await store(engine, []) == StoredEvents(ids=[], duplicates=[])
    assert await counts(database_url) == (0, 0, 0)


async def test_repeated_id_in_a_later_call_is_stored_once(
    engine: AsyncEngine, database_url: str
) -> None:
    event_id = uuid.uuid4()
    first = await store(engine, [_event(id=event_id, data={"v": 1})])
    assert first == StoredEvents(ids=[event_id], duplicates=[])

    again = await store(engine, [_event(id=event_id, data={"v": 2}), _event("order-43")])
    assert again.ids[0] == event_id
    assert again.duplicates == [event_id]
    assert await counts(database_url) == (0, 2, 2)
    assert (await event_rows(engine))[event_id].data == {"v": 1}, "the first write wins"
    assert [row.event_id for row in await outbox_rows(engine)].count(event_id) == 1


async def test_repeated_id_within_one_batch_is_stored_once(
    engine: AsyncEngine, database_url: str
) -> None:
    event_id = uuid.uuid4()
    stored = await store(
        engine,
        [_event(id=event_id, data={"v": 1}), _event(id=event_id, data={"v": 2}), _event("b")],
    )
    assert stored.ids[:2] == [event_id, event_id]
    assert stored.duplicates == [event_id], "the second occurrence was not stored"
    assert len(stored.ids) - len(stored.duplicates) == 2 == (await counts(database_url))[1]
    assert await counts(database_url) == (0, 2, 2)
    assert (await event_rows(engine))[event_id].data == {"v": 1}


async def test_outbox_row_is_what_kafka_clients_expect(engine: AsyncEngine) -> None:
    target = OutboxTarget(topic="orders-events", partitions=7)
    given_id = uuid.uuid4()
    occurred = datetime(2024, 5, 17, 10, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    aggregate_ids = ["order-42", "ordre-é-7", "客户-1", *(f"order-{i}" for i in range(30))]
    events = [
        _event(aggregate_ids[0], id=given_id, occurred_at=occurred, data={"total": 99.5}),
        *(_event(aggregate_id, data={"i": i}) for i, aggregate_id in enumerate(aggregate_ids[1:])),
    ]
    before = datetime.now(UTC)
    async with AsyncSession(engine) as session, session.begin():
        stored = await store_events(session, events, target)
    assert stored.ids[0] == given_id

    rows = await outbox_rows(engine)
    stored_events = await event_rows(engine)
    partitions = list(range(target.partitions))
    assert len({row.partition for row in rows}) > 1, "keys should spread over partitions"
    for event, event_id, row in zip(events, stored.ids, rows, strict=True):
        key = event.aggregate_id.encode("utf-8")
        assert row.event_id == event_id
        assert row.topic == "orders-events"
        assert row.key == key
        assert row.partition == DefaultPartitioner()(key, partitions, partitions)
        envelope = parse_envelope(row.payload, key=row.key, max_bytes=1_000_000)
        assert envelope.id == event_id
        assert envelope.type == "order.created"
        assert envelope.aggregate_id == event.aggregate_id
        assert envelope.data == event.data
        assert envelope.schema_version == 1
        if event.occurred_at is not None:
            assert envelope.occurred_at == event.occurred_at
            assert envelope.occurred_at.utcoffset() == timedelta(hours=2)
        else:
            assert before <= envelope.occurred_at <= datetime.now(UTC)
        # event-id travels from its own column; the JSON holds the other headers
        assert row.headers == {EVENT_TYPE_HEADER: event.type}
        assert row.published is False
        assert row.published_at is None
        assert row.attempts == 0
        assert row.last_error is None
        assert row.dead_lettered_at is None

        stored_event = stored_events[event_id]
        assert (stored_event.type, stored_event.aggregate_id) == (event.type, event.aggregate_id)
        assert stored_event.data == event.data
        # SQLite keeps no offset: the column holds UTC and reads back aware, in UTC.
        stored_at = stored_event.occurred_at
        assert stored_at.utcoffset() is not None
        assert stored_at == envelope.occurred_at, "events.occurred_at must keep the instant"


async def test_rows_are_stamped_below_the_second(engine: AsyncEngine) -> None:
    """created_at feeds the oldest-unpublished age and the relay delay: a default of whole
    seconds (SQLite's CURRENT_TIMESTAMP) put them up to a second off."""
    before = datetime.now(UTC)
    await store(engine, [_event()])
    after = datetime.now(UTC)
    (row,) = await outbox_rows(engine)
    (event,) = (await event_rows(engine)).values()
    for stamped in (row.created_at, event.created_at):
        # SQLite keeps milliseconds: the stamp may be up to 1 ms before ``before``.
        assert before - timedelta(milliseconds=1) <= stamped <= after, (before, stamped, after)
