"""A worker restarted in the same directory comes back with its state: the lag table from
RocksDB and its changelog (served before any new sample is taken), and the dedupe state
(events processed before the restart and delivered again are not processed again)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from holdwall_stream.settings import async_database_url
from tests.support.flaky_handlers import effects_table_ddl
from tests.support.pipeline import (
    as_message,
    assigned_partitions,
    consumer_check,
    event,
    processed_ids,
    produce,
    scalar,
)
from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.worker_env import worker_env

pytestmark = pytest.mark.e2e

EVENT_TYPE = "restart.event"
TIMEOUT_S = 90.0
NEVER_MS = str(3_600_000)  # no lag sample during the test: only restored entries can show


async def create_effects_table(database_url: str) -> None:
    engine = create_async_engine(async_database_url(database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(text(effects_table_ddl(engine.dialect.name)))
    finally:
        await engine.dispose()


def lag_entries(worker: WorkerProcess) -> list[dict[str, Any]]:
    try:
        return list(consumer_check(worker)["lag"]["partitions"])
    except (OSError, AssertionError, KeyError, TypeError):
        return []


async def test_lag_and_dedupe_state_survive_a_restart(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    await create_effects_table(database_url)
    env = worker_env(
        kafka_bootstrap,
        database_url,
        PIPELINE_HANDLERS=f"{EVENT_TYPE}=tests.support.flaky_handlers:record_effect",
        LAG_REFRESH_INTERVAL_MS="300",
    )
    topic = env["KAFKA_EVENTS_TOPIC"]
    workdir = tmp_path / "worker"  # both runs: same directory, so the same RocksDB data
    sent = [event(EVENT_TYPE, f"order-{i % 7}", seq=i) for i in range(300)]

    with WorkerProcess(env, workdir) as worker:
        await worker.wait_for_http_async("/api/health", timeout=TIMEOUT_S, status={200})
        await produce(kafka_bootstrap, topic, map(as_message, sent))

        async def all_processed() -> bool:
            return len(await processed_ids(database_url)) == len(sent)

        await wait_until_async(all_processed, timeout=TIMEOUT_S, message="first run processed")

        def lag_caught_up() -> bool:
            entries = lag_entries(worker)
            return len(entries) == 3 and sum(e["committed_offset"] for e in entries) == len(sent)

        await wait_until_async(lag_caught_up, timeout=TIMEOUT_S, message="lag samples stored")
        before = {e["partition"]: e for e in lag_entries(worker)}
    assert worker.returncode == 0, worker.log_tail()
    restarted_at = time.time()

    second = WorkerProcess({**env, "LAG_REFRESH_INTERVAL_MS": NEVER_MS}, workdir)
    with second:
        await second.wait_for_http_async("/api/health", timeout=TIMEOUT_S, status={200})
        await wait_until_async(
            lambda: len(lag_entries(second)) == 3, timeout=TIMEOUT_S, message="restored lag"
        )
        restored = {e["partition"]: e for e in lag_entries(second)}
        assert set(restored) == {0, 1, 2}
        for partition, entry in restored.items():
            assert entry["updated_at"] < restarted_at, entry
            assert entry["committed_offset"] == before[partition]["committed_offset"]
            assert entry["topic"] == topic
        assert consumer_check(second)["lag"]["total"] == sum(e["lag"] for e in restored.values())

        # The same events again (a producer retry, a replay): not processed a second time.
        await wait_until_async(lambda: assigned_partitions(second) == {0, 1, 2}, timeout=60)
        await produce(kafka_bootstrap, topic, map(as_message, sent))
        await wait_until_async(
            lambda: consumer_check(second)["events_consumed"] >= len(sent),
            timeout=TIMEOUT_S,
            message="redelivered events consumed",
        )
        assert int(await scalar(database_url, "SELECT count(*) FROM processed_events")) == 300
        assert int(await scalar(database_url, "SELECT count(*) FROM handler_effects")) == 300

        # ... and new ones still are.
        fresh = [event(EVENT_TYPE, "order-new", seq=1000 + i) for i in range(5)]
        await produce(kafka_bootstrap, topic, map(as_message, fresh))

        async def fresh_processed() -> bool:
            return {str(e.id) for e in fresh} <= set(await processed_ids(database_url))

        await wait_until_async(fresh_processed, timeout=TIMEOUT_S, message="new events processed")
        assert int(await scalar(database_url, "SELECT count(*) FROM handler_effects")) == 305
        # Still no new sample: what the table shows is what the first run stored.
        assert all(e["updated_at"] < restarted_at for e in lag_entries(second))
