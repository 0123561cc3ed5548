"""Settings and a producer for a test that talks to the session's broker with topics of its
own."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.messaging.topics import ensure_topics
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.settings import Settings, load_settings


async def settings_with_own_topics(
    prefix: str, kafka_bootstrap: str, database_url: str, **overrides: Any
) -> Settings:
    """Kafka enabled, events and DLQ topics and a consumer group named ``prefix-...-<random>``
    (no test sees another's messages or offsets), the topics declared before use."""
    suffix = secrets.token_hex(4)
    settings = load_settings(
        kafka_enabled=True,
        kafka_brokers=kafka_bootstrap,
        database_url=database_url,
        kafka_events_topic=f"{prefix}-events-{suffix}",
        kafka_dlq_topic=f"{prefix}-dlq-{suffix}",
        kafka_group_id=f"{prefix}-{suffix}",
        **overrides,
    )
    await ensure_topics(settings)
    return settings


@asynccontextmanager
async def worker_producer(settings: Settings) -> AsyncIterator[KafkaProducer]:
    """The worker's producer (relay and dead letters) on ``settings``, stopped at the end."""
    producer = KafkaProducer(settings, Metrics())
    try:
        yield producer
    finally:
        await producer.stop()
