"""Which database failures are an outage (retry, 503, one warning) and which are bugs."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from holdwall_stream.db.errors import describe, is_database_unavailable
from holdwall_stream.errors import DatabaseStalledError


class _DriverError(Exception):
    pass


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("INSERT ...", {}, psycopg.OperationalError("server closed")),
        OperationalError("INSERT ...", {}, psycopg.errors.AdminShutdown("terminating connection")),
        OperationalError("INSERT ...", {}, psycopg.errors.DeadlockDetected("deadlock detected")),
        PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        DatabaseStalledError("outbox partition 0: a relay batch did not finish within 40 s"),
    ],
    ids=["lost", "shutdown", "deadlock", "pool-timeout", "refused", "timeout", "stalled"],
)
def test_a_lost_or_refused_connection_is_worth_a_retry(error: BaseException) -> None:
    assert is_database_unavailable(error)


def test_an_invalidated_connection_is_worth_a_retry_whatever_the_error_class() -> None:
    error = IntegrityError("INSERT ...", {}, _DriverError("lost"), connection_invalidated=True)
    assert is_database_unavailable(error)


@pytest.mark.parametrize(
    "error",
    [
        DataError("INSERT ...", {}, psycopg.errors.StringDataRightTruncation("value too long")),
        ProgrammingError("INSERT ...", {}, psycopg.errors.UndefinedTable("no outbox")),
        OperationalError("INSERT ...", {}, sqlite3.OperationalError("no such table: outbox")),
        IntegrityError("INSERT ...", {}, _DriverError("violates check constraint")),
        ValueError("a bug"),
    ],
    ids=["data", "undefined-table", "sqlite-no-such-table", "integrity", "bug"],
)
def test_an_error_in_the_statement_is_not_retried(error: BaseException) -> None:
    assert not is_database_unavailable(error)


def test_the_log_line_is_the_drivers_first_line_without_the_statement() -> None:
    error = OperationalError(
        "INSERT INTO outbox VALUES (%(payload)s)",
        {"payload": "a customer's address"},
        _DriverError("connection failed: server closed the connection\nmore detail"),
    )
    assert describe(error) == "_DriverError: connection failed: server closed the connection"
    assert describe(TimeoutError()) == "TimeoutError"
