"""PostgreSQL unreachable under a running worker (a failover, a restart), black-box: the
worker stays up and says so, refuses new events with a 503 the client can retry, keeps
serving its metrics, and once the database is back it relays and processes every event
once, in order per key, with nothing dead-lettered.

The outage: the test database stops accepting connections (``ALLOW_CONNECTIONS false``)
and every connection to it is terminated, so the worker's pooled, relay and LISTEN
connections all drop mid-flight and cannot come back until it ends.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.outbox.writer import OutboxTarget
from tests.support.flaky_handlers import effects_table_ddl
from tests.support.pg import fresh_database
from tests.support.pipeline import produce
from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.relay_harness import (
    EVENT_TYPE,
    KeyedWriter,
    analyse,
    consume_ids,
    engine_for,
    event_id_of,
    health,
    keep_writing,
    settings_from_env,
    stop_all,
    topic_is_empty,
    wait_healthy,
)
from tests.support.tcp_proxy import TcpProxy
from tests.support.worker_env import post_json, query, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

KEYS = [f"acct-{i:02d}" for i in range(20)]
OUTAGE_S = 6.0


@asynccontextmanager
async def database_unreachable(admin_url: str, database_url: str) -> AsyncIterator[None]:
    """Inside, nobody can connect to the database and every connection to it was cut."""
    name = make_url(database_url).database
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def _new_event() -> list[dict[str, Any]]:
    return [{"id": str(uuid.uuid4()), "type": "outage.probe", "aggregate_id": "k", "data": {}}]


async def test_a_database_outage_loses_nothing_and_dead_letters_nothing(
    kafka_bootstrap: str, pg_admin_url: str, tmp_path: Path
) -> None:
    with fresh_database(pg_admin_url) as database_url:
        env = worker_env(
            kafka_bootstrap,
            database_url,
            PIPELINE_HANDLERS=f"{EVENT_TYPE}=tests.support.flaky_handlers:record_effect",
        )
        settings = settings_from_env(env)
        writer = KeyedWriter(OutboxTarget(settings.kafka_events_topic, settings.kafka_partitions))
        worker = WorkerProcess(env, tmp_path / "worker")
        try:
            async with engine_for(env) as engine:
                async with engine.begin() as connection:
                    await connection.execute(text(effects_table_ddl("postgresql")))
                worker.start()
                await wait_healthy([worker])
                await write_for(writer, engine, seconds=2.0)
                written_before = len(writer.written)

                health_seen: list[tuple[int | None, str]] = []
                metrics_seen: list[tuple[int | None, float | None]] = []
                refused: list[tuple[int, Any]] = []
                async with database_unreachable(pg_admin_url, database_url):
                    outage_ends = time.monotonic() + OUTAGE_S
                    while time.monotonic() < outage_ends:
                        status, body = await health(worker)
                        database = body.get("checks", {}).get("database", {})
                        health_seen.append((status, database.get("status", "no answer")))
                        metrics_seen.append(await asyncio.to_thread(_metrics_status, worker))
                        refused.append(
                            await asyncio.to_thread(
                                post_json, f"{worker.base_url}/api/events", _new_event(), 10.0
                            )
                        )
                        await asyncio.sleep(0.5)

                await write_for(writer, engine, seconds=2.0)

            async def drained_and_processed() -> bool:
                [(backlog,)] = await query(
                    database_url,
                    "SELECT count(*) FROM outbox WHERE published = false "
                    "AND dead_lettered_at IS NULL",
                )
                [(effects,)] = await query(
                    database_url, "SELECT count(DISTINCT event_id) FROM handler_effects"
                )
                return backlog == 0 and effects == len(writer.written)

            await wait_until_async(drained_and_processed, timeout=90, message="caught up")
            records = await consume_ids(
                kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], writer.written, timeout=60
            )
            [(effects, distinct)] = await query(
                database_url, "SELECT count(*), count(DISTINCT event_id) FROM handler_effects"
            )
            [(dead_letters,)] = await query(database_url, "SELECT count(*) FROM dead_letters")
            dlq_empty = await topic_is_empty(kafka_bootstrap, env["KAFKA_DLQ_TOPIC"])
            status_after, _ = await health(worker)
            metrics_after = await asyncio.to_thread(_metrics_status, worker)
            log_text = worker.log_text()
            assert worker.is_running(), worker.log_tail()
        finally:
            stop_all([worker])

    report = analyse(records, writer.written, settings.kafka_partitions)
    print(
        f"\ndatabase outage: {written_before} events before, {len(writer.written)} in all; "
        f"health seen {sorted(set(health_seen), key=str)}; metrics {sorted(set(metrics_seen))}; "
        f"POST answers {sorted({status for status, _ in refused})}; "
        f"{report.duplicates} duplicates on the topic"
    )
    assert (None, "no answer") not in health_seen, "the worker stopped answering"
    assert (503, "error") in health_seen, health_seen
    # /api/metrics keeps answering, and says the database is down (the alert's signal).
    assert {status for status, _ in metrics_seen} == {200}, metrics_seen
    assert (200, 0.0) in metrics_seen, metrics_seen
    assert metrics_after == (200, 1.0)
    assert refused and all(status == 503 for status, _ in refused), refused[:3]
    assert all("database" in answer["error"] for _, answer in refused), refused[:3]
    assert not report.missing, f"{len(report.missing)} events lost"
    assert not report.order_violations, report.order_violations[:10]
    assert effects == distinct == len(writer.written)  # each handled once, none twice
    assert dead_letters == 0 and dlq_empty
    assert status_after == 200
    # The on-call reads one warning when it starts and one when it ends, not a traceback per
    # retry (before: ~2,400 log lines a second from the relay alone).
    assert "Outbox relay: database unavailable, retrying until it is back" in log_text
    assert "Outbox relay: database available again after" in log_text
    assert "Traceback" not in log_text, log_text[log_text.find("Traceback") :][:6000]


async def write_for(writer: KeyedWriter, engine: AsyncEngine, seconds: float) -> None:
    """Writers on KEYS for ``seconds``, straight into the database."""
    stop = asyncio.Event()
    writing = asyncio.create_task(keep_writing(stop, writer, KEYS, engine=engine, interval_s=0.02))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(writing, 30)


def _metrics_status(worker: WorkerProcess) -> tuple[int | None, float | None]:
    """GET /api/metrics: its HTTP status and ``database_up``; None if the worker did not
    answer within 10 s (the database check inside takes up to 5)."""
    try:
        with urllib.request.urlopen(f"{worker.base_url}/api/metrics", timeout=10.0) as response:
            text = response.read().decode()
            up = re.search(r"^database_up (\S+)$", text, re.M)
            return int(response.status), float(up.group(1)) if up else None
    except urllib.error.HTTPError as error:
        return int(error.code), None
    except OSError:
        return None, None


async def test_a_database_gone_silent_costs_a_503_and_the_relay_comes_back(
    kafka_bootstrap: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """The connections the worker holds stay open but carry nothing, and new ones do too
    (a partition behind a proxy: no reset ever arrives), until the database answers new
    connections again (the failover is over). Meanwhile a request gets a 503 after
    DATABASE_TIMEOUT_MS instead of never; afterwards requests are stored, and the relay,
    the pipeline and the DLQ agent, having given up the work they were waiting on, carry
    on with new connections."""
    with fresh_database(pg_admin_url) as database_url:
        server = make_url(database_url)
        with TcpProxy(server.host or "127.0.0.1", server.port or 5432) as proxy:
            via_proxy = server.set(host=proxy.listen_host, port=proxy.listen_port)
            env = worker_env(
                kafka_bootstrap,
                via_proxy.render_as_string(hide_password=False),
                DATABASE_TIMEOUT_MS="1000",
                KAFKA_REQUEST_TIMEOUT="6000",
            )
            worker = WorkerProcess(env, tmp_path / "worker")
            accepted: list[str] = []
            answers: list[int] = []
            try:
                worker.start()
                await wait_healthy([worker])
                status, body = await _post_one(worker)
                assert status == 201, body
                accepted.extend(body["ids"])

                proxy.hang()
                for _ in range(2):
                    status, body = await _post_one(worker)
                    answers.append(status)
                    assert status == 503, body
                    assert "send them again" in body["error"], body
                # A dead letter arriving now: the DLQ agent's insert waits on the silence.
                await produce(kafka_bootstrap, env["KAFKA_DLQ_TOPIC"], [(b"k", b"parked", [])])
                await asyncio.sleep(3.0)

                proxy.recover()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    status, body = await _post_one(worker)
                    answers.append(status)
                    if status == 201:
                        accepted.extend(body["ids"])
                        break
                    assert status == 503, body
                records = await consume_ids(
                    kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], accepted, timeout=60
                )

                async def processed_and_parked() -> bool:
                    [(processed, parked)] = await query(
                        database_url,
                        "SELECT (SELECT count(*) FROM processed_events), "
                        "(SELECT count(*) FROM dead_letters)",
                    )
                    return bool(processed == len(accepted) and parked == 1)

                await wait_until_async(
                    processed_and_parked, timeout=60, message="events processed, letter parked"
                )
                log_text = worker.log_text()
            finally:
                stop_all([worker])

    print(f"\nsilent database: POST answers {answers}")
    assert answers[-1] == 201, answers  # fresh connections once the database answers again
    assert {event_id_of(record) for record in records} == set(accepted)
    assert "DatabaseStalledError: storing 1 event(s) did not finish within 1 s" in log_text
    assert "DatabaseStalledError('storing 1 dead letter(s) did not finish within 1 s" in log_text


async def _post_one(worker: WorkerProcess) -> tuple[int, Any]:
    return await asyncio.to_thread(post_json, f"{worker.base_url}/api/events", _new_event(), 30.0)
