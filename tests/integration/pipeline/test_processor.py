"""EventProcessor against real PostgreSQL and SQLite, with a real broker for the DLQ.

Effectively-once by event id (also with two processors on the same batch at once),
handler writes committed with the claim and rolled back with a failed attempt, dead
letters with their headers, and event types PostgreSQL text cannot hold as they are.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.errors import DatabaseStalledError
from holdwall_stream.messaging import dead_letter as dlq_headers
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.pipeline.envelope import (
    EVENT_ID_HEADER,
    EventEnvelope,
    encode_envelope,
)
from holdwall_stream.pipeline.handlers import (
    HandlerRegistry,
    PermanentHandlerError,
    transaction,
)
from holdwall_stream.pipeline.processor import EventProcessor, IncomingMessage
from holdwall_stream.settings import Settings
from tests.support.flaky_handlers import effects_table_ddl, record_effect
from tests.support.kafka import settings_with_own_topics, worker_producer
from tests.support.pg import render
from tests.support.pipeline import event as envelope
from tests.support.tcp_proxy import TcpProxy
from tests.support.worker_env import consume_all

EVENTS_TOPIC = "events-under-test"


@pytest.fixture
async def settings(kafka_bootstrap: str, database_url: str) -> Settings:
    return await settings_with_own_topics(
        "proc",
        kafka_bootstrap,
        database_url,
        pipeline_max_attempts=3,
        pipeline_retry_backoff_ms=5,
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    await init_schema(engine)
    async with engine.begin() as connection:
        await connection.execute(text(effects_table_ddl(engine.dialect.name)))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[KafkaProducer]:
    async with worker_producer(settings) as producer:
        yield producer


Factory = Callable[..., EventProcessor]


@pytest.fixture
def make_processor(settings: Settings, engine: AsyncEngine, producer: KafkaProducer) -> Factory:
    def make(
        registry: HandlerRegistry | None = None,
        *,
        engine_: AsyncEngine | None = None,
        metrics: Metrics | None = None,
        **overrides: Any,
    ) -> EventProcessor:
        merged = settings.model_copy(update=overrides) if overrides else settings
        return EventProcessor(
            merged, engine_ or engine, registry or HandlerRegistry(), producer, metrics or Metrics()
        )

    return make


_offsets = iter(range(10**9))


def message(
    value: bytes | EventEnvelope | None,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> IncomingMessage:
    if isinstance(value, EventEnvelope):
        key = value.aggregate_id.encode() if key is None else key
        headers = [(EVENT_ID_HEADER, str(value.id).encode()), *(headers or [])]
        value = encode_envelope(value)
    return IncomingMessage(EVENTS_TOPIC, 1, next(_offsets), key, value, headers or [])


async def rows(engine: AsyncEngine, sql: str) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(text(sql))).all())


async def processed_ids(engine: AsyncEngine) -> list[str]:
    return sorted(
        str(uuid.UUID(str(r[0])))
        for r in await rows(engine, "SELECT event_id FROM processed_events")
    )


async def effects(engine: AsyncEngine) -> list[str]:
    return sorted(r[0] for r in await rows(engine, "SELECT event_id FROM handler_effects"))


def registry_with(
    event_type: str, handler: Callable[[EventEnvelope], Awaitable[None]]
) -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.add(event_type, handler)
    return registry


async def test_valid_events_take_effect_once_and_repeats_are_duplicates(
    make_processor: Factory, engine: AsyncEngine
) -> None:
    events = [envelope(aggregate_id=f"order-{i}", n=i) for i in range(4)]
    batch = [message(e) for e in events] + [message(events[0])]
    processor = make_processor()

    first = await processor.process(batch)
    assert (first.processed, first.duplicates, first.dead_lettered) == (4, 1, 0)
    again = await processor.process(batch)
    assert (again.processed, again.duplicates, again.dead_lettered) == (0, 5, 0)

    assert await processed_ids(engine) == sorted(str(e.id) for e in events)
    types = {r[0] for r in await rows(engine, "SELECT type FROM processed_events")}
    assert types == {"order.created"}


async def test_invalid_messages_are_dead_lettered_with_their_reason_and_origin(
    make_processor: Factory, engine: AsyncEngine, settings: Settings, kafka_bootstrap: str
) -> None:
    good = envelope()
    mismatched = envelope(aggregate_id="order-9")
    batch = [
        message(b"\xff not json", key=b"k1", headers=[("trace", b"abc"), ("dlq-reason", b"old")]),
        message(good),
        message(mismatched, key=b"someone-else"),
        message(None, key=b"k2"),
    ]
    outcome = await make_processor().process(batch)
    assert (outcome.processed, outcome.dead_lettered) == (1, 3)
    assert await processed_ids(engine) == [str(good.id)]

    records = await consume_all(kafka_bootstrap, settings.kafka_dlq_topic, expected=3)
    assert len(records) == 3
    by_offset = {int(dict(r.headers)[dlq_headers.DLQ_ORIGINAL_OFFSET]): r for r in records}
    expected = {
        batch[0].offset: ("not_utf8", batch[0]),
        batch[2].offset: ("key_mismatch", batch[2]),
        batch[3].offset: ("not_json", batch[3]),
    }
    assert set(by_offset) == set(expected)
    for offset, (reason, original) in expected.items():
        record = by_offset[offset]
        headers = dict(record.headers)
        assert record.value == original.value
        assert record.key == original.key
        assert headers[dlq_headers.DLQ_REASON] == reason.encode()
        assert headers[dlq_headers.DLQ_ERROR_TYPE] == b"InvalidMessage"
        assert headers[dlq_headers.DLQ_ERROR_MESSAGE]
        assert headers[dlq_headers.DLQ_ORIGINAL_TOPIC] == EVENTS_TOPIC.encode()
        assert headers[dlq_headers.DLQ_ORIGINAL_PARTITION] == b"1"
        assert headers[dlq_headers.DLQ_ATTEMPTS] == b"1"
        assert headers[dlq_headers.DLQ_FIRST_FAILURE] == headers[dlq_headers.DLQ_LAST_FAILURE]
        datetime.fromisoformat(headers[dlq_headers.DLQ_FIRST_FAILURE].decode())
        assert headers[dlq_headers.DLQ_SOURCE] == b"pipeline"
    first_headers = by_offset[batch[0].offset].headers
    assert ("trace", b"abc") in first_headers
    assert ("dlq-reason", b"old") not in first_headers  # replaced, not duplicated
    mismatch_headers = dict(by_offset[batch[2].offset].headers)
    assert mismatch_headers[EVENT_ID_HEADER] == str(mismatched.id).encode()


async def test_a_message_over_the_size_limit_is_dead_lettered_without_its_value(
    settings: Settings, engine: AsyncEngine, kafka_bootstrap: str
) -> None:
    """The DLQ has the same limit: sending the value would fail on every redelivery and
    stall the partition. The letter says where the value still is."""
    limited = settings.model_copy(update={"kafka_max_message_bytes": 4096})
    async with worker_producer(limited) as producer:
        processor = EventProcessor(limited, engine, HandlerRegistry(), producer, Metrics())
        good = envelope()
        big = message(b"x" * 200_000, key=b"k-big")
        outcome = await processor.process([big, message(good)])

    assert (outcome.processed, outcome.dead_lettered) == (1, 1)
    assert await processed_ids(engine) == [str(good.id)]
    [record] = await consume_all(kafka_bootstrap, settings.kafka_dlq_topic, expected=1)
    headers = dict(record.headers)
    assert record.value is None
    assert record.key == b"k-big"
    assert headers[dlq_headers.DLQ_REASON] == b"too_large"
    assert b"200000 bytes" in headers[dlq_headers.DLQ_ERROR_MESSAGE]
    assert headers[dlq_headers.DLQ_ORIGINAL_OFFSET] == str(big.offset).encode()


@pytest.mark.parametrize(
    "event_type",
    [
        "with\x00nul",
        'quote " and backslash \\',
        "{braces},commas",
        "NULL",
        "  spaced  ",
        "ünïcödé ✓ 𝄞",
        "t" * 200,
    ],
)
async def test_any_envelope_type_is_recorded(
    make_processor: Factory, engine: AsyncEngine, event_type: str
) -> None:
    """The claim sends types as a PostgreSQL array literal, and text there cannot hold NUL:
    neither may turn a valid event into a batch that fails forever."""
    events = [envelope(event_type), envelope("plain")]
    outcome = await make_processor().process([message(e) for e in events])
    assert outcome.processed == 2
    stored = {r[0] for r in await rows(engine, "SELECT type FROM processed_events")}
    assert stored == {event_type.replace("\x00", "\ufffd"), "plain"}


async def test_failed_attempts_are_retried_and_their_writes_rolled_back(
    make_processor: Factory, engine: AsyncEngine
) -> None:
    attempts: dict[uuid.UUID, int] = {}

    async def flaky(event: EventEnvelope) -> None:
        await record_effect(event)  # written, then rolled back with the failed attempt
        attempts[event.id] = attempts.get(event.id, 0) + 1
        if attempts[event.id] < 3:
            raise ConnectionError("downstream hiccup")

    metrics = Metrics()
    events = [envelope("order.paid", aggregate_id=f"o{i}") for i in range(3)]
    outcome = await make_processor(registry_with("order.paid", flaky), metrics=metrics).process(
        [message(e) for e in events]
    )
    assert (outcome.processed, outcome.dead_lettered) == (3, 0)
    assert all(count == 3 for count in attempts.values())
    assert await effects(engine) == sorted(str(e.id) for e in events)
    assert metrics.events_retried._value.get() == 6


async def test_handler_failure_dead_letters_the_event_unclaimed_so_a_replay_processes_it(
    make_processor: Factory, engine: AsyncEngine, settings: Settings, kafka_bootstrap: str
) -> None:
    failing, fine = envelope("order.paid", "o1"), envelope("order.paid", "o2")
    broken = True

    async def handler(event: EventEnvelope) -> None:
        await record_effect(event)  # rolled back with each failed attempt
        if broken and event.id == failing.id:
            raise RuntimeError("bug in the handler")

    batch = [message(failing), message(fine)]
    processor = make_processor(registry_with("order.paid", handler), pipeline_max_attempts=2)
    outcome = await processor.process(batch)
    assert (outcome.processed, outcome.dead_lettered) == (1, 1)
    assert await processed_ids(engine) == [str(fine.id)]
    assert await effects(engine) == [str(fine.id)]

    [record] = await consume_all(kafka_bootstrap, settings.kafka_dlq_topic, expected=1)
    headers = dict(record.headers)
    assert headers[dlq_headers.DLQ_REASON] == b"handler_failed"
    assert headers[dlq_headers.DLQ_ERROR_TYPE] == b"RuntimeError"
    assert headers[dlq_headers.DLQ_ERROR_MESSAGE] == b"bug in the handler"
    assert headers[dlq_headers.DLQ_ATTEMPTS] == b"2"
    assert headers[EVENT_ID_HEADER] == str(failing.id).encode()
    first = datetime.fromisoformat(headers[dlq_headers.DLQ_FIRST_FAILURE].decode())
    last = datetime.fromisoformat(headers[dlq_headers.DLQ_LAST_FAILURE].decode())
    assert first < last
    assert record.value == batch[0].value

    broken = False  # the fix; the replay brings the same message back
    replay = await processor.process([message(record.value, key=record.key)])
    assert replay.processed == 1
    again = await processor.process([message(record.value, key=record.key)])
    assert (again.processed, again.duplicates) == (0, 1)
    assert await processed_ids(engine) == sorted([str(failing.id), str(fine.id)])
    assert await effects(engine) == sorted([str(failing.id), str(fine.id)])


async def test_permanent_handler_error_is_not_retried(
    make_processor: Factory, settings: Settings, kafka_bootstrap: str
) -> None:
    calls = 0

    async def rejects(_event: EventEnvelope) -> None:
        nonlocal calls
        calls += 1
        raise PermanentHandlerError("order total is negative")

    outcome = await make_processor(registry_with("order.paid", rejects)).process(
        [message(envelope("order.paid"))]
    )
    assert outcome.dead_lettered == 1
    assert calls == 1
    [record] = await consume_all(kafka_bootstrap, settings.kafka_dlq_topic, expected=1)
    headers = dict(record.headers)
    assert headers[dlq_headers.DLQ_ATTEMPTS] == b"1"
    assert headers[dlq_headers.DLQ_ERROR_TYPE] == b"PermanentHandlerError"


async def test_a_handler_that_hangs_times_out_its_writes_rolled_back_and_the_batch_goes_on(
    make_processor: Factory, engine: AsyncEngine, settings: Settings, kafka_bootstrap: str
) -> None:
    """A handler waiting on something that never comes (a reply without a timeout) would
    hold its partition forever. Each attempt gets PIPELINE_HANDLER_TIMEOUT_MS."""
    stuck, fine = envelope("order.paid", "o1"), envelope("order.paid", "o2")
    attempts = 0

    async def handler(event: EventEnvelope) -> None:
        nonlocal attempts
        await record_effect(event)  # rolled back with each timed-out attempt
        if event.id == stuck.id:
            attempts += 1
            await asyncio.Event().wait()

    processor = make_processor(
        registry_with("order.paid", handler),
        pipeline_max_attempts=2,
        pipeline_handler_timeout_ms=200,
    )
    outcome = await asyncio.wait_for(processor.process([message(stuck), message(fine)]), 30)
    assert (outcome.processed, outcome.dead_lettered) == (1, 1)
    assert attempts == 2
    assert await processed_ids(engine) == [str(fine.id)]
    assert await effects(engine) == [str(fine.id)]
    [record] = await consume_all(kafka_bootstrap, settings.kafka_dlq_topic, expected=1)
    headers = dict(record.headers)
    assert headers[dlq_headers.DLQ_REASON] == b"handler_failed"
    assert headers[dlq_headers.DLQ_ERROR_TYPE] == b"HandlerTimeoutError"
    assert headers[dlq_headers.DLQ_ERROR_MESSAGE] == (
        b"handler for 'order.paid' did not finish within 200 ms (PIPELINE_HANDLER_TIMEOUT_MS)"
    )
    assert headers[dlq_headers.DLQ_ATTEMPTS] == b"2"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_handler_statement_past_the_timeout_is_cancelled_in_the_server(
    make_processor: Factory, engine: AsyncEngine
) -> None:
    """Cancelled where it runs, its savepoint rolled back, and the batch's transaction and
    connection carry on: cut off by asyncio instead, the connection would be invalidated
    and the whole batch redelivered, to time out again."""
    slow, fine = envelope("order.paid", "o1"), envelope("order.paid", "o2")
    sleeps: list[str] = []

    async def handler(event: EventEnvelope) -> None:
        await record_effect(event)
        if event.id == slow.id and not sleeps:
            sleeps.append("pg_sleep(60)")
            await transaction().execute(text("SELECT pg_sleep(60)"))

    metrics = Metrics()
    processor = make_processor(
        registry_with("order.paid", handler), metrics=metrics, pipeline_handler_timeout_ms=300
    )
    outcome = await asyncio.wait_for(processor.process([message(slow), message(fine)]), 30)
    assert (outcome.processed, outcome.dead_lettered) == (2, 0)
    assert metrics.events_retried._value.get() == 1  # the second attempt did not sleep
    assert await effects(engine) == sorted([str(slow.id), str(fine.id)])
    assert await rows(
        engine,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
    ) == [(0,)]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_losing_the_database_mid_batch_aborts_the_batch_instead_of_dead_lettering(
    make_processor: Factory, engine: AsyncEngine, settings: Settings, kafka_bootstrap: str
) -> None:
    """A failover in the middle of a batch is not the handlers' fault: the batch is given
    up at once, nothing is committed or dead-lettered, and its redelivery processes every
    event. (Treated as handler failures, every event left in the batch would wait out its
    retries and land in the DLQ, while the redelivered batch processes it all the same.)"""
    events = [envelope("order.paid", aggregate_id=f"o{i}") for i in range(5)]
    rejected = events[1]  # fails for reasons of its own before the connection is lost
    calls: list[uuid.UUID] = []
    lose_connection_at = events[2].id

    async def handler(event: EventEnvelope) -> None:
        calls.append(event.id)
        if event.id == rejected.id:
            raise PermanentHandlerError("order total is negative")
        await record_effect(event)
        if event.id == lose_connection_at:
            lose_connection_at_once()
            await transaction().execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    def lose_connection_at_once() -> None:
        nonlocal lose_connection_at
        lose_connection_at = None

    metrics = Metrics()
    processor = make_processor(registry_with("order.paid", handler), metrics=metrics)
    batch = [message(e) for e in events]
    with pytest.raises(DBAPIError) as lost:
        await processor.process(batch)
    assert lost.value.connection_invalidated
    assert calls == [e.id for e in events[:3]]  # no retry, no further event on a dead connection
    assert metrics.events_retried._value.get() == 0
    assert await processed_ids(engine) == []
    assert await effects(engine) == []

    redelivered = await processor.process([*batch, message(b"not json")])
    assert (redelivered.processed, redelivered.dead_lettered) == (4, 2)
    assert await effects(engine) == sorted(str(e.id) for e in events if e is not rejected)
    # The DLQ holds the two bad messages once each: nothing from the batch that was given
    # up (its dead letters are sent only once a batch committed), nothing twice.
    records = await consume_all(kafka_bootstrap, settings.kafka_dlq_topic, expected=3, timeout=5)
    assert sorted(r.value for r in records) == sorted([batch[1].value, b"not json"])


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_batch_on_a_database_gone_silent_is_given_up_and_its_redelivery_processed(
    make_processor: Factory, engine: AsyncEngine, settings: Settings, database_url: str
) -> None:
    """The pooled connection stays open but carries nothing (a partition behind a proxy):
    the batch's own database work gets DATABASE_TIMEOUT_MS, then the batch is given up
    (nothing committed) and the redelivery runs on a new connection."""
    server = make_url(database_url)
    with TcpProxy(server.host or "127.0.0.1", server.port or 5432) as proxy:
        via_proxy = render(server.set(host=proxy.listen_host, port=proxy.listen_port))
        silent_prone = create_engine(
            settings.model_copy(update={"database_url": SecretStr(via_proxy)})
        )
        try:
            processor = make_processor(engine_=silent_prone, database_timeout_ms=1000)
            first, second = envelope("order.paid", "o1"), envelope("order.paid", "o2")
            await processor.process([message(first)])  # the pool keeps its connection

            proxy.silence()
            batch = [message(second)]
            with pytest.raises(DatabaseStalledError, match="pipeline batch of 1 events"):
                await asyncio.wait_for(processor.process(batch), 60)
            assert await processed_ids(engine) == [str(first.id)]

            redelivered = await asyncio.wait_for(processor.process(batch), 60)
        finally:
            await silent_prone.dispose()
    assert (redelivered.processed, redelivered.duplicates) == (1, 0)
    assert await processed_ids(engine) == sorted([str(first.id), str(second.id)])


async def test_unknown_types_are_skipped_or_dead_lettered_as_configured(
    make_processor: Factory, engine: AsyncEngine, settings: Settings, kafka_bootstrap: str
) -> None:
    async def handler(_event: EventEnvelope) -> None:
        return None

    registry = registry_with("order.paid", handler)
    skipped = envelope("order.unheard-of")
    outcome = await make_processor(registry).process([message(skipped)])
    assert (outcome.skipped_unknown, outcome.processed) == (1, 0)
    assert await processed_ids(engine) == [str(skipped.id)]

    parked = envelope("order.unheard-of")
    outcome = await make_processor(registry, pipeline_unknown_type="dlq").process([message(parked)])
    assert outcome.dead_lettered == 1
    assert await processed_ids(engine) == [str(skipped.id)]
    [record] = await consume_all(kafka_bootstrap, settings.kafka_dlq_topic, expected=1)
    assert dict(record.headers)[dlq_headers.DLQ_REASON] == b"unknown_type"


async def test_two_processors_on_the_same_batch_apply_each_event_once(
    make_processor: Factory, engine: AsyncEngine, settings: Settings
) -> None:
    """A rebalance or a zombie can hand one batch to two consumers at once: the claim makes
    the second wait for the first's transaction and then skip what it committed."""

    async def slow_effect(event: EventEnvelope) -> None:
        await record_effect(event)
        await asyncio.sleep(0.005)

    registry = registry_with("order.paid", slow_effect)
    other_engine = create_engine(settings)
    try:
        events = [envelope("order.paid", aggregate_id=f"o{i % 5}", seq=i) for i in range(40)]
        batch = [message(e) for e in events]
        outcomes = await asyncio.gather(
            make_processor(registry).process(batch),
            make_processor(registry, engine_=other_engine).process(batch),
        )
    finally:
        await other_engine.dispose()
    assert sorted(o.processed for o in outcomes) == [0, 40]
    assert sum(o.duplicates for o in outcomes) == 40
    assert await effects(engine) == sorted(str(e.id) for e in events)
    assert await processed_ids(engine) == sorted(str(e.id) for e in events)


async def test_transaction_is_only_available_inside_a_handler() -> None:
    with pytest.raises(RuntimeError, match="only available while a pipeline handler runs"):
        transaction()
