"""Session fixtures: one embedded Kafka broker, PostgreSQL and SQLite databases.

Nothing is mocked: tests talk to a real Tansu broker and a real PostgreSQL server.
PostgreSQL comes from TEST_DATABASE_URL (an admin connection) or the PG* variables; if
it is unreachable the tests fail, they are never skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.embedded import EmbeddedBroker
from holdwall_stream.settings import load_settings
from tests.support.pg import admin_url, fresh_database, render


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """ "127.0.0.1:PORT" of a Tansu broker shared by the whole session."""
    log_path = tmp_path_factory.mktemp("kafka") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The admin connection URL; fails the tests loudly if PostgreSQL cannot be reached."""
    admin = admin_url()
    try:
        with psycopg.connect(render(admin), autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        problem = " ".join(str(exc).split())
    else:
        return render(admin)
    pytest.fail(
        f"PostgreSQL unreachable at {admin.render_as_string(hide_password=True)}: {problem} "
        f"(set TEST_DATABASE_URL or PGHOST/PGPORT/PGUSER/PGPASSWORD)",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def pg_database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database for the session, ``postgresql://user@host:port/holdwall_test_…``."""
    with fresh_database(pg_admin_url) as url:
        yield url


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/holdwall.db"


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each dialect, new for every test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/holdwall.db"
        return
    with fresh_database(request.getfixturevalue("pg_admin_url")) as url:
        yield url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An async engine on ``database_url`` with the schema created (modules needing more
    of their database define their own)."""
    engine = create_engine(load_settings(database_url=database_url))
    await init_schema(engine)
    try:
        yield engine
    finally:
        await engine.dispose()
