"""Telling a database that cannot be reached from an error in what was sent to it.

The first is an outage (a failover, a restart, a full pool): worth waiting out and retrying,
and logged once rather than as a traceback per retry. The second is a bug or bad data.
"""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from holdwall_stream.errors import DatabaseStalledError, DatabaseUnavailableError
from holdwall_stream.settings import Settings


def is_database_unavailable(exc: BaseException) -> bool:
    """A lost or refused connection, no pooled connection in time, a server that stopped
    answering, or PostgreSQL's other transient failures (its OperationalError: shutdown,
    deadlock, serialization).

    Not SQLite's OperationalError: sqlite3 raises it for a missing table or bad SQL too.
    """
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc.orig, psycopg.OperationalError)
    return isinstance(exc, PoolTimeoutError | OSError | TimeoutError | DatabaseStalledError)


def describe(exc: BaseException) -> str:
    """One line for a log: the driver's own error, without SQLAlchemy's statement and
    parameters (an event's payload has no place in an outage warning)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def unreachable(settings: Settings, exc: BaseException, *, then: str) -> DatabaseUnavailableError:
    """The one line a worker or command that cannot start without the database ends with;
    ``then`` says what to run again."""
    return DatabaseUnavailableError(
        f"cannot reach the database at {settings.database_url_redacted} (DATABASE_URL, "
        f"DATABASE_TIMEOUT_MS={settings.database_timeout_ms}): {describe(exc)}; start it or "
        f"correct DATABASE_URL, then {then}"
    )
