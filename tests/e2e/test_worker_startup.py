"""A worker that cannot start says why in one line an operator can act on, and exits.

(The Kafka side of startup validation is in tests/integration/test_verify.py.)
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from holdwall_stream.embedded import free_port
from holdwall_stream.errors import (
    EXIT_BAD_SETTING,
    EXIT_DATABASE_UNAVAILABLE,
    EXIT_KAFKA_UNAVAILABLE,
)
from holdwall_stream.messaging.topics import ensure_topics
from tests.support.pipeline import run_cli
from tests.support.processes import WorkerProcess
from tests.support.relay_harness import settings_from_env, wait_healthy
from tests.support.tcp_proxy import TcpProxy
from tests.support.worker_env import worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = "s3cret-pw"
DATABASE_TIMEOUT_MS = 2000


@pytest.fixture
def database_that_never_answers(pg_admin_url: str) -> Iterator[str]:
    """A DATABASE_URL whose server accepts connections and then says nothing."""
    server = make_url(pg_admin_url)
    with TcpProxy(server.host or "127.0.0.1", server.port or 5432) as proxy:
        proxy.hang()
        yield f"postgresql://holdwall:{PASSWORD}@{proxy.address}/holdwall"


async def _exit_code(worker: WorkerProcess, timeout: float = 60.0) -> int:
    try:
        return await asyncio.to_thread(worker.wait, timeout)
    finally:
        worker.stop()


async def test_a_bad_setting_stops_the_worker_with_one_line_naming_it(tmp_path: Path) -> None:
    worker = WorkerProcess(
        {"KAFKA_ENABLED": "false", "OUTBOX_BATCH_SIZE": "a thousand"}, tmp_path / "worker"
    )
    worker.start()
    assert await _exit_code(worker) == EXIT_BAD_SETTING
    [line] = [line for line in worker.log_text().splitlines() if "invalid setting" in line]
    assert "OUTBOX_BATCH_SIZE" in line
    assert "Traceback" not in worker.log_text()


async def test_an_unreachable_database_stops_the_worker_saying_where_without_the_password(
    tmp_path: Path,
) -> None:
    nowhere = f"postgresql://holdwall:{PASSWORD}@127.0.0.1:{free_port()}/holdwall"
    worker = WorkerProcess({"KAFKA_ENABLED": "false", "DATABASE_URL": nowhere}, tmp_path / "worker")
    worker.start()
    assert await _exit_code(worker) == EXIT_DATABASE_UNAVAILABLE
    log = worker.log_text()
    [line] = [line for line in log.splitlines() if "DatabaseUnavailableError: " in line]
    assert "cannot reach the database at postgresql+psycopg://holdwall:***@127.0.0.1" in line
    assert "(DATABASE_URL, DATABASE_TIMEOUT_MS=" in line and "Connection refused" in line
    assert PASSWORD not in log
    assert "Traceback" not in log  # neither the driver's nor Faust's start-up machinery's


async def test_a_database_that_never_answers_stops_the_worker_within_the_timeout(
    tmp_path: Path, database_that_never_answers: str
) -> None:
    """libpq would wait for the server's first word forever: no start, no error, no exit."""
    worker = WorkerProcess(
        {
            "KAFKA_ENABLED": "false",
            "DATABASE_URL": database_that_never_answers,
            "DATABASE_TIMEOUT_MS": str(DATABASE_TIMEOUT_MS),
        },
        tmp_path / "worker",
    )
    worker.start()
    assert await _exit_code(worker, timeout=30) == EXIT_DATABASE_UNAVAILABLE
    log = worker.log_text()
    [line] = [line for line in log.splitlines() if "DatabaseUnavailableError: " in line]
    assert f"DATABASE_TIMEOUT_MS={DATABASE_TIMEOUT_MS}): ConnectionTimeout" in line
    assert PASSWORD not in log
    assert "Traceback" not in log


def test_a_command_against_a_database_that_never_answers_ends_with_one_line(
    database_that_never_answers: str,
) -> None:
    """Without a bound on connecting, `db init` would hang here until run_cli's timeout."""
    result = run_cli(
        {
            "KAFKA_ENABLED": "false",
            "DATABASE_URL": database_that_never_answers,
            "DATABASE_TIMEOUT_MS": str(DATABASE_TIMEOUT_MS),
        },
        *("db", "init"),
        timeout=30,
    )
    assert result.returncode == EXIT_DATABASE_UNAVAILABLE, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("holdwall-stream: cannot reach the database at postgresql+psycopg:")
    assert "ConnectionTimeout" in line and "run the command again" in line
    assert PASSWORD not in result.stderr


async def test_a_partition_count_other_than_the_topics_stops_the_worker_with_one_line(
    tmp_path: Path, kafka_bootstrap: str, sqlite_database_url: str
) -> None:
    """Starting with KAFKA_PARTITIONS other than the existing topics' count would write
    outbox rows for partitions the topic does not have (or never relay some)."""
    env = worker_env(kafka_bootstrap, sqlite_database_url)
    await ensure_topics(settings_from_env(env))  # 3 partitions, as a running system has
    worker = WorkerProcess(env | {"KAFKA_PARTITIONS": "2"}, tmp_path / "worker")
    worker.start()
    assert await _exit_code(worker) == EXIT_BAD_SETTING
    log = worker.log_text()
    [line] = [line for line in log.splitlines() if "TopicMismatchError: " in line]
    assert f"topic '{env['KAFKA_EVENTS_TOPIC']}' has 3 partitions but KAFKA_PARTITIONS=2" in line
    assert "set KAFKA_PARTITIONS=3" in line and "'More partitions'" in line
    assert "Traceback" not in log
    assert "connection error" not in log.lower()  # the log greps for outages must not match


async def test_an_unreachable_broker_stops_the_worker_with_one_line_saying_what_to_do(
    tmp_path: Path, sqlite_database_url: str
) -> None:
    env = worker_env(
        f"127.0.0.1:{free_port()}", sqlite_database_url, KAFKA_CONNECTION_TIMEOUT="2000"
    )
    worker = WorkerProcess(env, tmp_path / "worker")
    worker.start()
    assert await _exit_code(worker) == EXIT_KAFKA_UNAVAILABLE
    log = worker.log_text()
    [line] = [line for line in log.splitlines() if "cannot declare topics" in line]
    assert re.search("kafka.*connection.*error", line, re.IGNORECASE)  # the checklist's grep
    assert env["KAFKA_BROKERS"] in line and "KAFKA_ENABLED=false" in line
    assert "Traceback" not in log


async def test_startup_validation_stops_the_worker_naming_the_check_that_failed(
    tmp_path: Path, sqlite_database_url: str
) -> None:
    env = worker_env(
        "no-such-broker.invalid:9092",
        sqlite_database_url,
        KAFKA_CONNECTION_TIMEOUT="2000",
        KAFKA_VALIDATE_ON_STARTUP="true",
    )
    worker = WorkerProcess(env, tmp_path / "worker")
    worker.start()
    assert await _exit_code(worker) == EXIT_KAFKA_UNAVAILABLE
    log = worker.log_text()
    [line] = [line for line in log.splitlines() if "VerificationFailed: " in line]
    assert "dns" in line.lower() and "ENOTFOUND" in line
    assert "Traceback" not in log


async def test_a_web_port_another_process_listens_on_stops_the_worker_naming_web_port(
    tmp_path: Path, sqlite_database_url: str
) -> None:
    """Two workers on a host with the same WEB_PORT: the second one says so."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = WorkerProcess(
            {"KAFKA_ENABLED": "false", "DATABASE_URL": sqlite_database_url, "WEB_PORT": str(port)},
            tmp_path / "worker",
        )
        worker.start()
        assert await _exit_code(worker) == EXIT_BAD_SETTING
    log = worker.log_text()
    [line] = [line for line in log.splitlines() if "invalid setting" in line]
    assert f"WEB_PORT: {port} is taken on 0.0.0.0 by another process" in line
    assert "Traceback" not in log


async def test_a_data_dir_another_worker_holds_stops_the_worker_naming_it(
    tmp_path: Path, sqlite_database_url: str
) -> None:
    """Two workers on a host with the same FAUST_DATA_DIR: the second one says so, before
    RocksDB's lock of a shared table would crash one of them."""
    env = {
        "KAFKA_ENABLED": "false",
        "DATABASE_URL": sqlite_database_url,
        "FAUST_DATA_DIR": str(tmp_path / "shared-data"),
    }
    first = WorkerProcess(env, tmp_path / "first")
    second = WorkerProcess(env, tmp_path / "second")
    try:
        first.start()
        await wait_healthy([first], kafka_ok=False)
        first_pid = first.pid
        second.start()
        assert await _exit_code(second) == EXIT_BAD_SETTING
        assert first.is_running()
    finally:
        first.stop()
    log = second.log_text()
    [line] = [line for line in log.splitlines() if "invalid setting" in line]
    assert f"FAUST_DATA_DIR: {tmp_path / 'shared-data'} is in use by another worker" in line
    assert f"(pid {first_pid})" in line
    assert "Traceback" not in log
