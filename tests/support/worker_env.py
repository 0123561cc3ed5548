"""Settings for a worker under test: its own topics and group, the session broker, a database."""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from holdwall_stream.settings import async_database_url


def worker_env(kafka_bootstrap: str, database_url: str, **overrides: str) -> dict[str, str]:
    """A unique app id and topic names, so tests sharing one broker never see each other."""
    suffix = secrets.token_hex(4)
    env = {
        "KAFKA_ENABLED": "true",
        "KAFKA_BROKERS": kafka_bootstrap,
        "KAFKA_GROUP_ID": f"hw-test-{suffix}",
        "KAFKA_EVENTS_TOPIC": f"hw-events-{suffix}",
        "KAFKA_DLQ_TOPIC": f"hw-dlq-{suffix}",
        "KAFKA_SESSION_TIMEOUT": "6000",
        "OUTBOX_POLL_INTERVAL_MS": "200",
        "DATABASE_URL": database_url,
    }
    env.update(overrides)
    return env


def post_json(url: str, body: Any, timeout: float = 30.0) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if not isinstance(body, bytes) else body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _json_or_text(error.read())


def _json_or_text(body: bytes) -> Any:
    """An error body as JSON, or as the text it is (so a test's assertion shows it)."""
    try:
        return json.loads(body or b"null")
    except ValueError:
        return body.decode("utf-8", "replace")


def get_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _json_or_text(error.read())


async def consume_all(
    bootstrap: str, topic: str, expected: int, timeout: float = 60.0
) -> list[Any]:
    """Reads a topic from the start until ``expected`` messages arrived (or time runs out).

    Counts by consuming, never by end offsets: Tansu's reported end offset can lag.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        for _ in range(50):
            if partitions:
                break
            await asyncio.sleep(0.1)
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < expected and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def query(database_url: str, sql: str, **params: Any) -> Sequence[Any]:
    engine = create_async_engine(async_database_url(database_url))
    try:
        async with engine.connect() as connection:
            return (await connection.execute(text(sql), params)).all()
    finally:
        await engine.dispose()
