"""Outbox retention (OutboxRelay.prune) on real PostgreSQL and SQLite.

Published rows older than OUTBOX_RETENTION are deleted, in bounded batches; unpublished
rows, recently published rows, dead-lettered rows (whose payload the outbox keeps for the
operator) and the events table are never touched.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.messaging.topics import ensure_topics
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox import store
from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.writer import NewEvent, OutboxTarget, store_events
from holdwall_stream.resilience.breaker import CircuitBreaker
from holdwall_stream.settings import Settings, load_settings
from tests.support.worker_env import consume_all, worker_env


def _settings(database_url: str, kafka_bootstrap: str = "127.0.0.1:9", **env: object) -> Settings:
    merged = {**worker_env(kafka_bootstrap, database_url), **env}
    return load_settings(**{name.lower(): value for name, value in merged.items()})


def _relay(
    settings: Settings, engine: AsyncEngine, producer: KafkaProducer | None = None
) -> OutboxRelay:
    metrics = Metrics()
    producer = producer or KafkaProducer(settings, metrics)
    return OutboxRelay(settings, engine, producer, CircuitBreaker(), metrics)


async def _store(engine: AsyncEngine, settings: Settings, count: int, key: str = "k") -> None:
    events = [
        NewEvent(type="retention.test", aggregate_id=f"{key}-{i % 3}", data={"n": i})
        for i in range(count)
    ]
    target = OutboxTarget(settings.kafka_events_topic, settings.kafka_partitions)
    async with AsyncSession(engine) as session, session.begin():
        await store_events(session, events, target)


async def _set_rows(engine: AsyncEngine, ids: list[int], **values: object) -> None:
    """Sets columns of outbox rows, binding timestamps with the model's own type."""
    from holdwall_stream.db.models import Outbox

    async with AsyncSession(engine) as session, session.begin():
        for row_id in ids:
            row = await session.get(Outbox, row_id)
            assert row is not None
            for name, value in values.items():
                setattr(row, name, value)


async def _ids(engine: AsyncEngine, where: str = "1 = 1") -> list[int]:
    async with engine.connect() as connection:
        rows = await connection.execute(text(f"SELECT id FROM outbox WHERE {where} ORDER BY id"))
        return [int(r[0]) for r in rows]


async def _count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


async def test_prune_deletes_only_published_rows_older_than_the_retention(
    engine: AsyncEngine, database_url: str
) -> None:
    settings = _settings(database_url, OUTBOX_RETENTION="1h", OUTBOX_RETENTION_BATCH=2)
    await _store(engine, settings, 9)
    ids = await _ids(engine)
    now = datetime.now(UTC)
    old, recent, unpublished, dead = ids[:5], ids[5:7], ids[7:8], ids[8:]
    await _set_rows(engine, old, published=True, published_at=now - timedelta(hours=2))
    await _set_rows(engine, recent, published=True, published_at=now - timedelta(minutes=59))
    await _set_rows(engine, dead, dead_lettered_at=now - timedelta(days=30), last_error="big")

    # Five old rows, batches of two: prune keeps going until a batch comes back short.
    deleted = await _relay(settings, engine).prune()

    assert deleted == 5
    assert await _ids(engine) == recent + unpublished + dead
    assert await _count(engine, "events") == 9, "retention never touches the events table"
    assert await _relay(settings, engine).prune() == 0


async def test_dead_lettered_rows_are_kept_with_their_payload(
    engine: AsyncEngine, database_url: str
) -> None:
    """A row the relay parks in the DLQ (without its payload) is not 'published': the outbox
    row is the only copy of what was too large, so retention must leave it alone."""
    settings = _settings(database_url, OUTBOX_RETENTION="1s")
    await _relay(settings, engine).prepare()  # the relay's partition lock rows
    await _store(engine, settings, 1)
    [row_id] = await _ids(engine)
    async with engine.connect() as connection:
        partition = int(
            await connection.scalar(text(f"SELECT partition FROM outbox WHERE id = {row_id}")) or 0
        )
    async with engine.connect() as connection, connection.begin():
        rows = await store.claim_batch(connection, partition, 10)
        assert store.row_ids(rows) == [row_id]
        await store.mark_dead_lettered(connection, row_id, "message of 2 MB exceeds the limit")
    await asyncio.sleep(1.2)

    assert await _relay(settings, engine).prune() == 0
    async with engine.connect() as connection:
        published, published_at, dead_at, payload = (
            await connection.execute(
                text(
                    "SELECT published, published_at, dead_lettered_at, payload "
                    f"FROM outbox WHERE id = {row_id}"
                )
            )
        ).one()
    assert not published and published_at is None
    assert dead_at is not None
    assert payload, "the payload stays in the outbox row"


async def test_rows_relayed_to_kafka_are_deleted_once_older_than_the_retention(
    engine: AsyncEngine, database_url: str, kafka_bootstrap: str
) -> None:
    """The whole path: the relay publishes (real broker), time passes, prune deletes."""
    settings = _settings(database_url, kafka_bootstrap, OUTBOX_RETENTION="1s")
    await ensure_topics(settings)
    producer = KafkaProducer(settings, Metrics())
    relay = _relay(settings, engine, producer)
    await relay.prepare()
    await _store(engine, settings, 12)
    try:
        async with asyncio.timeout(30):
            while await relay.drain(range(settings.kafka_partitions)) or await _ids(
                engine, "published = false"
            ):
                await asyncio.sleep(0.05)
        records = await consume_all(kafka_bootstrap, settings.kafka_events_topic, 12, timeout=30)
        assert len(records) == 12

        assert await relay.prune() == 0, "published just now: younger than the retention"
        await asyncio.sleep(1.2)
        assert await relay.prune() == 12
        assert await _ids(engine) == []
        assert await _count(engine, "events") == 12
    finally:
        await producer.stop()
