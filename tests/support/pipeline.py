"""Helpers for the pipeline's end-to-end tests: databases that outlive one test, producing
straight to a worker's events topic, its health, and the operator CLI as a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER, EventEnvelope, encode_envelope
from tests.support.pg import fresh_database
from tests.support.processes import REPO_ROOT, WorkerDiedError, WorkerProcess, wait_until_async
from tests.support.worker_env import get_json, query


@contextmanager
def database(dialect: str, pg_admin_url: str, directory: Path) -> Iterator[str]:
    """A fresh database for as long as the block runs (module-scoped fixtures)."""
    if dialect == "sqlite":
        yield f"sqlite:///{directory}/holdwall.db"
        return
    with fresh_database(pg_admin_url) as url:
        yield url


def event(
    event_type: str = "order.created", aggregate_id: str = "order-1", **data: Any
) -> EventEnvelope:
    return EventEnvelope(
        id=uuid.uuid4(),
        type=event_type,
        aggregate_id=aggregate_id,
        occurred_at=datetime.now(UTC),
        data=data,
    )


Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


def as_message(envelope: EventEnvelope) -> Message:
    """How the relay publishes an envelope: key aggregate_id, header event-id."""
    return (
        envelope.aggregate_id.encode(),
        encode_envelope(envelope),
        [(EVENT_ID_HEADER, str(envelope.id).encode())],
    )


async def produce(bootstrap: str, topic: str, messages: Iterable[Message]) -> list[RecordMetadata]:
    """Sends the messages in order, each acknowledged; returns where each one landed."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in messages
        ]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


def health(worker: WorkerProcess) -> dict[str, Any]:
    status, body = get_json(f"{worker.base_url}/api/health")
    assert isinstance(body, dict), (status, body)
    return body


def consumer_check(worker: WorkerProcess) -> dict[str, Any]:
    return dict(health(worker)["checks"]["consumer"])


def assigned_partitions(worker: WorkerProcess) -> set[int]:
    """The pipeline partitions the worker holds; none while it cannot answer. Raises
    WorkerDiedError (with its log tail) if it exited, so waits on it fail at once."""
    try:
        return set(consumer_check(worker).get("assigned_partitions") or ())
    except (OSError, AssertionError, KeyError):
        if not worker.is_running():
            raise WorkerDiedError(
                f"worker exited with code {worker.returncode}; log tail:\n{worker.log_tail()}"
            ) from None
        return set()


@asynccontextmanager
async def pipeline_worker(
    env: Mapping[str, str], workdir: Path, partitions: frozenset[int] = frozenset({0, 1, 2})
) -> AsyncIterator[WorkerProcess]:
    """A worker started with ``env``, once healthy and holding ``partitions`` of the events
    topic (the default KAFKA_PARTITIONS), so what a test produces is consumed at once."""
    with WorkerProcess(env, workdir) as worker:
        await worker.wait_for_http_async("/api/health", timeout=90, status={200})
        await wait_until_async(
            lambda: assigned_partitions(worker) == partitions,
            timeout=60,
            message="pipeline partitions assigned",
        )
        yield worker


def split_evenly(workers: Sequence[WorkerProcess], partitions: int) -> bool:
    """Each worker holds some partitions, no two hold the same one, together all of them."""
    held = [assigned_partitions(w) for w in workers]
    union = set().union(*held)
    disjoint = sum(len(h) for h in held) == len(union)
    return disjoint and union == set(range(partitions)) and all(held)


async def scalar(database_url: str, sql: str, **params: Any) -> Any:
    rows = await query(database_url, sql, **params)
    return rows[0][0] if rows else None


async def processed_ids(database_url: str) -> list[str]:
    rows = await query(database_url, "SELECT event_id FROM processed_events")
    return [str(uuid.UUID(str(row[0]))) for row in rows]


def cli_command() -> list[str]:
    """The installed `holdwall-stream` script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("holdwall-stream")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "holdwall_stream.cli"]


def run_cli(
    env: Mapping[str, str], *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`holdwall-stream ARGS` with a worker's environment (database, brokers, topics)."""
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p
    )
    return subprocess.run(
        [*cli_command(), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
