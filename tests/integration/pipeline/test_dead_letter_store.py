"""The dead_letters table on real PostgreSQL and SQLite: what the DLQ agent stores (once per
DLQ position, whatever the headers hold), and what the dlq CLI lists, replays and purges."""

from __future__ import annotations

import uuid
from dataclasses import replace

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from holdwall_stream.db.models import Outbox
from holdwall_stream.embedded import free_port
from holdwall_stream.errors import EXIT_KAFKA_UNAVAILABLE
from holdwall_stream.messaging import dead_letter as h
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.writer import NewEvent, OutboxTarget, store_events
from holdwall_stream.pipeline import dlq
from holdwall_stream.pipeline.dlq import DlqMessage
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER
from holdwall_stream.resilience.breaker import CircuitBreaker
from tests.support.kafka import settings_with_own_topics, worker_producer
from tests.support.pipeline import run_cli
from tests.support.worker_env import consume_all, worker_env


def dead_letter(offset: int, **headers: str) -> DlqMessage:
    base = {
        h.DLQ_REASON: "invalid_envelope",
        h.DLQ_ERROR_TYPE: "InvalidMessage",
        h.DLQ_ERROR_MESSAGE: "data: Field required",
        h.DLQ_ORIGINAL_TOPIC: "orders",
        h.DLQ_ORIGINAL_PARTITION: "2",
        h.DLQ_ORIGINAL_OFFSET: str(100 + offset),
        h.DLQ_ATTEMPTS: "1",
    } | headers
    return DlqMessage(
        partition=0,
        offset=offset,
        key=b"order-1",
        value=b'{"id": 1}',
        headers=[(name, value.encode()) for name, value in base.items()],
    )


async def test_a_dead_letter_is_stored_once_per_dlq_position(engine: AsyncEngine) -> None:
    event_id = str(uuid.uuid4())
    messages = [dead_letter(0, **{EVENT_ID_HEADER: event_id}), dead_letter(1)]
    assert await dlq.store_dead_letters(engine, messages) == 2
    assert await dlq.store_dead_letters(engine, messages) == 0  # redelivered: harmless
    [first, second] = await dlq.list_dead_letters(engine)
    assert str(first.event_id) == event_id
    assert second.event_id is None
    assert (first.original_topic, first.original_partition, first.original_offset) == (
        "orders",
        2,
        100,
    )
    assert first.reason == "invalid_envelope"
    assert first.attempts == 1
    assert first.raw == b'{"id": 1}'
    assert first.headers[h.DLQ_ERROR_TYPE] == "InvalidMessage"


async def test_text_postgresql_cannot_hold_is_stored_all_the_same(engine: AsyncEngine) -> None:
    """An error message can quote a bad message's field names, NUL included; one row the
    database refuses would stop the DLQ agent for good."""
    nul = dead_letter(
        0,
        **{
            h.DLQ_ERROR_MESSAGE: "x\x00y: Extra inputs are not permitted",
            h.DLQ_REASON: "in\x00valid",
            h.DLQ_ORIGINAL_TOPIC: "t\x00",
            "trace\x00": "v\x00",
        },
    )
    assert await dlq.store_dead_letters(engine, [nul, dead_letter(1)]) == 2
    [letter, _] = await dlq.list_dead_letters(engine)
    assert letter.error == "x\ufffdy: Extra inputs are not permitted"
    assert letter.reason == "in\ufffdvalid"
    assert letter.original_topic == "t\ufffd"


async def test_replay_resends_with_the_event_id_and_marks_replayed(
    engine: AsyncEngine, database_url: str, kafka_bootstrap: str
) -> None:
    settings = await settings_with_own_topics("replay", kafka_bootstrap, database_url)
    event_id = str(uuid.uuid4())
    await dlq.store_dead_letters(
        engine, [dead_letter(0, **{EVENT_ID_HEADER: event_id, "trace": "t-1"})]
    )
    [letter] = await dlq.list_dead_letters(engine)
    async with worker_producer(settings) as producer:
        outcome = await dlq.replay(engine, producer, settings, [letter.id, 999])
    assert outcome.replayed == [letter.id]
    assert outcome.not_replayed == {999: "dead letter 999: no such id (see `dlq list`)"}
    [record] = await consume_all(kafka_bootstrap, settings.kafka_events_topic, expected=1)
    headers = dict(record.headers)
    assert record.value == b'{"id": 1}'
    assert record.key == b"order-1"
    assert headers[EVENT_ID_HEADER] == event_id.encode()
    assert headers["trace"] == b"t-1"
    assert headers["dlq-replayed-from"] == str(letter.id).encode()
    assert not any(name.startswith("dlq-") and name != "dlq-replayed-from" for name in headers)
    assert await dlq.list_dead_letters(engine) == []
    [replayed] = await dlq.list_dead_letters(engine, include_replayed=True)
    assert replayed.replayed_at is not None

    assert await dlq.purge(engine, replayed_only=True) == 1
    assert await dlq.count_dead_letters(engine) == 0


async def test_replay_says_why_a_letter_without_a_value_is_not_replayed(
    engine: AsyncEngine, database_url: str, kafka_bootstrap: str
) -> None:
    """A message over KAFKA_MAX_MESSAGE_BYTES is dead-lettered without its value (the DLQ
    would refuse it): the CLI says where the message still is instead of replaying nothing
    in silence."""
    too_large = dead_letter(0, **{h.DLQ_REASON: "too_large"})
    tombstone = dead_letter(1, **{h.DLQ_REASON: "not_json"})
    await dlq.store_dead_letters(
        engine, [replace(too_large, value=None), replace(tombstone, value=None)]
    )
    big, empty = await dlq.list_dead_letters(engine)

    result = run_cli(
        worker_env(kafka_bootstrap, database_url),
        *("dlq", "replay", str(big.id), str(empty.id), "999999"),
    )

    assert result.returncode != 0
    assert "replayed 0 dead letter(s)" in result.stdout
    assert f"dead letter {big.id} (too_large) kept no message to replay" in result.stderr
    assert "read it from orders partition 2 offset 100" in result.stderr
    assert f"dead letter {empty.id} (not_json): its message had no value" in result.stderr
    assert "dead letter 999999: no such id" in result.stderr
    assert len(await dlq.list_dead_letters(engine)) == 2  # neither marked replayed


async def test_replay_without_kafka_says_so_in_one_line_and_marks_nothing(
    engine: AsyncEngine, database_url: str
) -> None:
    await dlq.store_dead_letters(engine, [dead_letter(0)])
    unreachable = run_cli(
        worker_env(f"127.0.0.1:{free_port()}", database_url, KAFKA_CONNECTION_TIMEOUT="2000"),
        *("dlq", "replay", "--all"),
    )
    switched_off = run_cli(
        worker_env("127.0.0.1:1", database_url, KAFKA_ENABLED="false"),
        *("dlq", "replay", "--all"),
    )

    assert unreachable.returncode == EXIT_KAFKA_UNAVAILABLE, unreachable.stderr
    [line] = unreachable.stderr.splitlines()
    assert line.startswith("holdwall-stream: Kafka connection error at 127.0.0.1:")
    assert "correct KAFKA_BROKERS" in line
    assert switched_off.returncode == 1, switched_off.stderr
    [line] = switched_off.stderr.splitlines()
    assert "KAFKA_ENABLED=false" in line
    assert len(await dlq.list_dead_letters(engine)) == 1  # not marked replayed


async def test_replaying_a_parked_outbox_row_hands_it_back_to_the_relay_once_it_fits(
    engine: AsyncEngine, database_url: str, kafka_bootstrap: str
) -> None:
    """The relay parks a row over KAFKA_MAX_MESSAGE_BYTES and dead-letters it without its
    payload. Replaying that dead letter is refused while the row is still too large, and
    once the limit is raised the row goes back to the relay, which publishes it after the
    later events of its key (that went on without it), with its event id."""
    small = await settings_with_own_topics(
        "requeue", kafka_bootstrap, database_url, kafka_max_message_bytes=2048
    )
    raised = small.model_copy(update={"kafka_max_message_bytes": 1_000_000})
    target = OutboxTarget(small.kafka_events_topic, small.kafka_partitions)
    big = NewEvent(type="order.created", aggregate_id="order-9", data={"pad": "x" * 4000})
    after = NewEvent(type="order.created", aggregate_id="order-9", data={"n": 1})
    async with AsyncSession(engine) as session, session.begin():
        [big_id, after_id] = (await store_events(session, [big, after], target)).ids
    partitions = range(small.kafka_partitions)

    async with worker_producer(small) as producer:
        relay = OutboxRelay(small, engine, producer, CircuitBreaker(), Metrics())
        await relay.prepare()
        while await relay.drain(partitions):
            pass
    [parked] = await consume_all(kafka_bootstrap, small.kafka_dlq_topic, expected=1)
    await dlq.store_dead_letters(
        engine,
        [DlqMessage(parked.partition, parked.offset, parked.key, parked.value, parked.headers)],
    )
    [letter] = await dlq.list_dead_letters(engine)
    assert (letter.reason, letter.event_id, letter.raw) == ("too_large", big_id, None)

    async with worker_producer(small) as producer:
        refused = await dlq.replay(engine, producer, small, [letter.id])
    assert refused.replayed == []
    assert "still over KAFKA_MAX_MESSAGE_BYTES=2048" in refused.not_replayed[letter.id]
    assert await _outbox_row(engine, big_id) == (False, True)  # still parked

    async with worker_producer(raised) as producer:
        outcome = await dlq.replay(engine, producer, raised, [letter.id])
        again = await dlq.replay(engine, producer, raised, [letter.id])
        assert await _outbox_row(engine, big_id) == (False, False)  # back in the backlog
        relay = OutboxRelay(raised, engine, producer, CircuitBreaker(), Metrics())
        while await relay.drain(partitions):
            pass
    assert outcome.replayed == [letter.id]
    assert again.replayed == []
    assert "no parked row of event" in again.not_replayed[letter.id]
    assert await dlq.list_dead_letters(engine) == []  # marked replayed
    assert await _outbox_row(engine, big_id) == (True, False)

    records = await consume_all(kafka_bootstrap, small.kafka_events_topic, expected=2)
    sent = [dict(record.headers)[EVENT_ID_HEADER].decode() for record in records]
    assert sent == [str(after_id), str(big_id)]  # a replay: after what went on without it
    assert len(records[1].value) > 4000


async def _outbox_row(engine: AsyncEngine, event_id: uuid.UUID) -> tuple[bool, bool]:
    """(published, parked) of the event's outbox row."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(Outbox.published, Outbox.dead_lettered_at).where(Outbox.event_id == event_id)
            )
        ).one()
    return bool(row.published), row.dead_lettered_at is not None
