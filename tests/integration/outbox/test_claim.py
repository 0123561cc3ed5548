"""The relay's claim statement on real PostgreSQL: the partition lock, rows claimed as
they commit (per key that is commit order; nothing running elsewhere holds them back),
and claims that continue within one transaction."""

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
    store_events,
)
from holdwall_stream.settings import load_settings
from tests.support.pg import fresh_database

# One partition, so every row competes for the same lock and order.
TARGET = OutboxTarget("claim-test", partitions=1)


@pytest.fixture
async def pg(pg_admin_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    with fresh_database(pg_admin_url) as database_url:
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


async def _claim(engine: AsyncEngine, limit: int = 100) -> list[store.ClaimedRow]:
    """One claim in a transaction of its own, committed (so rows stay claimed)."""
    async with engine.connect() as connection, connection.begin():
        return await store.claim_batch(connection, 0, limit)


def _ns(claim: list[store.ClaimedRow]) -> list[int]:
    import json

    return [json.loads(payload)["data"]["n"] for _id, _eid, _key, payload, *_rest in claim]


async def test_rows_are_claimed_in_the_order_their_transactions_commit(
    pg: tuple[str, AsyncEngine],
) -> None:
    """Two transactions write the same key at once: the one with the higher id commits
    first and goes first; the lower id follows once its transaction commits. (A key's
    order is its commit order; writers that serialise on the key also get ids in it.)"""
    _url, engine = pg
    async with AsyncSession(engine) as slow:
        await slow.begin()
        await _write(slow, 1)  # gets the lower id, commits last
        async with AsyncSession(engine) as fast, fast.begin():
            await _write(fast, 2)
        assert _ns(await _claim(engine)) == [2], "committed, so claimed: nothing waits"
        await slow.commit()
    assert _ns(await _claim(engine)) == [1]
    assert _ns(await _claim(engine)) == []


async def test_a_long_transaction_elsewhere_does_not_hold_rows_back(
    pg: tuple[str, AsyncEngine], pg_admin_url: str
) -> None:
    """Open write transactions, in this database and in another one of the cluster (an
    analytics job, a migration), never delay the relay."""
    database_url, engine = pg
    with psycopg.connect(database_url) as here, psycopg.connect(pg_admin_url) as elsewhere:
        here.execute("SELECT pg_current_xact_id()")  # open transactions with an id
        elsewhere.execute("SELECT pg_current_xact_id()")
        async with AsyncSession(engine) as session, session.begin():
            await _write(session, 1)
        assert _ns(await _claim(engine)) == [1]
        here.rollback()
        elsewhere.rollback()


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
        assert _ns(second) == [], "SKIP LOCKED: no wait, no rows"
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


async def _pages(engine: AsyncEngine) -> dict[int, int]:
    """Each outbox row's heap page (block number of its current version)."""
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT id, (ctid::text::point)[0]::int FROM outbox")
        )
        return {row_id: page for row_id, page in result}


async def test_a_claimed_row_stays_on_its_page(pg: tuple[str, AsyncEngine]) -> None:
    """The claim's mark writes a new version of every row. With room left on the page
    (db/models.py, OUTBOX_FILLFACTOR) it goes beside the old one; on full pages every row
    would move to the end of the table, and concurrent claims queue on extending it."""
    _url, engine = pg
    async with AsyncSession(engine) as session, session.begin():
        await store_events(session, [_event(n) for n in range(1000)], TARGET)
    before = await _pages(engine)

    assert len(await _claim(engine, limit=1000)) == 1000

    after = await _pages(engine)
    moved = sorted(row_id for row_id, page in before.items() if after[row_id] != page)
    # A few may not fit: the new version carries published_at.
    assert len(moved) <= len(before) // 20, f"{len(moved)} of {len(before)} rows moved"
