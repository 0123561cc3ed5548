"""Declaring the events and DLQ topics with KAFKA_PARTITIONS before anything touches them.

A broker with topic auto-creation (Tansu, or Kafka with auto.create.topics.enable) would
otherwise create them with its own default partition count on the first metadata request,
and the outbox's partition assignment (fixed at write time) would no longer match.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from holdwall_stream.errors import TopicMismatchError
from holdwall_stream.messaging.client import kafka_client_options
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)


async def ensure_topics(settings: Settings) -> None:
    """Creates the service's topics if missing; fails if one exists with another layout."""
    wanted = [settings.kafka_events_topic, settings.kafka_dlq_topic]
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=settings.kafka_partitions,
                            replication_factor=settings.kafka_replication_factor,
                        )
                        for name in missing
                    ]
                )
                log.info(
                    "Created Kafka topics %s with %d partitions", missing, settings.kafka_partitions
                )
            except TopicAlreadyExistsError:
                log.info("Kafka topics %s were created concurrently", missing)
        await _check_partition_counts(admin, settings, wanted)
    finally:
        await admin.close()


async def _check_partition_counts(
    admin: AIOKafkaAdminClient, settings: Settings, topics: list[str]
) -> None:
    for attempt in range(20):
        descriptions = await admin.describe_topics(topics)
        counts = {d["topic"]: len(d["partitions"]) for d in descriptions if not d["error_code"]}
        if len(counts) == len(topics):
            break
        await asyncio.sleep(0.1 * (attempt + 1))
    for topic in topics:
        actual = counts.get(topic)
        if actual != settings.kafka_partitions:
            raise TopicMismatchError(
                f"topic {topic!r} has {actual} partitions but KAFKA_PARTITIONS="
                f"{settings.kafka_partitions}; set KAFKA_PARTITIONS={actual} (to grow the topic "
                "instead: docs/RUNBOOK.md, 'More partitions')"
            )
