"""PipelineConsumer in-process against the real broker and databases: a batch whose
transaction fails is fetched again (getmany has moved past it, so the consumer must seek
back), and lag comes from committed offsets."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.pipeline.consumer import PipelineConsumer
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER, EventEnvelope, encode_envelope
from holdwall_stream.pipeline.handlers import HandlerRegistry
from holdwall_stream.pipeline.processor import EventProcessor
from holdwall_stream.settings import Settings
from tests.support.kafka import settings_with_own_topics
from tests.support.processes import wait_until_async


@pytest.fixture
async def settings(kafka_bootstrap: str, database_url: str) -> Settings:
    return await settings_with_own_topics(
        "cons", kafka_bootstrap, database_url, kafka_session_timeout=6000
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    await init_schema(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def pipeline(settings: Settings, engine: AsyncEngine) -> AsyncIterator[PipelineConsumer]:
    metrics = Metrics()
    producer = KafkaProducer(settings, metrics)
    processor = EventProcessor(settings, engine, HandlerRegistry(), producer, metrics)
    consumer = PipelineConsumer(settings, processor, metrics)
    try:
        yield consumer
    finally:
        await consumer.stop()
        await producer.stop()


async def produce(settings: Settings, count: int) -> list[str]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    ids = []
    try:
        for i in range(count):
            env = EventEnvelope(
                id=uuid.uuid4(),
                type="order.created",
                aggregate_id=f"order-{i % 17}",
                occurred_at=datetime.now(UTC),
                data={"seq": i},
            )
            ids.append(str(env.id))
            await producer.send(
                settings.kafka_events_topic,
                encode_envelope(env),
                key=env.aggregate_id.encode(),
                headers=[(EVENT_ID_HEADER, str(env.id).encode())],
            )
        await producer.flush()
    finally:
        await producer.stop()
    return ids


async def processed(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        result = await connection.execute(text("SELECT event_id FROM processed_events"))
        return {str(uuid.UUID(str(row[0]))) for row in result}


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_a_batch_whose_transaction_fails_is_redelivered_not_skipped(
    settings: Settings, engine: AsyncEngine, pipeline: PipelineConsumer
) -> None:
    ids = await produce(settings, 300)
    async with engine.begin() as connection:  # every claim fails until it is renamed back
        await connection.execute(text("ALTER TABLE processed_events RENAME TO processed_away"))
    failures = _Failures()
    logger = logging.getLogger("holdwall_stream.pipeline.consumer")
    logger.addHandler(failures)
    try:
        await pipeline.start()
        await wait_until_async(
            lambda: failures.messages, timeout=30, message="a failed pipeline batch"
        )
    finally:
        logger.removeHandler(failures)
    # The consumer has fetched past the failed batch; later batches must not commit over it.
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE processed_away RENAME TO processed_events"))
    more = await produce(settings, 50)

    async def all_there() -> bool:
        return await processed(engine) == set(ids + more)

    await wait_until_async(all_there, timeout=60, message="every event processed")
    assert pipeline.events_consumed >= 350

    async def all_committed() -> bool:
        # Tansu's end offset can trail the true end, so count committed offsets instead.
        samples = await pipeline.lag()
        return sum(s.committed_offset for s in samples) == 350

    await wait_until_async(all_committed, timeout=30, message="every offset committed")
    samples = await pipeline.lag()
    assert len(samples) == settings.kafka_partitions
    assert all(s.lag >= 0 for s in samples)
    assert sorted(pipeline.assigned_partitions()) == list(range(settings.kafka_partitions))


async def test_stop_waits_for_the_batch_in_flight_and_commits_it(
    settings: Settings, engine: AsyncEngine, pipeline: PipelineConsumer
) -> None:
    ids = await produce(settings, 200)
    await pipeline.start()
    await wait_until_async(lambda: pipeline.events_consumed > 0, timeout=30)
    await pipeline.stop()
    done = await processed(engine)
    assert done <= set(ids)
    assert len(done) == pipeline.events_consumed  # committed effects == consumed, no more


async def test_awaits_its_assignment_until_the_group_hands_out_partitions(
    settings: Settings, pipeline: PipelineConsumer
) -> None:
    assert pipeline.awaiting_assignment  # health reports "joining" meanwhile
    await pipeline.start()
    await wait_until_async(
        lambda: not pipeline.awaiting_assignment, timeout=30, message="partitions assigned"
    )
    assert sorted(pipeline.assigned_partitions()) == list(range(settings.kafka_partitions))
