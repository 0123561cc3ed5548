"""The schema on real PostgreSQL and SQLite: idempotent, safe under concurrent starts, and
tables/*.sql builds exactly what the models build."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.models import OUTBOX_FILLFACTOR, Base
from holdwall_stream.db.schema import DDL_FILES, TABLES_DIR, init_schema
from holdwall_stream.settings import load_settings
from tests.support.pg import fresh_database


def _engine(database_url: str) -> AsyncEngine:
    return create_engine(load_settings(database_url=database_url))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = _engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def other_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second empty database of the same dialect as ``database_url``."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/other.db"
        return
    with fresh_database(make_url(database_url).set(database="postgres")) as url:
        yield url


def _describe(connection: Connection) -> dict[str, Any]:
    """Tables, columns (type, nullability, default), keys, indexes and table options (e.g.
    PostgreSQL's fillfactor), as reflected."""
    inspector = inspect(connection)
    schema: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        columns = {
            column["name"]: (str(column["type"]), column["nullable"], column.get("default"))
            for column in inspector.get_columns(table)
        }
        indexes = {
            index["name"]: (tuple(index["column_names"]), bool(index["unique"]))
            for index in inspector.get_indexes(table)
            if not index.get("duplicates_constraint")
        }
        unique = sorted(
            tuple(constraint["column_names"])
            for constraint in inspector.get_unique_constraints(table)
        )
        primary_key = tuple(inspector.get_pk_constraint(table)["constrained_columns"])
        schema[table] = {
            "columns": columns,
            "primary_key": primary_key,
            "indexes": indexes,
            "unique": unique,
            "options": inspector.get_table_options(table),
        }
    return schema


async def _schema_of(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as connection:
        return await connection.run_sync(_describe)


def _model_tables() -> dict[str, Any]:
    return {
        name: {
            "columns": sorted(column.name for column in table.columns),
            "primary_key": tuple(column.name for column in table.primary_key.columns),
            "indexes": sorted(index.name or "" for index in table.indexes),
        }
        for name, table in Base.metadata.tables.items()
    }


def _model_options(dialect: str) -> dict[str, Any]:
    """The table options the models declare for ``dialect``, as the inspector reports them."""
    declared = {}
    for name, table in Base.metadata.tables.items():
        with_ = table.dialect_options["postgresql"]["with"] if dialect == "postgresql" else None
        declared[name] = (
            {"postgresql_with": {key: str(value) for key, value in with_.items()}} if with_ else {}
        )
    return declared


def _as_model_view(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "columns": sorted(table["columns"]),
            "primary_key": table["primary_key"],
            "indexes": sorted(table["indexes"]),
        }
        for name, table in schema.items()
    }


def _statements(dialect: str) -> list[str]:
    text = (TABLES_DIR / DDL_FILES[dialect]).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    return [statement.strip() for statement in body.split(";\n") if statement.strip()]


async def test_init_schema_is_idempotent(engine: AsyncEngine) -> None:
    await init_schema(engine)
    first = await _schema_of(engine)
    await init_schema(engine)
    assert await _schema_of(engine) == first
    assert _as_model_view(first) == _model_tables()
    assert {name: table["options"] for name, table in first.items()} == _model_options(
        engine.dialect.name
    )


async def test_concurrent_init_schema_on_postgresql(pg_admin_url: str) -> None:
    with fresh_database(pg_admin_url) as database_url:
        engines = [_engine(database_url) for _ in range(3)]
        try:
            for _ in range(2):  # on an empty database, then on a complete one
                await asyncio.gather(*(init_schema(engine) for engine in engines))
                assert set((await _schema_of(engines[0])).keys()) == set(Base.metadata.tables)
        finally:
            await asyncio.gather(*(engine.dispose() for engine in engines))


async def test_tables_sql_executes_and_matches_the_models(
    engine: AsyncEngine, other_database_url: str
) -> None:
    dialect = engine.dialect.name
    async with engine.begin() as connection:
        for statement in _statements(dialect):
            await connection.exec_driver_sql(statement)
    from_ddl = await _schema_of(engine)
    assert _as_model_view(from_ddl) == _model_tables()

    reference = _engine(other_database_url)
    try:
        await init_schema(reference)
        assert from_ddl == await _schema_of(reference), "tables/*.sql differs from init_schema"
    finally:
        await reference.dispose()

    await init_schema(engine)  # a worker starting on a schema made from tables/*.sql
    assert await _schema_of(engine) == from_ddl


async def test_an_index_added_later_is_created_on_an_existing_table(engine: AsyncEngine) -> None:
    """A database made by an earlier release has the tables but not a newer index."""
    await init_schema(engine)
    async with engine.begin() as connection:
        await connection.exec_driver_sql("DROP INDEX ix_outbox_dead_lettered")
    assert "ix_outbox_dead_lettered" not in (await _schema_of(engine))["outbox"]["indexes"]

    await init_schema(engine)
    assert "ix_outbox_dead_lettered" in (await _schema_of(engine))["outbox"]["indexes"]


async def _outbox_options(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT reloptions FROM pg_class WHERE oid = 'outbox'::regclass"
        )
        return list(result.scalar() or [])


async def test_an_outbox_of_an_earlier_release_gets_the_fillfactor(pg_admin_url: str) -> None:
    """Without room on its page for the version the relay's mark writes, every claimed row
    moves to another page (db/models.py, OUTBOX_FILLFACTOR)."""
    with fresh_database(pg_admin_url) as database_url:
        engine = _engine(database_url)
        try:
            await init_schema(engine)
            assert await _outbox_options(engine) == [f"fillfactor={OUTBOX_FILLFACTOR}"]
            async with engine.begin() as connection:  # as an earlier release created it
                await connection.exec_driver_sql("ALTER TABLE outbox RESET (fillfactor)")
            assert await _outbox_options(engine) == []

            await init_schema(engine)
            assert await _outbox_options(engine) == [f"fillfactor={OUTBOX_FILLFACTOR}"]
        finally:
            await engine.dispose()


async def test_an_operators_own_fillfactor_stays(pg_admin_url: str) -> None:
    with fresh_database(pg_admin_url) as database_url:
        engine = _engine(database_url)
        try:
            await init_schema(engine)
            async with engine.begin() as connection:
                await connection.exec_driver_sql("ALTER TABLE outbox SET (fillfactor = 70)")

            await init_schema(engine)
            assert await _outbox_options(engine) == ["fillfactor=70"]
        finally:
            await engine.dispose()


async def test_counting_dead_lettered_rows_does_not_read_the_whole_outbox(
    pg_admin_url: str,
) -> None:
    """The backlog refresh runs every few seconds in every worker, over an outbox that
    keeps OUTBOX_RETENTION of published rows: PostgreSQL must answer it from the index."""
    from holdwall_stream.outbox.store import backlog_stats

    with fresh_database(pg_admin_url) as database_url:
        engine = _engine(database_url)
        try:
            await init_schema(engine)
            async with engine.begin() as connection:
                await connection.exec_driver_sql(
                    "INSERT INTO outbox (event_id, topic, partition, key, payload, headers, "
                    "published, published_at, dead_lettered_at) "
                    "SELECT gen_random_uuid(), 't', 0, 'k', 'v', '{}', mod(n, 1000) <> 0, now(), "
                    "CASE WHEN mod(n, 1000) = 0 THEN now() END FROM generate_series(1, 20000) n"
                )
                await connection.exec_driver_sql("ANALYZE outbox")
                plan = "\n".join(
                    row[0]
                    for row in await connection.exec_driver_sql(
                        "EXPLAIN SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL"
                    )
                )
                stats = await backlog_stats(connection)
        finally:
            await engine.dispose()
    assert "ix_outbox_dead_lettered" in plan and "Seq Scan" not in plan, plan
    assert stats.dead_lettered == 20
