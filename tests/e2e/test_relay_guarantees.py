"""The outbox relay's guarantees, black-box: real worker processes, a real Tansu broker,
real PostgreSQL (and SQLite where the rollback switch is concerned).

Every event carries ``data.seq``, its key's sequence number in commit order (writes of a
key are serialised until their commit returned; see tests/support/relay_harness.py), so
"order per key" means: on the topic, each key's first occurrences come as 1, 2, 3, ...
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from aiokafka.structs import ConsumerRecord

from holdwall_stream.embedded import EmbeddedBroker, free_port
from holdwall_stream.outbox.writer import OutboxTarget, partition_for_key
from tests.support.pg import fresh_database
from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.relay_harness import (
    KeyedWriter,
    analyse,
    consume_ids,
    declare_topics,
    engine_for,
    event_id_of,
    health,
    keep_writing,
    settings_from_env,
    stop_all,
    topic_is_empty,
    wait_healthy,
    write_while_workers_join,
)
from tests.support.tcp_proxy import TcpProxy
from tests.support.worker_env import query, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

KEYS = [f"acct-{i:02d}" for i in range(50)]


async def _scalar(connection: psycopg.AsyncConnection, sql: str) -> int:
    cursor = await connection.execute(sql)
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


def _target(env: dict[str, str]) -> OutboxTarget:
    settings = settings_from_env(env)
    return OutboxTarget(settings.kafka_events_topic, settings.kafka_partitions)


async def _backlog(database_url: str) -> int:
    [(count,)] = await query(
        database_url,
        "SELECT count(*) FROM outbox WHERE published = false AND dead_lettered_at IS NULL",
    )
    return int(count)


# --- three workers, fifty keys, concurrent writers (PostgreSQL) --------------------------


@dataclass(frozen=True)
class SteadyRun:
    written: dict[str, tuple[str, int]]
    records: list[ConsumerRecord]
    partitions: int
    transactions: int


@pytest.fixture(scope="module")
async def steady_run(
    kafka_bootstrap: str, pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SteadyRun]:
    """One worker starts; writers (four straight into the database, one over HTTP) begin;
    two more workers join while they write, so partitions move between workers mid-flow.
    Then everything written is read back from the topic."""
    root = tmp_path_factory.mktemp("steady")
    with fresh_database(pg_admin_url) as database_url:
        env = worker_env(kafka_bootstrap, database_url)
        workers = [WorkerProcess(env, root / f"w{i}") for i in range(3)]
        writer = KeyedWriter(_target(env))
        try:
            async with engine_for(env) as engine:
                transactions = await write_while_workers_join(
                    workers, writer, KEYS, engine, database_writers=4, stop_within_s=30
                )
            records = await consume_ids(
                kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], writer.written, timeout=60, settle_s=3
            )
            await wait_until_async(
                lambda: _backlog_is_zero(database_url), timeout=30, message="outbox drained"
            )
            for worker in workers:
                assert worker.is_running(), worker.log_tail()
        finally:
            stop_all(workers)
        yield SteadyRun(
            dict(writer.written), records, settings_from_env(env).kafka_partitions, transactions
        )


async def _backlog_is_zero(database_url: str) -> bool:
    return await _backlog(database_url) == 0


async def test_three_workers_keep_every_keys_order(steady_run: SteadyRun) -> None:
    report = analyse(steady_run.records, steady_run.written, steady_run.partitions)
    per_key = len(steady_run.written) / len(KEYS)
    print(
        f"\n3 workers: {len(steady_run.written)} events in {steady_run.transactions} "
        f"transactions, ~{per_key:.0f} per key; {report.total} records on the topic"
    )
    assert len(steady_run.written) >= 20 * len(KEYS), "the writers wrote too little to tell"
    assert not report.missing, f"{len(report.missing)} committed events never reached Kafka"
    assert not report.order_violations, report.order_violations[:10]
    assert not report.wrong_partition, report.wrong_partition[:10]
    assert not report.unknown


async def test_three_workers_publish_every_event_exactly_once(steady_run: SteadyRun) -> None:
    report = analyse(steady_run.records, steady_run.written, steady_run.partitions)
    assert report.duplicates == 0, f"{report.duplicates} duplicates in steady state"
    assert report.total == len(steady_run.written)
    assert report.distinct == len(steady_run.written)


# --- two workers on one SQLite file ------------------------------------------------------


async def test_two_workers_on_sqlite_take_turns_and_keep_order_without_duplicates(
    kafka_bootstrap: str, sqlite_database_url: str, tmp_path: Path
) -> None:
    """SQLite has one writer: the relay's claim-produce-mark transaction holds the write
    lock (BEGIN IMMEDIATE), so one worker relays at a time and the other waits its turn,
    also for partitions both believe they own during the rebalance."""
    env = worker_env(kafka_bootstrap, sqlite_database_url)
    await declare_topics(env)
    workers = [WorkerProcess(env, tmp_path / f"w{i}") for i in range(2)]
    writer = KeyedWriter(_target(env))
    keys = KEYS[:20]
    try:
        async with engine_for(env) as engine:
            await write_while_workers_join(
                workers, writer, keys, engine, database_writers=2, stop_within_s=60
            )
        records = await consume_ids(
            kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], writer.written, timeout=60, settle_s=3
        )
        for worker in workers:
            assert worker.is_running(), worker.log_tail()
    finally:
        stop_all(workers)
    report = analyse(records, writer.written, settings_from_env(env).kafka_partitions)
    print(f"\nSQLite, 2 workers: {len(writer.written)} events; {report.total} records")
    assert len(writer.written) >= 10 * len(keys), "the writers wrote too little to tell"
    assert not report.missing, f"{len(report.missing)} committed events never reached Kafka"
    assert not report.order_violations, report.order_violations[:10]
    assert report.duplicates == 0, f"{report.duplicates} duplicates in steady state"


# --- kill -9 in the middle of a batch (PostgreSQL) ---------------------------------------


_RELAY_IN_BATCH = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL "
    "AND (query LIKE '%UPDATE outbox SET published%' OR query LIKE '%FROM relay_locks%')"
)
_BACKLOG = "SELECT count(*) FROM outbox WHERE published = false AND dead_lettered_at IS NULL"


async def test_kill_9_mid_batch_then_restart_loses_nothing_and_keeps_order(
    kafka_bootstrap: str, pg_admin_url: str, tmp_path: Path
) -> None:
    with fresh_database(pg_admin_url) as database_url:
        env = worker_env(kafka_bootstrap, database_url, OUTBOX_BATCH_SIZE="500")
        writer = KeyedWriter(_target(env))
        async with engine_for(env) as engine:
            for _ in range(24):  # 24,000 events waiting before the worker starts
                await writer.write_db(engine, [(key, 20) for key in KEYS])
        worker = WorkerProcess(env, tmp_path / "worker")
        watcher = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        try:
            worker.start()
            deadline = time.monotonic() + 90
            published_before = 0
            # A relay transaction holds an xid from its partition lock until its commit,
            # after Kafka acknowledged its batches. Once a good part of the backlog is out,
            # kill the worker while one is open.
            while time.monotonic() < deadline and published_before < 4000:
                published_before = len(writer.written) - await _scalar(watcher, _BACKLOG)
                assert worker.is_running(), worker.log_tail()
                await asyncio.sleep(0.01)
            # A relay transaction has just committed; let the next ones get going, so the
            # kill does not always land on a transaction's first claim.
            await asyncio.sleep(random.uniform(0.1, 0.3))
            while time.monotonic() < deadline:
                if await _scalar(watcher, _RELAY_IN_BATCH) > 0:
                    worker.kill()
                    break
                assert worker.is_running(), worker.log_tail()
            published_before = len(writer.written) - await _scalar(watcher, _BACKLOG)
            assert not worker.is_running(), "the relay was never seen inside a batch"
            assert published_before < len(writer.written), "killed after the backlog drained"
            on_topic_at_kill = len(
                await consume_ids(
                    kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], writer.written, timeout=3
                )
            )

            worker.start()  # same data directory and port, as a supervisor would restart it
            records = await consume_ids(
                kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], writer.written, timeout=90
            )
        finally:
            stop_all([worker])
            await watcher.close()
        report = analyse(records, writer.written, settings_from_env(env).kafka_partitions)
        print(
            f"\nkill -9 mid-batch: {published_before} of {len(writer.written)} rows marked "
            f"published at the kill, {on_topic_at_kill} on the topic; after the restart "
            f"{report.total} records on the topic, "
            f"{report.duplicates} duplicates (at-least-once), {len(report.missing)} missing"
        )
        assert not report.missing, f"{len(report.missing)} events lost"
        assert not report.order_violations, report.order_violations[:10]
        assert await _backlog(database_url) == 0


# --- broker outage of 10 s behind a TCP proxy (PostgreSQL) -------------------------------


async def test_broker_outage_loses_nothing_and_health_reports_it(
    pg_admin_url: str, tmp_path: Path
) -> None:
    """Tansu keeps data in memory, so the broker stays up: a proxy in front of it (the broker
    advertises the proxy's port) drops every connection and refuses new ones for 10 s."""
    proxy = TcpProxy("127.0.0.1", 0)
    broker = EmbeddedBroker(
        port=free_port(), advertised_port=proxy.listen_port, log_path=tmp_path / "tansu.log"
    )
    proxy.target_port = broker.port
    with proxy, broker, fresh_database(pg_admin_url) as database_url:
        env = worker_env(
            proxy.address,
            database_url,
            KAFKA_REQUEST_TIMEOUT="6000",  # >= the session timeout, as Faust requires
            BREAKER_RESET_TIMEOUT_MS="2000",
            OUTBOX_RETRY_BACKOFF_MAX_MS="1000",
        )
        writer = KeyedWriter(_target(env))
        worker = WorkerProcess(env, tmp_path / "worker")
        try:
            async with engine_for(env) as engine:
                worker.start()
                await wait_healthy([worker])
                stop = asyncio.Event()
                writing = asyncio.create_task(
                    keep_writing(stop, writer, KEYS[:20], engine=engine, interval_s=0.05)
                )
                await asyncio.sleep(2.0)
                written_before_outage = len(writer.written)

                proxy.cut()
                kafka_states: list[str] = []
                outage_ends = time.monotonic() + 10.0
                while time.monotonic() < outage_ends:
                    status, body = await health(worker)
                    kafka = body.get("checks", {}).get("kafka", {})
                    kafka_states.append(kafka.get("status", f"no answer ({status})"))
                    await asyncio.sleep(0.5)
                written_in_outage = len(writer.written) - written_before_outage
                backlog_in_outage = await _backlog(database_url)
                proxy.restore()

                await asyncio.sleep(3.0)
                stop.set()
                await asyncio.wait_for(writing, 30)

            async def kafka_ok_and_drained() -> bool:
                status, body = await health(worker)
                return (
                    status == 200
                    and body["checks"]["kafka"]["status"] == "ok"
                    and await _backlog(database_url) == 0
                )

            await wait_until_async(kafka_ok_and_drained, timeout=60, message="recovered")
            records = await consume_ids(
                proxy.address, env["KAFKA_EVENTS_TOPIC"], writer.written, timeout=60
            )
            assert worker.is_running(), worker.log_tail()
        finally:
            stop_all([worker])
        report = analyse(records, writer.written, settings_from_env(env).kafka_partitions)
        print(
            f"\noutage: {written_in_outage} events written during the 10 s outage, backlog "
            f"{backlog_in_outage} at its end; health kafka states seen: "
            f"{sorted(set(kafka_states))}; {report.duplicates} duplicates afterwards"
        )
        assert written_in_outage > 0 and backlog_in_outage > 0
        assert any(state != "ok" for state in kafka_states), kafka_states
        assert not report.missing, f"{len(report.missing)} events lost"
        assert not report.order_violations, report.order_violations[:10]


# --- KAFKA_ENABLED=false, then true: the rollback switch (both dialects) -----------------


async def test_kafka_disabled_keeps_the_backlog_and_enabling_drains_it_in_order(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    env_on = worker_env(kafka_bootstrap, database_url)
    env_off = {**env_on, "KAFKA_ENABLED": "false"}
    await declare_topics(env_on)  # so "nothing on the topic" can be read without creating it
    writer = KeyedWriter(_target(env_on))
    keys = KEYS[:10]
    worker_off = WorkerProcess(env_off, tmp_path / "off")
    try:
        worker_off.start()
        await wait_healthy([worker_off], kafka_ok=False)
        _status, body = await health(worker_off)
        assert body["checks"]["kafka"]["status"] == "disabled", body
        for round_ in range(3):
            for _ in range(5):
                await writer.write_http(worker_off.base_url, [(k, 2) for k in keys])
            _, body = await health(worker_off)
            assert body["checks"]["outbox"]["backlog"] == len(writer.written), (round_, body)
        assert await topic_is_empty(kafka_bootstrap, env_on["KAFKA_EVENTS_TOPIC"])
    finally:
        stop_all([worker_off])
    assert await _backlog(database_url) == len(writer.written) == 300

    worker_on = WorkerProcess(env_on, tmp_path / "on")
    try:
        worker_on.start()
        records = await consume_ids(
            kafka_bootstrap, env_on["KAFKA_EVENTS_TOPIC"], writer.written, timeout=90, settle_s=1
        )
        await wait_until_async(
            lambda: _backlog_is_zero(database_url), timeout=30, message="outbox drained"
        )
    finally:
        stop_all([worker_on])
    report = analyse(records, writer.written, settings_from_env(env_on).kafka_partitions)
    assert not report.missing, f"{len(report.missing)} events lost"
    assert not report.order_violations, report.order_violations[:10]
    assert report.duplicates == 0


# --- a poison row: larger than KAFKA_MAX_MESSAGE_BYTES (PostgreSQL) ----------------------


async def test_oversized_row_goes_to_the_dlq_and_the_rest_keeps_flowing(
    kafka_bootstrap: str, pg_admin_url: str, tmp_path: Path
) -> None:
    with fresh_database(pg_admin_url) as database_url:
        env = worker_env(kafka_bootstrap, database_url, KAFKA_MAX_MESSAGE_BYTES="2048")
        writer = KeyedWriter(_target(env))
        worker = WorkerProcess(env, tmp_path / "worker")
        rng = random.Random(7)
        try:
            worker.start()
            await wait_healthy([worker])
            url = worker.base_url
            await writer.write_http(url, [("poisoned", 2), ("bystander", 2)])
            [poison_id] = await writer.write_http(url, [("poisoned", 1)], pad=4000)
            await writer.write_http(url, [("poisoned", 2), ("bystander", 1)])
            for _ in range(10):
                await writer.write_http(url, writer.random_plan(rng, KEYS[:10]))
            expected = {i: ks for i, ks in writer.written.items() if i != poison_id}

            records = await consume_ids(
                kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], expected, timeout=60, settle_s=1
            )
            dead = await consume_ids(kafka_bootstrap, env["KAFKA_DLQ_TOPIC"], {poison_id}, 30)

            async def stored_as_dead_letter() -> bool:
                rows = await query(
                    database_url, "SELECT event_id, reason FROM dead_letters WHERE reason = :r",
                    r="too_large",
                )  # fmt: skip
                return any(str(uuid.UUID(str(row[0]))) == poison_id for row in rows)

            await wait_until_async(stored_as_dead_letter, timeout=30, message="dead_letters row")
            [(dead_at, published, last_error, payload_size)] = await query(
                database_url,
                "SELECT dead_lettered_at, published, last_error, length(payload) FROM outbox "
                "WHERE event_id = :id",
                id=uuid.UUID(poison_id),
            )
            _, body = await health(worker)
        finally:
            stop_all([worker])

    assert poison_id not in {event_id_of(r) for r in records}
    report = analyse(records, expected, settings_from_env(env).kafka_partitions)
    assert not report.missing, f"{len(report.missing)} events did not flow"
    assert not report.unknown
    # "poisoned" has seq 1, 2, (3 parked), 4, 5: its later events flow, in order, past the gap.
    poisoned = [expected[event_id_of(r)][1] for r in records if r.key == b"poisoned"]
    assert poisoned == [1, 2, 4, 5]
    for event_id, (key, seq) in expected.items():
        assert (key, seq) != ("poisoned", 3), event_id

    [message] = [r for r in dead if event_id_of(r) == poison_id]
    headers = {name: value.decode() for name, value in message.headers}
    assert headers["dlq-reason"] == "too_large"
    assert headers["dlq-error-type"] == "MessageSizeTooLarge"
    assert "KAFKA_MAX_MESSAGE_BYTES=2048" in headers["dlq-error-message"]
    assert headers["dlq-original-topic"] == env["KAFKA_EVENTS_TOPIC"]
    assert int(headers["dlq-original-partition"]) == partition_for_key(b"poisoned", 3)
    assert message.key == b"poisoned"

    assert dead_at is not None
    assert not published, "a parked row was never published"
    assert "KAFKA_MAX_MESSAGE_BYTES" in last_error
    assert payload_size > 2048, "the payload stays in the outbox row"
    assert body["checks"]["outbox"]["dead_lettered"] == 1
    assert body["checks"]["outbox"]["backlog"] == 0
