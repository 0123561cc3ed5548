"""Creating the schema idempotently, and rendering the DDL that tables/ holds."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.schema import CreateIndex, CreateTable

from holdwall_stream.db.models import Base

TABLES_DIR = Path(__file__).resolve().parents[2] / "tables"
DIALECTS = {"postgresql": postgresql.dialect(), "sqlite": sqlite.dialect()}
DDL_FILES = {"postgresql": "postgres.sql", "sqlite": "sqlite.sql"}

# Serialises concurrent `db init` / worker starts on one PostgreSQL database.
_SCHEMA_LOCK_KEY = 0x686F6C64  # "hold"


async def init_schema(engine: AsyncEngine) -> None:
    """Creates missing tables and indexes; safe to run from several processes at once.

    An index added in a later release is created on an existing table too (create_all
    alone only builds the indexes of tables it creates). That build reads the table once
    and holds writes back meanwhile: on a large table, create it beforehand with
    CREATE INDEX CONCURRENTLY (the names and definitions are in tables/).
    """
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY})"))
        await connection.run_sync(_create_missing)
        if connection.dialect.name == "postgresql":
            await connection.run_sync(_set_missing_storage_parameters)


def _create_missing(connection: Connection) -> None:
    Base.metadata.create_all(connection, checkfirst=True)
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            index.create(connection, checkfirst=True)


def _set_missing_storage_parameters(connection: Connection) -> None:
    """A table made by an earlier release gets the storage parameters (``WITH``) the models
    declare, unless it has a value of its own for them (an operator's choice stays).

    They apply to rows written from then on. The ALTER takes a lock that lets reads and
    writes go on but waits for a VACUUM of that table.
    """
    for table in Base.metadata.sorted_tables:
        declared: dict[str, object] = table.dialect_options["postgresql"]["with"] or {}
        if not declared:
            continue
        options = connection.execute(
            text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:table)"),
            {"table": table.name},
        ).scalar()
        present = {option.split("=", 1)[0] for option in options or []}
        missing = {name: value for name, value in declared.items() if name not in present}
        if missing:
            settings = ", ".join(f"{name} = {value}" for name, value in missing.items())
            name = connection.dialect.identifier_preparer.quote(table.name)
            connection.execute(text(f"ALTER TABLE {name} SET ({settings})"))


def render_ddl(dialect_name: str) -> str:
    """The schema as SQL for one dialect, in dependency order; what tables/*.sql must equal."""
    dialect = DIALECTS[dialect_name]
    statements: list[str] = []
    for table in Base.metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)).strip())
        statements.extend(
            str(CreateIndex(index).compile(dialect=dialect)).strip()
            for index in sorted(table.indexes, key=lambda index: index.name or "")
        )
    header = "-- Generated from holdwall_stream/db/models.py by `make ddl`; do not edit.\n"
    return header + "".join(f"\n{statement};\n" for statement in statements)


def write_ddl_files(directory: Path = TABLES_DIR) -> list[Path]:
    written = []
    for dialect_name, file_name in DDL_FILES.items():
        path = directory / file_name
        path.write_text(render_ddl(dialect_name))
        written.append(path)
    return written
