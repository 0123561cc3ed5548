"""Async engines for PostgreSQL (psycopg) and SQLite (aiosqlite), configured for the relay."""

from __future__ import annotations

import math
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from holdwall_stream.settings import Settings

SQLITE_BUSY_TIMEOUT_S = 30
# libpq waits at least 2 s for a connection, whatever connect_timeout says.
LIBPQ_MIN_CONNECT_TIMEOUT_S = 2
KEEPALIVE_PROBES = 3


def create_engine(settings: Settings, **engine_options: Any) -> AsyncEngine:
    url = settings.async_database_url
    if settings.database_dialect == "sqlite":
        engine = create_async_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **engine_options
        )
        _serialise_sqlite_writers(engine)
        return engine
    options: dict[str, Any] = {
        "pool_size": 10,
        "max_overflow": 10,
        "pool_pre_ping": True,
        "connect_args": silent_server_timeouts(settings),
    }
    options.update(engine_options)
    return create_async_engine(url, **options)


def silent_server_timeouts(settings: Settings) -> dict[str, int]:
    """libpq options that give up on a PostgreSQL server which stops answering.

    libpq waits forever by default: for a server that accepts the connection and says
    nothing (an overloaded or half-dead host, a proxy whose backend is gone), and for one
    that vanished mid-query (a failover without a reset) until the kernel gives up,
    ~15 minutes. Meanwhile the worker would neither start, fail nor relay.
    DATABASE_TIMEOUT_MS bounds connecting, and how long sent data or a keepalive probe
    may stay unacknowledged; a connection idle that long is probed. Options the
    DATABASE_URL sets itself win.
    """
    timeout_ms = settings.database_timeout_ms
    timeout_s = max(LIBPQ_MIN_CONNECT_TIMEOUT_S, math.ceil(timeout_ms / 1000))
    options = {
        "connect_timeout": timeout_s,
        "keepalives": 1,
        "keepalives_idle": timeout_s,
        "keepalives_interval": max(1, timeout_s // KEEPALIVE_PROBES),
        "keepalives_count": KEEPALIVE_PROBES,
        "tcp_user_timeout": timeout_ms,
    }
    chosen_in_url = make_url(settings.async_database_url).query
    return {name: value for name, value in options.items() if name not in chosen_in_url}


def _serialise_sqlite_writers(engine: AsyncEngine) -> None:
    """Every SQLite transaction starts with BEGIN IMMEDIATE.

    SQLite has one writer at a time anyway; taking the write lock up front makes the relay's
    claim-produce-mark transaction the mutex that lets one worker relay while the others
    stand by, and it turns lock upgrades (which fail with SQLITE_BUSY at once) into waits.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def psycopg_connection(connection: AsyncConnection) -> psycopg.AsyncConnection[Any]:
    """The driver connection under a PostgreSQL SQLAlchemy connection, in the transaction
    SQLAlchemy began: for hot paths that pass arrays or read binary results directly."""
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, psycopg.AsyncConnection):
        raise TypeError(f"expected a psycopg connection, got {type(driver).__name__}")
    return driver
