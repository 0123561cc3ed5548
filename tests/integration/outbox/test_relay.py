"""The relay against a PostgreSQL that stops answering without closing its connections
(a network partition behind a proxy, a hung server): every connection the worker holds
stays open to the kernel, and without a deadline the relay would wait on it forever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.errors import DatabaseStalledError
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.writer import NewEvent, OutboxTarget, store_events
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER
from holdwall_stream.resilience.breaker import CircuitBreaker
from holdwall_stream.settings import Settings, load_settings
from tests.support.kafka import settings_with_own_topics, worker_producer
from tests.support.pg import fresh_database, render
from tests.support.tcp_proxy import TcpProxy
from tests.support.worker_env import consume_all

pytestmark = pytest.mark.timeout(120)

DATABASE_TIMEOUT_MS = 1000
KAFKA_REQUEST_TIMEOUT_MS = 3000


async def _store(engine: AsyncEngine, settings: Settings, count: int) -> set[str]:
    events = [
        NewEvent(type="stall.test", aggregate_id=f"key-{i % 7}", data={"n": i})
        for i in range(count)
    ]
    target = OutboxTarget(settings.kafka_events_topic, settings.kafka_partitions)
    async with AsyncSession(engine) as session, session.begin():
        stored = await store_events(session, events, target)
    return {str(event_id) for event_id in stored.ids}


async def _drain(relay: OutboxRelay, partitions: range) -> None:
    while await relay.drain(partitions):
        pass


@pytest.fixture
async def direct_engine(pg_admin_url: str) -> AsyncIterator[AsyncEngine]:
    """A fresh database with the schema, reached without the proxy (the writer's view)."""
    with fresh_database(pg_admin_url) as url:
        engine = create_engine(load_settings(database_url=url, kafka_enabled=False))
        await init_schema(engine)
        try:
            yield engine
        finally:
            await engine.dispose()


async def test_a_batch_on_a_silent_database_is_given_up_and_the_next_one_publishes(
    direct_engine: AsyncEngine, kafka_bootstrap: str
) -> None:
    database = direct_engine.url
    with TcpProxy(database.host or "127.0.0.1", database.port or 5432) as proxy:
        through_proxy = make_url(render(database)).set(
            host=proxy.listen_host, port=proxy.listen_port
        )
        settings = await settings_with_own_topics(
            "stall",
            kafka_bootstrap,
            render(through_proxy),
            database_timeout_ms=DATABASE_TIMEOUT_MS,
            kafka_request_timeout=KAFKA_REQUEST_TIMEOUT_MS,
            kafka_session_timeout=KAFKA_REQUEST_TIMEOUT_MS,  # not above the request timeout
        )
        partitions = range(settings.kafka_partitions)
        engine = create_engine(settings)
        try:
            async with worker_producer(settings) as producer:
                relay = OutboxRelay(settings, engine, producer, CircuitBreaker(), Metrics())
                await relay.prepare()
                before = await _store(direct_engine, settings, 30)
                await _drain(relay, partitions)  # the pool now holds a connection or more

                proxy.silence()
                during = await _store(direct_engine, settings, 30)
                started = time.monotonic()
                with pytest.raises(DatabaseStalledError, match="did not finish within 4 s"):
                    await asyncio.wait_for(relay.drain(partitions), 60)
                given_up_after = time.monotonic() - started

                await asyncio.wait_for(_drain(relay, partitions), 60)
                records = await consume_all(
                    kafka_bootstrap, settings.kafka_events_topic, expected=60
                )
        finally:
            await engine.dispose()

    published = {dict(record.headers)[EVENT_ID_HEADER].decode() for record in records}
    print(f"\nsilent database: the batch given up after {given_up_after:.1f} s")
    assert published == before | during
    assert len(records) == 60  # nothing had been produced from the given-up batches
