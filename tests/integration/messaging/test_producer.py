"""The relay's producer against the real broker: record batches within the broker's limit."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.messaging.topics import ensure_topics
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.settings import Settings, load_settings

LIMIT = 4096


@pytest.fixture
async def settings(kafka_bootstrap: str, sqlite_database_url: str) -> Settings:
    suffix = secrets.token_hex(4)
    settings = load_settings(
        kafka_enabled=True,
        kafka_brokers=kafka_bootstrap,
        database_url=sqlite_database_url,
        kafka_events_topic=f"producer-events-{suffix}",
        kafka_dlq_topic=f"producer-dlq-{suffix}",
        kafka_max_message_bytes=LIMIT,
    )
    await ensure_topics(settings)
    return settings


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[KafkaProducer]:
    producer = KafkaProducer(settings, Metrics())
    try:
        yield producer
    finally:
        await producer.stop()


async def test_a_full_record_batch_stays_within_kafka_max_message_bytes(
    settings: Settings, producer: KafkaProducer
) -> None:
    """Kafka's message.max.bytes limits the whole batch: one filled past it is refused."""
    aiokafka_producer = await producer.get()
    batch = aiokafka_producer.create_batch()
    appended = 0
    while batch.append(key=b"k", value=b"v" * 300, timestamp=None, headers=[]) is not None:
        appended += 1
    batch.close()

    assert appended > 1
    assert len(batch._build()) <= LIMIT
    sent = await aiokafka_producer.send_batch(batch, settings.kafka_events_topic, partition=0)
    assert (await sent).offset >= 0
