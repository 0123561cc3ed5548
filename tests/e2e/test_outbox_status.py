"""`holdwall-stream outbox status`: what the relay has left, read from a real database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.outbox import store
from holdwall_stream.outbox.writer import NewEvent, OutboxTarget, store_events
from holdwall_stream.settings import load_settings
from tests.support.pipeline import run_cli

pytestmark = pytest.mark.e2e

PARTITIONS = 3


async def test_backlog_per_partition_head_row_and_last_publication(database_url: str) -> None:
    engine = create_engine(load_settings(database_url=database_url))
    try:
        await init_schema(engine)
        async with AsyncSession(engine) as session, session.begin():
            events = [
                NewEvent.model_validate({"type": "t", "aggregate_id": f"key-{i}", "data": {}})
                for i in range(30)
            ]
            await store_events(session, events, OutboxTarget("events", PARTITIONS))
        async with engine.begin() as connection:  # the relay published partition 0's first 4
            await store.ensure_relay_locks(connection, PARTITIONS)
            published = await store.claim_batch(connection, 0, 4)
        assert len(published) == 4
        head_1, parked = await _head(engine, 1), await _head(engine, 2)
        async with engine.begin() as connection:  # partition 1's head failed twice
            await store.record_failure(connection, [head_1], "KafkaTimeoutError: no ack")
            await store.record_failure(connection, [head_1], "KafkaTimeoutError: no ack")
            await store.mark_dead_lettered(connection, parked, "too large")
        async with engine.connect() as connection:
            expected = {
                p.partition: p.unpublished for p in await store.partition_backlogs(connection)
            }
    finally:
        await engine.dispose()

    env = {"DATABASE_URL": database_url}
    shown = run_cli(env, "outbox", "status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["unpublished"] == 30 - len(published) - 1
    assert status["dead_lettered"] == 1
    assert 0 <= status["last_published_age_s"] < 60
    assert 0 <= status["oldest_unpublished_age_s"] < 60
    rows = {p["partition"]: p for p in status["partitions"]}
    assert {p: row["unpublished"] for p, row in rows.items()} == expected
    assert sum(expected.values()) == status["unpublished"]
    assert rows[1]["head_id"] == head_1
    assert rows[1]["head_attempts"] == 2
    assert rows[1]["head_last_error"] == "KafkaTimeoutError: no ack"
    assert rows[2]["head_id"] != parked  # a parked row no longer blocks its partition

    text = run_cli(env, "outbox", "status")
    assert text.returncode == 0, text.stderr
    assert f"#{head_1} (2, KafkaTimeoutError: no ack)" in text.stdout
    assert f"{status['unpublished']:,} unpublished in all" in text.stdout
    assert "1 row(s) dead-lettered as too large" in text.stdout


async def test_an_unreachable_database_is_one_line_and_exit_3() -> None:
    shown = run_cli(
        {"DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/none"}, "outbox", "status"
    )
    assert shown.returncode == 3
    assert shown.stderr.count("\n") == 1 and "cannot reach the database" in shown.stderr
    assert "secret" not in shown.stderr


async def _head(engine: AsyncEngine, partition: int) -> int:
    async with engine.connect() as connection:
        return int(
            await connection.scalar(
                text(
                    "SELECT min(id) FROM outbox WHERE partition = :p AND published = false "
                    "AND dead_lettered_at IS NULL"
                ),
                {"p": partition},
            )
        )


async def test_a_database_without_the_schema_is_one_line(tmp_path: Path) -> None:
    shown = run_cli({"DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}, "outbox", "status")
    assert shown.returncode == 1
    assert shown.stderr.count("\n") == 1, shown.stderr
    assert "no outbox table" in shown.stderr and "holdwall-stream db init" in shown.stderr
