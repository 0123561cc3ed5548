"""The relay's producer against the real broker: record batches within the broker's limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.settings import Settings
from tests.support.kafka import settings_with_own_topics, worker_producer

LIMIT = 4096


@pytest.fixture
async def settings(kafka_bootstrap: str, sqlite_database_url: str) -> Settings:
    return await settings_with_own_topics(
        "producer", kafka_bootstrap, sqlite_database_url, kafka_max_message_bytes=LIMIT
    )


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[KafkaProducer]:
    async with worker_producer(settings) as producer:
        yield producer


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
