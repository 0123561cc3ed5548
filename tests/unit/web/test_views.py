"""Which failures of POST /api/events a client should retry (503) and which are bugs (500)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from holdwall_stream.web.views import _database_unavailable


class _DriverError(Exception):
    pass


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("INSERT ...", {}, _DriverError("server closed the connection")),
        InterfaceError("INSERT ...", {}, _DriverError("connection already closed")),
        PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
    ids=["operational", "interface", "pool-timeout", "refused", "timeout"],
)
def test_a_lost_or_refused_connection_is_worth_a_retry(error: BaseException) -> None:
    assert _database_unavailable(error)


def test_an_invalidated_connection_is_worth_a_retry_whatever_the_error_class() -> None:
    error = IntegrityError("INSERT ...", {}, _DriverError("lost"), connection_invalidated=True)
    assert _database_unavailable(error)


@pytest.mark.parametrize(
    "error",
    [
        DataError("INSERT ...", {}, _DriverError("value too long for type character varying")),
        IntegrityError("INSERT ...", {}, _DriverError("violates check constraint")),
        ValueError("a bug"),
    ],
    ids=["data", "integrity", "bug"],
)
def test_an_error_in_the_statement_is_not_retried(error: BaseException) -> None:
    assert not _database_unavailable(error)
