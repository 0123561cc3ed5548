"""The relay's claim statement on real PostgreSQL: the partition lock, the transaction
horizon (a lower id committed later is never overtaken), the held-back signal, and
claims that continue within one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.outbox import store
from holdwall_stream.outbox.writer import (
    NewEvent,
    OutboxTarget,
    partition_for_key,
    store_events,
)
from holdwall_stream.settings import load_settings
from tests.support.relay_harness import fresh_pg_database

# One partition, so every row competes for the same lock and order.
TARGET = OutboxTarget("claim-test", partitions=1)


@pytest.fixture
async def pg(pg_admin_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    with fresh_pg_database(pg_admin_url) as database_url:
        engine = create_engine(load_settings(database_url=database_url))
        await init_schema(engine)
        async with engine.begin() as connection:
            await store.ensure_relay_locks(connection, TARGET.partitions)
        try:
            yield database_url, engine
        finally:
            await engine.dispose()


def _event(n: int) -> NewEvent:
    return NewEvent(type="claim.test", aggregate_id="key", data={"n": n})


async def _write(session: AsyncSession, n: int) -> None:
    await store_events(session, [_event(n)], TARGET)


async def _claim(engine: AsyncEngine, limit: int = 100) -> store.Claim:
    """One claim in a transaction of its own, committed (so rows stay claimed)."""
    async with engine.connect() as connection, connection.begin():
        return await store.claim_batch(connection, 0, limit)


def _ns(claim: store.Claim) -> list[int]:
    import json

    return [json.loads(row.payload)["data"]["n"] for row in claim]


async def test_a_lower_id_committed_later_is_not_overtaken(
    pg: tuple[str, AsyncEngine],
) -> None:
    _url, engine = pg
    async with AsyncSession(engine) as slow:
        await slow.begin()
        await _write(slow, 1)  # gets the lower id, commits last
        async with AsyncSession(engine) as fast, fast.begin():
            await _write(fast, 2)

        claim = await _claim(engine)
        assert _ns(claim) == [], "the higher id must wait for the lower one's transaction"
        assert claim.held_back, "and the relay must be told to look again by itself"

        await slow.commit()
    claim = await _claim(engine)
    assert _ns(claim) == [1, 2]
    assert not claim.held_back


async def test_any_older_running_transaction_holds_rows_back(
    pg: tuple[str, AsyncEngine],
) -> None:
    database_url, engine = pg
    with psycopg.connect(database_url) as other:
        other.execute("SELECT pg_current_xact_id()")  # an open transaction with an id
        async with AsyncSession(engine) as session, session.begin():
            await _write(session, 1)
        claim = await _claim(engine)
        assert (_ns(claim), claim.held_back) == ([], True)
        other.rollback()
    claim = await _claim(engine)
    assert (_ns(claim), claim.held_back) == ([1], False)


async def test_a_partition_locked_by_another_relay_claims_nothing(
    pg: tuple[str, AsyncEngine],
) -> None:
    _url, engine = pg
    async with AsyncSession(engine) as session, session.begin():
        for n in range(3):
            await _write(session, n)
    async with engine.connect() as first, first.begin():
        held = await store.claim_batch(first, 0, 2)
        assert _ns(held) == [0, 1]
        second = await _claim(engine)
        assert _ns(second) == [] and not second.held_back, "SKIP LOCKED: no wait, no rows"
    assert _ns(await _claim(engine)) == [2]


async def test_claims_in_one_transaction_take_the_following_rows(
    pg: tuple[str, AsyncEngine],
) -> None:
    _url, engine = pg
    async with AsyncSession(engine) as session, session.begin():
        for n in range(5):
            await _write(session, n)
    async with engine.connect() as connection, connection.begin():
        first = await store.claim_batch(connection, 0, 2)
        second = await store.claim_batch(connection, 0, 2)
        third = await store.claim_batch(connection, 0, 2)
    assert (_ns(first), _ns(second), _ns(third)) == ([0, 1], [2, 3], [4])
    async with engine.connect() as connection:
        published = await connection.scalar(text("SELECT count(*) FROM outbox WHERE published"))
    assert published == 5


async def test_transactions_of_other_databases_do_not_hold_rows_back(
    pg: tuple[str, AsyncEngine], pg_admin_url: str
) -> None:
    """Another database's transactions can never add rows to this outbox (the horizon is
    per database, although transaction ids are cluster-wide)."""
    _url, engine = pg
    with psycopg.connect(pg_admin_url) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")  # open, in the admin database
        async with AsyncSession(engine) as session, session.begin():
            await _write(session, 1)
        claim = await _claim(engine)
        assert (_ns(claim), claim.held_back) == ([1], False)
        elsewhere.rollback()


async def test_other_relay_transactions_do_not_hold_rows_back(
    pg: tuple[str, AsyncEngine],
) -> None:
    """A relay transaction never adds outbox rows: one draining another partition (here,
    one that is still open after its claim) must not delay this partition's rows."""
    database_url, engine = pg
    two = OutboxTarget(TARGET.topic, partitions=2)
    async with engine.begin() as connection:
        await store.ensure_relay_locks(connection, 2)
    keys: dict[int, str] = {}
    for n in range(50):  # a key for each partition
        keys.setdefault(partition_for_key(f"key-{n}".encode(), 2), f"key-{n}")
    async with AsyncSession(engine) as session, session.begin():
        await store_events(session, [NewEvent(type="t", aggregate_id=keys[1], data={"n": 0})], two)
    async with engine.connect() as relay_one, relay_one.begin():
        assert len(await store.claim_batch(relay_one, 1, 10)) == 1  # open, holding an id
        async with AsyncSession(engine) as session, session.begin():
            await store_events(
                session, [NewEvent(type="t", aggregate_id=keys[0], data={"n": 1})], two
            )
        async with engine.connect() as relay_zero, relay_zero.begin():
            claim = await store.claim_batch(relay_zero, 0, 10)
        assert (_ns(claim), claim.held_back) == ([1], False)
    with psycopg.connect(database_url, autocommit=True) as check:
        names = check.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND datname = current_database()",
            (store.RELAY_APPLICATION_NAME,),
        ).fetchone()
    assert names == (0,), "the relay's name lasts for its transaction only"


async def test_a_further_claim_never_passes_a_row_still_being_written(
    pg: tuple[str, AsyncEngine],
) -> None:
    """A row of key K is still being written (lower id) while an older transaction commits
    a higher id, which the relay's first claim takes; then K's writer commits and K's next
    event follows. The relay's second claim in the same transaction must take both, in
    order: had it started after the first claim's last id, K's second event would have
    overtaken its first."""
    database_url, engine = pg
    with psycopg.connect(database_url) as older:
        older.execute("SELECT pg_current_xact_id()")  # the oldest transaction
        async with AsyncSession(engine) as writing_k:
            await writing_k.begin()
            await store_events(writing_k, [_keyed("K", 1)], TARGET)  # lower id, open
            # the older transaction adds a row with a higher id and commits first
            older.execute(
                "INSERT INTO outbox (event_id, topic, partition, key, payload, headers) "
                "VALUES (gen_random_uuid(), 'claim-test', 0, 'Z', "
                "convert_to('{\"data\": {\"n\": 100}}', 'UTF8'), '{}')"
            )
            older.commit()
            async with engine.connect() as relay, relay.begin():
                first = await store.claim_batch(relay, 0, 100)
                assert _ns(first) == [100]
                await writing_k.commit()
                async with AsyncSession(engine) as session, session.begin():
                    await store_events(session, [_keyed("K", 2)], TARGET)
                second = await store.claim_batch(relay, 0, 100)
    assert _ns(second) == [1, 2], "K's first event must not be overtaken by its second"


def _keyed(key: str, n: int) -> NewEvent:
    return NewEvent(type="claim.test", aggregate_id=key, data={"n": n})


async def test_a_row_published_under_a_claim_statement_is_not_claimed_again(
    pg: tuple[str, AsyncEngine],
) -> None:
    """The claim takes the partition lock after its snapshot, so a relay that committed
    just before may have published rows that this snapshot still sees unpublished. The
    UPDATE must re-check them on their latest version (here: the claim waits on a row
    another transaction is publishing, which then commits) instead of publishing twice."""
    database_url, engine = pg
    async with AsyncSession(engine) as session, session.begin():
        for n in range(3):
            await _write(session, n)
    with psycopg.connect(database_url) as other_relay:
        other_relay.execute(
            "UPDATE outbox SET published = true, published_at = now() "
            "WHERE id = (SELECT min(id) FROM outbox)"
        )
        claiming = asyncio.create_task(_claim(engine))
        await asyncio.sleep(0.5)  # the claim is now waiting for that row's lock
        assert not claiming.done()
        other_relay.commit()
        claim = await asyncio.wait_for(claiming, 10)
    assert _ns(claim) == [1, 2], "row 0 was published by the other transaction"
