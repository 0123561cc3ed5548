"""Several workers on PostgreSQL: partitions split between them, a stopped or SIGKILLed
worker's partitions move to the others, and every event takes effect exactly once, in
order per key.

Effects are counted twice: processed_events (a primary key, so it cannot show a double)
and a side table the handler ``tests.support.flaky_handlers:record_effect`` inserts into
in the batch's transaction, with no unique key: an event applied twice would show there.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from holdwall_stream.settings import async_database_url
from tests.support.flaky_handlers import effects_table_ddl
from tests.support.pipeline import (
    as_message,
    assigned_partitions,
    database,
    event,
    processed_ids,
    produce,
    scalar,
    split_evenly,
)
from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.worker_env import query, worker_env

pytestmark = pytest.mark.e2e

EVENT_TYPE = "scale.event"
KEYS = 50
TIMEOUT_S = 120.0


@pytest.fixture
def pg_url(pg_admin_url: str, tmp_path: Path) -> Iterator[str]:
    with database("postgresql", pg_admin_url, tmp_path) as url:
        yield url


async def create_effects_table(database_url: str) -> None:
    engine = create_async_engine(async_database_url(database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(text(effects_table_ddl("postgresql")))
    finally:
        await engine.dispose()


def scale_env(kafka_bootstrap: str, database_url: str, partitions: int) -> dict[str, str]:
    return worker_env(
        kafka_bootstrap,
        database_url,
        KAFKA_PARTITIONS=str(partitions),
        PIPELINE_HANDLERS=f"{EVENT_TYPE}=tests.support.flaky_handlers:record_effect",
        LAG_REFRESH_INTERVAL_MS="1000",
    )


def start_workers(env: dict[str, str], root: Path, count: int) -> list[WorkerProcess]:
    return [WorkerProcess(env, root / f"worker-{i}").start() for i in range(count)]


async def wait_split(workers: list[WorkerProcess], partitions: int) -> list[set[int]]:
    def split() -> bool:
        for worker in workers:
            if not worker.is_running():
                raise AssertionError(f"{worker} died:\n{worker.log_tail()}")
        return split_evenly(workers, partitions)

    await wait_until_async(
        lambda: asyncio.to_thread(split),
        timeout=TIMEOUT_S,
        interval=0.5,
        message=f"{partitions} partitions split between {len(workers)} workers",
    )
    return [assigned_partitions(w) for w in workers]


def events(count: int, first_seq: int = 0) -> list:  # type: ignore[type-arg]
    return [
        event(EVENT_TYPE, f"key-{(first_seq + i) % KEYS}", seq=first_seq + i) for i in range(count)
    ]


async def wait_processed(database_url: str, expected: int) -> None:
    async def done() -> bool:
        count = await scalar(database_url, "SELECT count(*) FROM processed_events")
        return int(count) >= expected

    await wait_until_async(done, timeout=TIMEOUT_S, interval=0.2, message=f"{expected} processed")


async def assert_exactly_once_in_order(database_url: str, sent: list) -> None:  # type: ignore[type-arg]
    ids = sorted(str(e.id) for e in sent)
    assert sorted(await processed_ids(database_url)) == ids
    effects = await query(
        database_url, "SELECT event_id, aggregate_id, seq FROM handler_effects ORDER BY id"
    )
    applied: dict[str, int] = defaultdict(int)
    for event_id, _, _ in effects:
        applied[event_id] += 1
    twice = {event_id: n for event_id, n in applied.items() if n > 1}
    assert not twice, f"{len(twice)} events applied more than once"
    assert sorted(applied) == ids, "an event without its effect"
    by_key: dict[str, list[int]] = defaultdict(list)
    for _, key, seq in effects:
        by_key[key].append(seq)
    out_of_order = {key: seqs for key, seqs in by_key.items() if seqs != sorted(seqs)}
    assert not out_of_order, f"effects out of order for keys {sorted(out_of_order)}"


async def test_sigkill_of_one_of_two_workers_mid_stream_applies_every_event_once(
    kafka_bootstrap: str, pg_url: str, tmp_path: Path
) -> None:
    partitions = 4
    await create_effects_table(pg_url)
    env = scale_env(kafka_bootstrap, pg_url, partitions)
    workers = start_workers(env, tmp_path, 2)
    try:
        for worker in workers:
            await worker.wait_for_http_async("/api/health", timeout=90, status={200})
        held = await wait_split(workers, partitions)
        assert held[0].isdisjoint(held[1])

        sent = events(12_000)
        await produce(kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], map(as_message, sent))
        await wait_processed(pg_url, len(sent) // 4)
        victim, survivor = workers
        victim.kill()  # SIGKILL: no revocation, no commit, its transaction dies with it
        before = int(await scalar(pg_url, "SELECT count(*) FROM processed_events"))
        print(f"killed worker {victim.web_port} with {before}/{len(sent)} processed")
        assert before < len(sent), "the stream ended before the kill: make it longer"

        await wait_processed(pg_url, len(sent))
        # The survivor's health may still show a rebalance in progress: wait for it to end.
        await wait_until_async(
            lambda: asyncio.to_thread(
                lambda: assigned_partitions(survivor) == set(range(partitions))
            ),
            timeout=TIMEOUT_S,
        )
        await assert_exactly_once_in_order(pg_url, sent)
    finally:
        for worker in workers:
            worker.stop()


async def test_partitions_split_and_move_when_a_worker_stops(
    kafka_bootstrap: str, pg_url: str, tmp_path: Path
) -> None:
    partitions = 6
    await create_effects_table(pg_url)
    env = scale_env(kafka_bootstrap, pg_url, partitions)
    workers = start_workers(env, tmp_path, 3)
    try:
        for worker in workers:
            await worker.wait_for_http_async("/api/health", timeout=90, status={200})
        held = await wait_split(workers, partitions)
        assert sum(len(h) for h in held) == partitions

        first = events(3000)
        await produce(kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], map(as_message, first))
        await wait_processed(pg_url, len(first))
        workers_of = await query(pg_url, "SELECT DISTINCT worker FROM handler_effects")
        assert len(workers_of) == 3, "every worker took part"

        # Stop one while the next events stream in: its partitions move, mid-stream.
        second = events(6000, first_seq=len(first))
        sending = asyncio.ensure_future(
            produce(kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], map(as_message, second))
        )
        leaving = workers[2]
        await asyncio.to_thread(leaving.stop)
        assert leaving.returncode is not None
        await sending
        remaining = workers[:2]
        await wait_split(remaining, partitions)

        await wait_processed(pg_url, len(first) + len(second))
        await assert_exactly_once_in_order(pg_url, first + second)
    finally:
        for worker in workers:
            worker.stop()
