"""Session fixtures: one embedded Kafka broker, PostgreSQL and SQLite databases.

Nothing is mocked: tests talk to a real Tansu broker and a real PostgreSQL server.
PostgreSQL comes from TEST_DATABASE_URL (an admin connection) or the PG* variables; if
it is unreachable the tests fail, they are never skipped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from holdwall_stream.embedded import EmbeddedBroker


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """ "127.0.0.1:PORT" of a Tansu broker shared by the whole session."""
    log_path = tmp_path_factory.mktemp("kafka") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap


def _admin_url() -> URL:
    raw = os.environ.get("TEST_DATABASE_URL")
    if raw:
        return make_url(raw).set(drivername="postgresql")
    host = os.environ.get("PGHOST") or "127.0.0.1"
    socket_dir = host.startswith("/")
    return URL.create(
        "postgresql",
        username=os.environ.get("PGUSER") or "postgres",
        password=os.environ.get("PGPASSWORD") or None,
        host=None if socket_dir else host,
        port=int(os.environ.get("PGPORT") or 5432),
        database=os.environ.get("PGDATABASE") or "postgres",
        query={"host": host} if socket_dir else {},
    )


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _create_database(admin: URL) -> URL:
    name = f"holdwall_test_{secrets.token_hex(6)}"
    with psycopg.connect(_render(admin), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin.set(database=name)


def _drop_database(admin: URL, database: URL) -> None:
    with psycopg.connect(_render(admin), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database.database or "")
            )
        )


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The admin connection URL; fails the tests loudly if PostgreSQL cannot be reached."""
    admin = _admin_url()
    try:
        with psycopg.connect(_render(admin), autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        problem = " ".join(str(exc).split())
    else:
        return _render(admin)
    pytest.fail(
        f"PostgreSQL unreachable at {admin.render_as_string(hide_password=True)}: {problem} "
        f"(set TEST_DATABASE_URL or PGHOST/PGPORT/PGUSER/PGPASSWORD)",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def pg_database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database for the session, ``postgresql://user@host:port/holdwall_test_…``."""
    admin = make_url(pg_admin_url)
    database = _create_database(admin)
    try:
        yield _render(database)
    finally:
        _drop_database(admin, database)


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/holdwall.db"


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each dialect, new for every test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/holdwall.db"
        return
    admin = make_url(request.getfixturevalue("pg_admin_url"))
    database = _create_database(admin)
    try:
        yield _render(database)
    finally:
        _drop_database(admin, database)
