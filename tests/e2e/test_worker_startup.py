"""A worker that cannot start says why in one line an operator can act on, and exits.

(The Kafka side of startup validation is in tests/integration/test_verify.py.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from holdwall_stream.embedded import free_port
from holdwall_stream.errors import EXIT_BAD_SETTING, EXIT_DATABASE_UNAVAILABLE
from tests.support.processes import WorkerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = "s3cret-pw"


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
    assert "(DATABASE_URL)" in line and "Connection refused" in line
    assert PASSWORD not in log
    assert "Traceback" not in log  # neither the driver's nor Faust's start-up machinery's
