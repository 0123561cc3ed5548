"""The stall deadline tells its own expiry from a timeout raised inside the work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from holdwall_stream.db.deadline import not_counted, stall_deadline
from holdwall_stream.errors import DatabaseStalledError


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_work_past_the_deadline_is_cancelled_and_named(engine: AsyncEngine) -> None:
    cancelled = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(DatabaseStalledError) as raised:
        async with stall_deadline(engine, 0.05, "the test's work", "TEST_TIMEOUT_MS"):
            await hang()
    assert cancelled.is_set()
    assert str(raised.value).startswith(
        "the test's work did not finish within 0.05 s (TEST_TIMEOUT_MS)"
    )
    async with engine.connect() as connection:  # the pool started afresh and still serves
        assert await connection.scalar(text("SELECT 1")) == 1


async def test_a_timeout_inside_the_work_is_not_a_stall(engine: AsyncEngine) -> None:
    with pytest.raises(TimeoutError) as raised:
        async with stall_deadline(engine, 60, "the test's work", "TEST_TIMEOUT_MS"):
            raise TimeoutError("the broker did not acknowledge")
    assert not isinstance(raised.value, DatabaseStalledError)
    assert str(raised.value) == "the broker did not acknowledge"


async def test_work_within_the_deadline_or_without_one_runs_to_the_end(
    engine: AsyncEngine,
) -> None:
    for seconds in (60, None):
        async with stall_deadline(engine, seconds, "the test's work", "TEST_TIMEOUT_MS"):
            await asyncio.sleep(0.01)
            async with engine.connect() as connection:
                assert await connection.scalar(text("SELECT 2")) == 2


async def test_a_stretch_not_counted_does_not_use_up_the_deadline(engine: AsyncEngine) -> None:
    async with stall_deadline(engine, 0.5, "the test's work", "TEST_TIMEOUT_MS") as deadline:
        await asyncio.sleep(0.05)
        with not_counted(deadline):
            await asyncio.sleep(0.7)  # a handler's time: longer than the whole deadline
        await asyncio.sleep(0.05)  # well within what was left


async def test_time_outside_the_stretch_still_counts(engine: AsyncEngine) -> None:
    with pytest.raises(DatabaseStalledError):
        async with stall_deadline(engine, 0.2, "the test's work", "TEST_TIMEOUT_MS") as deadline:
            await asyncio.sleep(0.1)
            with not_counted(deadline):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
