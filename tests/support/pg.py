"""PostgreSQL for the tests and the benchmarks: the admin connection from the environment,
and databases of their own, created for a test, a module or a run and dropped after."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

CONNECT_TIMEOUT_S = 5


def admin_url() -> URL:
    """TEST_DATABASE_URL, or the PG* variables libpq reads (a socket directory as PGHOST)."""
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


def render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def create_database(admin: URL, prefix: str = "holdwall_test") -> URL:
    """A new, empty database (a random name after ``prefix``); its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(render(admin), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin.set(database=name)


def drop_database(admin: URL, database: URL) -> None:
    """Drops ``database``, closing whatever connections are still open to it."""
    with psycopg.connect(render(admin), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database.database or "")
            )
        )


@contextmanager
def fresh_database(admin: str | URL, prefix: str = "holdwall_test") -> Iterator[str]:
    """A new database for as long as the block runs; yields its ``postgresql://`` URL."""
    admin_url_ = make_url(admin)
    database = create_database(admin_url_, prefix)
    try:
        yield render(database)
    finally:
        drop_database(admin_url_, database)
