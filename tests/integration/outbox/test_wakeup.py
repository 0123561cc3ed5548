"""The relay's LISTEN connection against real PostgreSQL: a commit wakes the partitions it
wrote, and a connection that is dropped, or that silently stops carrying anything, is
replaced (with a wake-up of every partition, for what was written meanwhile)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.outbox.wakeup import listen_for_outbox_writes
from holdwall_stream.outbox.writer import NewEvent, OutboxTarget, partition_for_key, store_events
from holdwall_stream.settings import async_database_url, load_settings
from tests.support.pg import fresh_database
from tests.support.processes import wait_until_async
from tests.support.tcp_proxy import TcpProxy

TARGET = OutboxTarget("wakeup-test", partitions=6)
Wakes = list[frozenset[int] | None]


@pytest.fixture
async def database_url(pg_admin_url: str) -> AsyncIterator[str]:
    with fresh_database(pg_admin_url) as url:
        engine = create_engine(load_settings(database_url=url))
        try:
            await init_schema(engine)
        finally:
            await engine.dispose()
        yield url


@contextlib.asynccontextmanager
async def listening(url: str, **options: Any) -> AsyncIterator[Wakes]:
    """The listener on ``url`` in a task; yields the wake-ups it made, in order."""
    wakes: Wakes = []

    def wake(partitions: Collection[int] | None) -> None:
        wakes.append(None if partitions is None else frozenset(partitions))

    task = asyncio.create_task(listen_for_outbox_writes(async_database_url(url), wake, **options))
    try:
        await wait_until_async(lambda: wakes, timeout=10, message="the listener's first wake-up")
        yield wakes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def write(url: str, keys: list[str]) -> set[int]:
    """Commits one event per key; returns the partitions written."""
    engine = create_engine(load_settings(database_url=url))
    try:
        async with AsyncSession(engine) as session, session.begin():
            await store_events(
                session, [NewEvent(type="wake.test", aggregate_id=k, data={}) for k in keys], TARGET
            )
    finally:
        await engine.dispose()
    return {partition_for_key(k.encode(), TARGET.partitions) for k in keys}


async def test_a_commit_wakes_the_partitions_it_wrote(database_url: str) -> None:
    async with listening(database_url) as wakes:
        assert wakes == [None]  # on connecting: everything, for what came before
        written = await write(database_url, ["a", "b", "c"])
        await wait_until_async(lambda: len(wakes) == 2, timeout=10, message="a wake-up")
        assert wakes[1] == written
        assert 0 < len(written) < TARGET.partitions  # a subset, not "all"


async def test_a_dropped_connection_is_replaced_and_wakes_everything(database_url: str) -> None:
    async with listening(database_url, reconnect_delay_s=0.1) as wakes:
        name = make_url(database_url).database
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND query LIKE 'LISTEN%%'",
                (name,),
            )
        await wait_until_async(lambda: len(wakes) == 2, timeout=10, message="a reconnect")
        assert wakes == [None, None]
        written = await write(database_url, ["d"])
        await wait_until_async(lambda: len(wakes) == 3, timeout=10, message="a wake-up")
        assert wakes[2] == written


async def test_a_connection_gone_silent_is_replaced(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No reset ever arrives across a partition: without the check the listener would wait
    for TCP to give up (hours), and every write would wait for the poll meanwhile."""
    url = make_url(database_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        via_proxy = url.set(host=proxy.listen_host, port=proxy.listen_port)
        via_proxy_url = via_proxy.render_as_string(hide_password=False)
        with caplog.at_level(logging.WARNING, logger="holdwall_stream.outbox.wakeup"):
            async with listening(
                via_proxy_url, quiet_check_s=0.3, liveness_timeout_s=1.0, reconnect_delay_s=0.1
            ) as wakes:
                proxy.silence()
                await wait_until_async(
                    lambda: len(wakes) == 2, timeout=20, message="a reconnect past the silence"
                )
                written = await write(database_url, ["e"])
                await wait_until_async(lambda: len(wakes) == 3, timeout=10, message="a wake-up")
                assert wakes[2] == written
    messages = [r.getMessage() for r in caplog.records]
    assert any("Outbox LISTEN connection unavailable" in m for m in messages), messages
    assert any("Outbox LISTEN connection available again" in m for m in messages), messages


async def test_reconnecting_to_a_server_that_never_answers_gives_up_and_tries_again(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without libpq's connect_timeout the first reconnect would wait for the server's
    first word forever, and no later one would ever be tried."""
    url = make_url(database_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        via_proxy = url.set(host=proxy.listen_host, port=proxy.listen_port)
        with caplog.at_level(logging.WARNING, logger="holdwall_stream.outbox.wakeup"):
            async with listening(
                via_proxy.render_as_string(hide_password=False),
                connect_options={"connect_timeout": 2},
                quiet_check_s=0.3,
                liveness_timeout_s=1.0,
                reconnect_delay_s=0.1,
            ):
                proxy.hang()
                await wait_until_async(
                    lambda: proxy.connections_accepted >= 4,
                    timeout=30,
                    message="reconnect attempts, each given up after connect_timeout",
                )
    unavailable = [r for r in caplog.records if "LISTEN connection unavailable" in r.getMessage()]
    assert len(unavailable) == 1, [r.getMessage() for r in caplog.records]  # once, not per try
