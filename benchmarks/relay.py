"""Outbox relay benchmark: ceilings, sustained rate, latency, scale-out. `make bench`.

One run, one table, all figures measured on the same machine in the same run:

(a) ceilings: aiokafka ``create_batch``/``send_batch`` of the same messages without a
    database; PostgreSQL's claim-and-mark rate without Kafka (the relay's own
    ``UPDATE ... RETURNING`` statement, batches of OUTBOX_BATCH_SIZE, on the same rows);
(b) the relay's sustained rate for N pre-inserted events, from start until every row is
    published: in-process (``OutboxRelay.drain`` over all partitions in a loop) and in
    real worker processes;
(c) commit-to-topic latency p50/p99 at a steady rate (writers use ``store_events``; a
    consumer with a small ``fetch_max_wait_ms`` records arrival times), beside the
    workers' kafka_outbox_relay_delay_seconds histogram (per batch, its oldest row's
    write to the broker's acknowledgement) and the broker alone at the same rate;
(d) 1, 2 and 3 worker processes.

PostgreSQL: a fresh database it creates and drops (TEST_DATABASE_URL or PG*). Kafka: an
EmbeddedBroker (Tansu) it starts. Knobs (environment): BENCH_RELAY_EVENTS (200000),
BENCH_LATENCY_RATE (1000 events/s), BENCH_LATENCY_SECONDS (15),
BENCH_LATENCY_EVENTS_PER_TX (20), BENCH_WORKERS ("1,2,3"), BENCH_REPEAT (3: runs of the
ceilings and the in-process relay, interleaved; the best counts),
OUTBOX_BATCH_SIZE (the relay's default). BENCH_PROFILE_DIR: record every worker with
py-spy (pip install py-spy) while it is measured: collapsed stacks, one file per worker
and phase (flamegraph.pl or inferno turn them into flame graphs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from benchmarks.common import (
    PARTITIONS,
    CpuSplit,
    Measurement,
    bench_settings,
    histogram_quantile,
    percentile,
    render_table,
    worker_environment,
)
from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.embedded import EmbeddedBroker
from holdwall_stream.event_loop import implementation_name
from holdwall_stream.messaging.producer import KafkaProducer, size_limits
from holdwall_stream.messaging.topics import ensure_topics
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox import store
from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.writer import OUTBOX_CHANNEL, NewEvent, OutboxTarget, store_events
from holdwall_stream.resilience.breaker import CircuitBreaker
from holdwall_stream.settings import Settings, load_settings
from tests.support.pg import admin_url, fresh_database

N_EVENTS = int(os.environ.get("BENCH_RELAY_EVENTS", "200000"))
N_KEYS = 1000
PAYLOAD_BYTES = 300
INSERT_CHUNK = 2000
LATENCY_RATE = int(os.environ.get("BENCH_LATENCY_RATE", "1000"))
LATENCY_SECONDS = float(os.environ.get("BENCH_LATENCY_SECONDS", "15"))
LATENCY_WARMUP_S = 2.0
LATENCY_WRITERS = 4
LATENCY_EVENTS_PER_TX = int(os.environ.get("BENCH_LATENCY_EVENTS_PER_TX", "20"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
WORKER_COUNTS = tuple(int(n) for n in os.environ.get("BENCH_WORKERS", "1,2,3").split(","))
DRAIN_TIMEOUT_S = 300.0
POLL_S = 0.02
# A pickup (COMMIT returned -> CreateTime) slower than this is listed with its partition.
LATE_PICKUP_MS = 50

PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR")
OUTBOX_COPY = "bench_outbox_as_written"

# A record at the measuring consumer: arrival and CreateTime (wall clock, s), partition.
Arrival = tuple[float, float, int]


def _log(message: str) -> None:
    print(f"[relay bench] {message}", file=sys.stderr, flush=True)


def _event(index: int, pad: str, t: float | None = None) -> NewEvent:
    data: dict[str, Any] = {"n": index, "pad": pad}
    if t is not None:
        data["t"] = round(t, 6)  # the write time, for anyone reading the topic
    return NewEvent(
        type="bench.event",
        aggregate_id=f"key-{index % N_KEYS:04d}",
        data=data,
        id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
    )


def _padding() -> str:
    """Filler so an encoded envelope is about PAYLOAD_BYTES long."""
    from holdwall_stream.outbox.writer import to_envelope
    from holdwall_stream.pipeline.envelope import encode_envelope

    size = len(encode_envelope(to_envelope(_event(N_EVENTS, ""))))
    return "x" * max(0, PAYLOAD_BYTES - size)


# --- setup ---------------------------------------------------------------------------


async def insert_events(engine: AsyncEngine, target: OutboxTarget, count: int) -> float:
    """Inserts ``count`` events with store_events, INSERT_CHUNK per transaction; returns s."""
    pad = _padding()
    started = time.perf_counter()
    for first in range(0, count, INSERT_CHUNK):
        events = [_event(i, pad) for i in range(first, min(count, first + INSERT_CHUNK))]
        async with AsyncSession(engine) as session, session.begin():
            await store_events(session, events, target)
    return time.perf_counter() - started


async def save_outbox(database_url: str) -> None:
    """Keeps a copy of the outbox as the writer left it, for :func:`restore_outbox`."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute(f"CREATE TABLE {OUTBOX_COPY} AS SELECT * FROM outbox ORDER BY id")
        await conn.commit()


async def restore_outbox(database_url: str) -> None:
    """Puts the pre-inserted rows back as the writer left them, then vacuums.

    Every measured phase starts from the same pages and indexes. Marking the rows
    unpublished again instead would hand each phase a table reshaped by the phases before
    it (every mark writes a new version of every row): the first phase on such a table
    always ran fastest, and none ran on rows as an application writes them.
    """
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("TRUNCATE outbox")
        await conn.execute(f"INSERT INTO outbox SELECT * FROM {OUTBOX_COPY} ORDER BY id")
        await conn.commit()
    await vacuum(database_url)


async def vacuum(database_url: str) -> None:
    """VACUUM, then CHECKPOINT, so every measured phase starts from the same state (full-page
    writes after a checkpoint otherwise favour whichever phase runs later)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("VACUUM ANALYZE outbox")
        # Needs superuser or pg_checkpoint; without it the figures are just noisier.
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute("CHECKPOINT")


async def backlog_left(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM outbox WHERE published = false AND dead_lettered_at IS NULL"
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def wait_drained(database_url: str, timeout: float = DRAIN_TIMEOUT_S) -> float:
    """Polls until no unpublished row is left; returns that moment (perf_counter)."""
    deadline = time.perf_counter() + timeout
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM outbox "
                "WHERE published = false AND dead_lettered_at IS NULL)"
            )
            row = await cursor.fetchone()
            now = time.perf_counter()
            if row is not None and not row[0]:
                return now
            if now > deadline:
                raise TimeoutError(f"outbox not drained within {timeout:.0f} s")
            await asyncio.sleep(POLL_S)


# --- (a) ceilings --------------------------------------------------------------------


async def _declare_topic(settings: Settings, topic: str) -> str:
    """A topic like the events topic (same partitions), for measurements beside it."""
    kwargs = _settings_kwargs(settings)
    await ensure_topics(
        load_settings(**{**kwargs, "kafka_events_topic": topic, "kafka_dlq_topic": f"{topic}-dlq"})
    )
    return topic


async def kafka_ceiling(settings: Settings, database_url: str) -> tuple[float, int]:
    """aiokafka create_batch/send_batch of the outbox's own messages; no database."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT partition, key, payload, headers FROM outbox ORDER BY id"
        )
        rows = await cursor.fetchall()
    by_partition: dict[int, list[tuple[bytes, bytes, list[tuple[str, bytes]]]]] = defaultdict(list)
    for partition, key, payload, headers in rows:
        encoded = [(name, value.encode()) for name, value in headers.items()]
        by_partition[partition].append((bytes(key), bytes(payload), encoded))
    topic = await _declare_topic(settings, f"{settings.kafka_events_topic}-ceiling")
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=0,
        **size_limits(settings),  # as the relay's producer
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"warm-up", partition=0)
        started = time.perf_counter()
        futures = []
        for partition, messages in by_partition.items():
            batch = producer.create_batch()
            for key, value, headers in messages:
                while batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    batch.close()
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
            if batch.record_count():
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
    finally:
        await producer.stop()
    return len(rows) / elapsed, len(futures)


def _settings_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "kafka_enabled": True,
        "kafka_brokers": settings.kafka_brokers,
        "database_url": settings.database_url.get_secret_value(),
        "kafka_partitions": settings.kafka_partitions,
        "kafka_session_timeout": settings.kafka_session_timeout,
    }


async def claim_ceiling(
    database_url: str, batch_size: int, concurrent: bool
) -> tuple[float, CpuSplit]:
    """PostgreSQL alone: claim-and-mark every row, batch_size per transaction, no Kafka.

    ``concurrent``: one connection per partition at once, as the relay drains them; else
    one connection taking the partitions in turn.
    """

    async def drain(conn: psycopg.AsyncConnection[Any], partition: int) -> int:
        done = 0
        while True:
            async with conn.cursor(binary=True) as cursor:
                await cursor.execute(store.PG_CLAIM, {"partition": partition, "limit": batch_size})
                rows = await cursor.fetchall()
            await conn.commit()
            done += len(rows)
            if len(rows) < batch_size:
                return done

    connections = [
        await psycopg.AsyncConnection.connect(database_url)
        for _ in range(PARTITIONS if concurrent else 1)
    ]
    try:
        cpu = CpuSplit().start()
        started = time.perf_counter()
        if concurrent:
            counts = await asyncio.gather(*(drain(conn, p) for p, conn in enumerate(connections)))
        else:
            counts = [await drain(connections[0], p) for p in range(PARTITIONS)]
        elapsed = time.perf_counter() - started
        cpu.stop()
    finally:
        for conn in connections:
            await conn.close()
    if sum(counts) != N_EVENTS:
        raise RuntimeError(f"the claim ceiling claimed {sum(counts)} rows, not {N_EVENTS}")
    return sum(counts) / elapsed, cpu


# --- (b) the relay in-process ----------------------------------------------------------


async def relay_in_process(settings: Settings, database_url: str) -> tuple[float, CpuSplit]:
    engine = create_engine(settings)
    metrics = Metrics()
    breaker = CircuitBreaker(
        settings.breaker_failure_threshold, settings.breaker_reset_timeout_ms / 1000
    )
    producer = KafkaProducer(settings, metrics)
    relay = OutboxRelay(settings, engine, producer, breaker, metrics)
    try:
        await ensure_topics(settings)
        await relay.prepare()
        await producer.get()
        partitions = list(range(settings.kafka_partitions))
        # One pooled connection per partition drained at once, open before the clock
        # starts, as in a running worker (and as the ceiling's connections are).
        async with contextlib.AsyncExitStack() as warm:
            for _ in partitions:
                connection = await warm.enter_async_context(engine.connect())
                await connection.execute(text("SELECT 1"))
        await restore_outbox(database_url)
        cpu = CpuSplit().start()
        started = time.perf_counter()
        while True:
            more = await relay.drain(partitions)
            elapsed = time.perf_counter() - started
            if not more:
                # The clock stops here; the check (a connection of its own) runs outside
                # it. Were a row left (a partition backing off), draining goes on.
                cpu.stop()
                if not await backlog_left(database_url):
                    break
            if elapsed > DRAIN_TIMEOUT_S:
                raise TimeoutError("in-process relay did not drain the outbox")
        if relay.last_error:
            _log(f"in-process relay reported: {relay.last_error}")
    finally:
        await producer.stop()
        await engine.dispose()
    return N_EVENTS / elapsed, cpu


# --- worker processes ------------------------------------------------------------------


class Worker:
    """One `faust -A holdwall_stream worker` process for the benchmark."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        from tests.support.processes import WorkerProcess

        self.process = WorkerProcess(env, workdir)

    def health(self) -> dict[str, Any] | None:
        """The /api/health body, whatever its status: a pre-inserted backlog older than
        OUTBOX_STUCK_AFTER_S makes it 503 (outbox stuck) until the relay starts."""
        from tests.support.worker_env import get_json

        try:
            _status, body = get_json(f"{self.process.base_url}/api/health", timeout=5)
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None


@contextmanager
def running_workers(
    count: int, database_url: str, bootstrap: str, suffix: str, root: Path
) -> Iterator[list[Worker]]:
    env = {
        **worker_environment(bench_settings(database_url, bootstrap, suffix)),
        "LOG_LEVEL": "warning",
    }
    for name in ("OUTBOX_BATCH_SIZE", "OUTBOX_POLL_INTERVAL_MS"):
        if name in os.environ:
            env[name] = os.environ[name]
    workers = [Worker(env, root / f"{suffix}-w{i}") for i in range(count)]
    try:
        for worker in workers:
            worker.process.start()
        yield workers
    finally:
        for worker in workers:
            worker.process.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.process.stop()


@contextmanager
def profiled(workers: Sequence[Worker], phase: str) -> Iterator[None]:
    """py-spy flame graphs of the workers for the duration of the block (BENCH_PROFILE_DIR)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not PROFILE_DIR or not Path(spy).exists():
        yield
        return
    Path(PROFILE_DIR).mkdir(parents=True, exist_ok=True)
    recorders = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(w.process.pid),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(Path(PROFILE_DIR) / f"{phase}-w{i}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, w in enumerate(workers)
    ]
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders:
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.kill()


async def wait_assigned(workers: Sequence[Worker], timeout: float = 180.0) -> None:
    """Until the workers' pipeline consumers hold every partition between them, stably."""
    deadline = time.monotonic() + timeout
    stable_since: float | None = None
    while True:
        for worker in workers:
            if not worker.process.is_running():
                raise RuntimeError(f"worker died:\n{worker.process.log_tail()}")
        bodies = await asyncio.gather(*(asyncio.to_thread(w.health) for w in workers))
        owned: list[set[int]] = []
        for body in bodies:
            consumer = (body or {}).get("checks", {}).get("consumer", {})
            owned.append(set(consumer.get("assigned_partitions") or []))
        ready = (
            all(body is not None for body in bodies)
            and set().union(*owned) == set(range(PARTITIONS))
            and all(owned[: min(len(workers), PARTITIONS)])
        )
        now = time.monotonic()
        if ready:
            stable_since = stable_since or now
            if now - stable_since >= 1.0:
                return
        else:
            stable_since = None
        if now > deadline:
            tails = "\n".join(w.process.log_tail(15) for w in workers)
            raise TimeoutError(f"partitions not assigned within {timeout:.0f} s: {owned}\n{tails}")
        await asyncio.sleep(0.2)


async def relay_in_workers(
    count: int, database_url: str, bootstrap: str, root: Path
) -> tuple[float, CpuSplit]:
    """The backlog is prepared (and vacuumed) as for the in-process run, then held back by
    taking every partition's relay lock while the workers start and join; the clock starts
    when the locks are released, with a NOTIFY."""
    suffix = f"w{count}-{secrets.token_hex(3)}"
    await restore_outbox(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as locks:
        await locks.execute(
            "INSERT INTO relay_locks (partition) SELECT generate_series(0, %s) "
            "ON CONFLICT DO NOTHING",
            (PARTITIONS - 1,),
        )
        await locks.commit()
        await locks.execute("SELECT partition FROM relay_locks FOR UPDATE")
        with running_workers(count, database_url, bootstrap, suffix, root) as workers:
            await wait_assigned(workers)
            await locks.execute(f"NOTIFY {OUTBOX_CHANNEL}")
            with profiled(workers, f"drain-{count}"):
                cpu = CpuSplit().start()
                started = time.perf_counter()
                await locks.commit()
                finished = await wait_drained(database_url)
                cpu.stop()
    return N_EVENTS / (finished - started), cpu


# --- (c) latency -----------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Commit-to-topic latency (ms): the writer's COMMIT returned -> the consumer had the
    record. ``pickup``: COMMIT returned -> the relay put the record in a batch (CreateTime).
    ``acked``: the workers' kafka_outbox_relay_delay_seconds histogram over the measured
    window, per batch from its oldest row's write (transaction start, so never later
    than its commit) to the broker's acknowledgement: no consumer's fetch is part of it,
    but it counts batches (each at its oldest row) and interpolates inside buckets.
    ``commit``: the writers' COMMIT itself (its WAL flush: a row is invisible to the
    relay until it is done); ``with_commit_p99``: from just before COMMIT, so with it."""

    p50: float
    p99: float
    worst: float
    count: int
    pickup_p50: float
    pickup_p99: float
    acked_p50: float
    acked_p99: float
    acked_batches: int
    commit_p99: float
    commit_worst: float
    with_commit_p99: float
    late_pickups: str
    cpu: CpuSplit


RELAY_DELAY_BUCKET = "kafka_outbox_relay_delay_seconds_bucket"


def relay_delay_buckets(workers: Sequence[Worker]) -> dict[float, float]:
    """Upper bound -> cumulative count of the relay delay histogram, summed over workers."""
    summed: dict[float, float] = defaultdict(float)
    for worker in workers:
        url = f"{worker.process.base_url}/api/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == RELAY_DELAY_BUCKET:
                    summed[float(sample.labels["le"])] += sample.value
    return dict(summed)


def _window(before: dict[float, float], after: dict[float, float]) -> list[tuple[float, float]]:
    return sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)


def _consume_arrivals(bootstrap: str, topic: str, out_path: str) -> None:
    """Run as ``python -m benchmarks.relay --consume BOOTSTRAP TOPIC FILE``, a process of its
    own (so the writers' CPU cannot delay it): reads ``topic`` with a small fetch wait and
    appends ``event-id arrival create-time partition`` lines (wall clock, s) until SIGTERM. Prints
    ``ready`` once it is fetching."""
    stopping = asyncio.Event()

    async def consume() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
        )
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
            await consumer.seek_to_beginning()
            await consumer.getmany(timeout_ms=100)
            print("ready", flush=True)
            with open(out_path, "w") as out:
                while not stopping.is_set():
                    batches = await consumer.getmany(timeout_ms=50)
                    now = time.time()
                    for records in batches.values():
                        for record in records:
                            event_id = dict(record.headers)["event-id"].decode()
                            out.write(
                                f"{event_id} {now:.6f} {record.timestamp / 1000:.6f} "
                                f"{record.partition}\n"
                            )
                    out.flush()
        finally:
            await consumer.stop()

    asyncio.run(consume())


class MeasuringConsumer:
    """The arrivals consumer (``--consume``), a process of its own so that the writers'
    CPU cannot delay it."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self, bootstrap: str, topic: str, arrivals_path: Path) -> None:
        self._process = subprocess.Popen(
            [
                *[sys.executable, "-m", "benchmarks.relay", "--consume"],
                *[bootstrap, topic, str(arrivals_path)],
            ],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self._process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self._process.stdout.readline), 30)
        if line.strip() != b"ready":
            raise RuntimeError("the latency consumer did not start")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


async def wait_arrived(
    arrivals_path: Path, sent: dict[str, float], timeout: float = 30.0
) -> dict[str, Arrival]:
    """Every sent event id's arrival; raises if some never arrive."""
    deadline = time.perf_counter() + timeout
    arrived: dict[str, Arrival] = {}
    while time.perf_counter() < deadline:
        arrived = _read_arrivals(arrivals_path)
        if not set(sent) - set(arrived):
            return arrived
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{len(set(sent) - set(arrived))} events never arrived on the topic")


@dataclass(frozen=True)
class BrokerLatency:
    """The embedded broker alone (ms): a record batch's send -> its acknowledgement, and a
    record's send -> its arrival at the measuring consumer."""

    ack_p50: float
    ack_p99: float
    arrival_p50: float
    arrival_p99: float
    arrival_worst: float


async def broker_latency(settings: Settings, bootstrap: str, root: Path) -> BrokerLatency:
    """The latency phase's Kafka traffic without the database or the relay: the baseline
    the relay's figures compare with, measured on the same broker in the same run.

    A producer sends what the relay sends at LATENCY_RATE: per writer commit, one record
    batch per partition, one batch in flight per partition, for as long as the latency
    phase; the same measuring consumer records arrivals.
    """
    topic = await _declare_topic(settings, f"{settings.kafka_events_topic}-broker-alone")
    arrivals_path = root / f"{topic}-arrivals.txt"
    measuring_consumer = MeasuringConsumer()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    sent: dict[str, float] = {}
    acks: list[float] = []
    per_batch = max(1, LATENCY_EVENTS_PER_TX // PARTITIONS)
    interval = LATENCY_EVENTS_PER_TX / LATENCY_RATE
    value = _padding().encode()
    try:
        await measuring_consumer.start(bootstrap, topic, arrivals_path)
        measure_from = time.time() + LATENCY_WARMUP_S
        until = time.perf_counter() + LATENCY_WARMUP_S + LATENCY_SECONDS
        in_flight: dict[int, asyncio.Future[Any]] = {}

        async def acked(future: asyncio.Future[Any], started: float) -> None:
            await future
            if started >= measure_from:
                acks.append((time.time() - started) * 1000)

        next_at = time.perf_counter()
        tasks = []
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            for partition in range(PARTITIONS):
                previous = in_flight.get(partition)
                if previous is not None:
                    await previous
                batch = producer.create_batch()
                started = time.time()
                for _ in range(per_batch):
                    event_id = str(uuid.uuid4())
                    sent[event_id] = started
                    batch.append(
                        key=event_id.encode(),
                        value=value,
                        timestamp=None,
                        headers=[("event-id", event_id.encode())],
                    )
                batch.close()
                future = await producer.send_batch(batch, topic, partition=partition)
                in_flight[partition] = future
                tasks.append(asyncio.create_task(acked(future, started)))
            next_at += interval
        await asyncio.gather(*tasks)
        arrived = await wait_arrived(arrivals_path, sent)
    finally:
        measuring_consumer.stop()
        await producer.stop()
    arrival = [(arrived[i][0] - t) * 1000 for i, t in sent.items() if t >= measure_from]
    return BrokerLatency(
        ack_p50=percentile(acks, 50),
        ack_p99=percentile(acks, 99),
        arrival_p50=percentile(arrival, 50),
        arrival_p99=percentile(arrival, 99),
        arrival_worst=max(arrival),
    )


async def latency_in_workers(count: int, database_url: str, bootstrap: str, root: Path) -> Latency:
    """Commit-to-topic latency at LATENCY_RATE events/s from ``count`` worker processes.

    Writers (this process) insert with store_events, LATENCY_WRITERS of them,
    LATENCY_EVENTS_PER_TX events per transaction (20: smaller transactions cost the
    writers more CPU per event, which the 2-CPU machine under test would feel),
    on a fixed schedule; each event's data carries its write time ``t``, and the
    wall-clock moments just before its COMMIT and when the COMMIT returned are kept. A
    consumer process records when each record arrives; latency = arrival - COMMIT returned
    (what the relay can do something about: a row is invisible to it until its commit is
    flushed), and also from just before COMMIT, which adds the database's own commit time.
    """
    suffix = f"lat{count}-{secrets.token_hex(3)}"
    settings = bench_settings(database_url, bootstrap, suffix)
    target = OutboxTarget(settings.kafka_events_topic, PARTITIONS)
    engine = create_engine(settings)
    committing: dict[str, float] = {}  # event id -> just before its COMMIT
    committed: dict[str, float] = {}  # event id -> its COMMIT returned
    commit_ms: list[float] = []
    arrivals_path = root / f"{suffix}-arrivals.txt"
    measuring_consumer = MeasuringConsumer()
    with running_workers(count, database_url, bootstrap, suffix, root) as workers:
        await wait_assigned(workers)
        pad = _padding()
        per_writer = LATENCY_RATE / LATENCY_WRITERS
        events_per_tx = LATENCY_EVENTS_PER_TX
        interval = events_per_tx / per_writer

        async def writer(index: int, until: float) -> None:
            next_at = time.perf_counter() + index * interval / LATENCY_WRITERS
            n = 0
            while next_at < until:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                events = []
                for _ in range(events_per_tx):
                    event = _event(index * 10_000_000 + n, pad, t=time.time())
                    n += 1
                    events.append(event)
                async with AsyncSession(engine) as session, session.begin():
                    await store_events(session, events, target)
                    before_commit = time.time()
                after_commit = time.time()
                if before_commit >= measure_from:
                    commit_ms.append((after_commit - before_commit) * 1000)
                for event in events:
                    committing[str(event.id)] = before_commit
                    committed[str(event.id)] = after_commit
                next_at += interval

        try:
            await measuring_consumer.start(bootstrap, target.topic, arrivals_path)
            async with engine.connect() as warm:
                await warm.execute(text("SELECT 1"))
            until = time.perf_counter() + LATENCY_WARMUP_S + LATENCY_SECONDS
            measure_from = time.time() + LATENCY_WARMUP_S

            async def delay_at_measure_start() -> dict[float, float]:
                await asyncio.sleep(LATENCY_WARMUP_S)
                return await asyncio.to_thread(relay_delay_buckets, workers)

            with profiled(workers, f"latency-{count}"):
                cpu = CpuSplit().start()
                delay_before = asyncio.create_task(delay_at_measure_start())
                await asyncio.gather(*(writer(i, until) for i in range(LATENCY_WRITERS)))
                cpu.stop()
            arrived = await wait_arrived(arrivals_path, committing)
            acked = _window(await delay_before, relay_delay_buckets(workers))
        finally:
            measuring_consumer.stop()
            await engine.dispose()
    measured = [i for i, t in committing.items() if t >= measure_from]
    total = [(arrived[i][0] - committed[i]) * 1000 for i in measured]
    pickup = [(arrived[i][1] - committed[i]) * 1000 for i in measured]
    with_commit = [(arrived[i][0] - committing[i]) * 1000 for i in measured]
    return Latency(
        p50=percentile(total, 50),
        p99=percentile(total, 99),
        worst=max(total),
        count=len(total),
        pickup_p50=percentile(pickup, 50),
        pickup_p99=percentile(pickup, 99),
        acked_p50=histogram_quantile(acked, 50) * 1000,
        acked_p99=histogram_quantile(acked, 99) * 1000,
        acked_batches=int(acked[-1][1]) if acked else 0,
        commit_p99=percentile(commit_ms, 99),
        commit_worst=max(commit_ms),
        with_commit_p99=percentile(with_commit, 99),
        late_pickups=_late_pickups(committed, arrived, measured),
        cpu=cpu,
    )


def _starved_writers(lat: Latency) -> str:
    """A warning for the table when the writers saw their COMMIT return only after the
    relay had sent the rows: then they were short of CPU, and every figure measured from
    COMMIT returned is too low."""
    if lat.pickup_p50 >= 0:
        return ""
    return (
        " (negative: the writers, short of CPU, saw COMMIT return after the relay had sent"
        " the rows; figures from COMMIT returned are too low, the p99 from before COMMIT"
        " bounds them)"
    )


def _read_arrivals(path: Path) -> dict[str, Arrival]:
    """event id -> its first arrival."""
    arrived: dict[str, Arrival] = {}
    if not path.exists():
        return arrived
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] not in arrived:
            arrived[parts[0]] = (float(parts[1]), float(parts[2]), int(parts[3]))
    return arrived


def _late_pickups(
    committed: dict[str, float], arrived: dict[str, Arrival], ids: Sequence[str]
) -> str:
    """Where the events the relay picked up over LATE_PICKUP_MS after their commit were:
    one partition points at its owner, all of them at the database, the machine or the
    broker; a short span at one stall, a long one at many."""
    late = [
        (committed[i], arrived[i][2])
        for i in ids
        if (arrived[i][1] - committed[i]) * 1000 > LATE_PICKUP_MS
    ]
    if not late:
        return f"no pickup over {LATE_PICKUP_MS} ms"
    commit_times = [t for t, _partition in late]
    partitions = ",".join(str(p) for p in sorted({p for _t, p in late}))
    return (
        f"{len(late)} pickups over {LATE_PICKUP_MS} ms, partitions {partitions}, "
        f"committed within {max(commit_times) - min(commit_times):.1f} s"
    )


# --- the run ---------------------------------------------------------------------------


async def run(root: Path) -> list[Measurement]:
    results: list[Measurement] = []
    with (
        EmbeddedBroker(log_path=root / "tansu.log") as broker,
        fresh_database(admin_url(), "holdwall_bench") as database_url,
    ):
        suffix = secrets.token_hex(3)
        settings = bench_settings(database_url, broker.bootstrap, suffix)
        batch_size = settings.outbox_batch_size
        engine = create_engine(settings)
        try:
            await init_schema(engine)
            async with engine.begin() as connection:  # the relay's partition lock rows
                await store.ensure_relay_locks(connection, PARTITIONS)
            target = OutboxTarget(settings.kafka_events_topic, PARTITIONS)
            _log(f"inserting {N_EVENTS:,} events ({N_KEYS} keys, ~{PAYLOAD_BYTES} B payloads)")
            insert_s = await insert_events(engine, target, N_EVENTS)
        finally:
            await engine.dispose()
        await save_outbox(database_url)
        results.append(
            Measurement(
                "setup",
                f"store_events, {INSERT_CHUNK:,} per transaction",
                N_EVENTS / insert_s,
                "events/s",
                note="writer side, for orientation",
            )
        )

        _log("ceiling: aiokafka create_batch/send_batch")
        kafka_rate, batches = await kafka_ceiling(settings, database_url)
        results.append(
            Measurement(
                "(a) ceiling",
                "aiokafka create_batch/send_batch, no database",
                kafka_rate,
                "msg/s",
                note=f"{N_EVENTS:,} msgs in {batches} batches, acks=all",
            )
        )

        # The ceilings and the in-process relay run REPEAT times, interleaved, each from
        # the same state (the rows as written, VACUUM, CHECKPOINT); the best run counts
        # (the machine is shared, and a slow run says more about the neighbours than about
        # the code).
        serial: list[tuple[float, CpuSplit]] = []
        parallel: list[tuple[float, CpuSplit]] = []
        in_process: list[tuple[float, CpuSplit]] = []
        for attempt in range(1, REPEAT + 1):
            _log(f"ceiling: PostgreSQL claim-and-mark ({attempt}/{REPEAT})")
            await restore_outbox(database_url)
            serial.append(await claim_ceiling(database_url, batch_size, concurrent=False))
            await restore_outbox(database_url)
            parallel.append(await claim_ceiling(database_url, batch_size, concurrent=True))
            _log(f"relay in-process ({attempt}/{REPEAT})")
            in_process.append(await relay_in_process(settings, database_url))

        claim_serial, serial_cpu = max(serial, key=lambda run: run[0])
        results.append(
            Measurement(
                "(a) ceiling",
                "PostgreSQL claim-and-mark, 1 connection, partitions in turn",
                claim_serial,
                "rows/s",
                note=f"batches of {batch_size:,}, no Kafka; {_spread(serial)}; "
                f"CPU cores: {serial_cpu.describe()}",
            )
        )
        claim_parallel, parallel_cpu = max(parallel, key=lambda run: run[0])
        results.append(
            Measurement(
                "(a) ceiling",
                f"PostgreSQL claim-and-mark, {PARTITIONS} connections at once",
                claim_parallel,
                "rows/s",
                note=f"one per partition, as the relay drains; {_spread(parallel)}; "
                f"CPU cores: {parallel_cpu.describe()}; "
                f"CPU per row: {parallel_cpu.describe_per_item(claim_parallel)}",
            )
        )
        claim_best, claim_cpu = max(
            (claim_serial, serial_cpu), (claim_parallel, parallel_cpu), key=lambda run: run[0]
        )

        def ratios(rate: float) -> str:
            return f"{rate / claim_best:.2f} of DB, {rate / kafka_rate:.2f} of Kafka"

        rate, cpu = max(in_process, key=lambda run: run[0])
        results.append(
            Measurement(
                "(b) sustained",
                "relay in-process (OutboxRelay.drain loop)",
                rate,
                "events/s",
                ratios(rate),
                note=f"{N_EVENTS:,} pre-inserted events; {_spread(in_process)}; "
                f"CPU cores: {cpu.describe()}; CPU per event: {cpu.describe_per_item(rate)}",
            )
        )
        results.append(cpu_against_ceiling(rate, cpu, claim_best, claim_cpu))

        for count in WORKER_COUNTS:
            _log(f"relay in {count} worker process(es)")
            rate, cpu = await relay_in_workers(count, database_url, broker.bootstrap, root)
            section = "(b) sustained" if count == 1 else "(d) scale-out"
            results.append(
                Measurement(
                    section,
                    f"relay in {count} worker process{'es' if count > 1 else ''}",
                    rate,
                    "events/s",
                    ratios(rate),
                    note=f"pipeline consuming alongside; CPU cores: {cpu.describe()}",
                )
            )

        _log(f"baseline: the broker alone at {LATENCY_RATE:,} events/s")
        alone = await broker_latency(settings, broker.bootstrap, root)
        results.append(
            Measurement(
                "(c) baseline",
                f"broker alone, send to ack p50 / p99, {LATENCY_RATE:,} events/s",
                alone.ack_p99,
                "ms",
                note=(
                    f"p50 {alone.ack_p50:.1f} ms; send to consumer p50 {alone.arrival_p50:.1f}"
                    f" ms, p99 {alone.arrival_p99:.1f} ms, max {alone.arrival_worst:.1f} ms:"
                    " the relay's traffic without database or relay"
                ),
            )
        )
        for count in sorted({1, max(WORKER_COUNTS)}):
            _log(f"latency at {LATENCY_RATE:,} events/s, {count} worker(s)")
            # The drains left ~N dead index entries in front of the new rows; autovacuum
            # would remove them in a real deployment (it is off on some test machines).
            await vacuum(database_url)
            lat = await latency_in_workers(count, database_url, broker.bootstrap, root)
            label = f"{count} worker{'s' if count > 1 else ''}"
            rate_label = f"{LATENCY_RATE:,} events/s"
            results.append(
                Measurement(
                    "(c) latency",
                    f"commit-to-topic p50, {rate_label}, {label}",
                    lat.p50,
                    "ms",
                    note=(
                        f"COMMIT returned to a consumer's fetch; to the relay's batch "
                        f"(CreateTime) p50 {lat.pickup_p50:.1f} ms{_starved_writers(lat)}"
                    ),
                )
            )
            results.append(
                Measurement(
                    "(c) latency",
                    f"commit-to-topic p99, {rate_label}, {label}",
                    lat.p99,
                    "ms",
                    note=(
                        f"commit to relay batch p99 {lat.pickup_p99:.1f} ms; max {lat.worst:.1f}"
                        f" ms over {lat.count:,} events; from before COMMIT p99"
                        f" {lat.with_commit_p99:.1f} ms (writers' COMMIT p99 {lat.commit_p99:.1f},"
                        f" max {lat.commit_worst:.1f} ms); {lat.late_pickups};"
                        f" CPU cores: {lat.cpu.describe()}"
                    ),
                )
            )
            results.append(
                Measurement(
                    "(c) latency",
                    f"relay delay histogram p50 / p99, {rate_label}, {label}",
                    lat.acked_p99,
                    "ms",
                    note=(
                        f"p50 {lat.acked_p50:.1f} ms; {lat.acked_batches:,} batches, each its "
                        "oldest row's write (transaction start) to broker ack; bucket-"
                        "interpolated, an upper bound"
                    ),
                )
            )
    return results


def cpu_against_ceiling(
    rate: float, cpu: CpuSplit, ceiling: float, ceiling_cpu: CpuSplit
) -> Measurement:
    """Splits the relay's ratio to the ceiling into CPU per event and CPU used.

    Both saturate the same 2 CPUs, so relay / ceiling = (the ceiling's CPU per row over the
    relay's CPU per event) x (the relay's cores over the ceiling's): the first factor is
    what the Kafka side (aiokafka, the broker) adds per event, the second what the relay
    leaves idle while it waits for acknowledgements.
    """
    ceiling_us, relay_us = ceiling_cpu.us_per_item(ceiling), cpu.us_per_item(rate)
    per_event = ceiling_us / relay_us
    relay_cores, ceiling_cores = cpu.cores_used(), ceiling_cpu.cores_used()
    return Measurement(
        "(b) sustained",
        "relay / ceiling, CPU per event alone",
        per_event,
        "",
        note=f"ceiling {ceiling_us:.1f} us per row at {ceiling_cores:.2f}"
        f" cores, relay {relay_us:.1f} us per event at {relay_cores:.2f} cores:"
        f" relay / ceiling = {per_event:.2f} x {relay_cores / ceiling_cores:.2f} (cores used)"
        f" = {rate / ceiling:.2f}",
    )


def _spread(runs: Sequence[tuple[float, CpuSplit]]) -> str:
    rates = sorted(rate for rate, _cpu in runs)
    if len(rates) == 1:
        return "1 run"
    return f"best of {len(rates)} ({rates[0]:,.0f}-{rates[-1]:,.0f})"


def check_floors(results: Sequence[Measurement]) -> list[str]:
    """The relay's floors: >= 25,000 events/s, >= 0.8 of the DB ceiling, p99 <= 50 ms."""
    by_name = {r.name: r for r in results}
    claim = max(r.value for r in results if r.name.startswith("PostgreSQL claim-and-mark"))
    relay = by_name["relay in-process (OutboxRelay.drain loop)"].value
    problems = []
    if relay < 25_000:
        problems.append(f"relay {relay:,.0f} events/s < 25,000")
    if relay < 0.8 * claim:
        problems.append(f"relay {relay / claim:.2f} of the claim-and-mark ceiling < 0.8")
    for r in results:
        if r.name.startswith("commit-to-topic p99") and r.value > 50:
            problems.append(f"{r.name}: {r.value:.1f} ms > 50 ms")
    return problems


def main() -> int:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="holdwall-bench-relay-") as tmp:
        started = time.perf_counter()
        results = asyncio.run(run(Path(tmp)))
        elapsed = time.perf_counter() - started
    batch_size = load_settings().outbox_batch_size
    print(
        render_table(
            f"Relay ({N_EVENTS:,} events, {N_KEYS:,} keys, {PARTITIONS} partitions, "
            f"OUTBOX_BATCH_SIZE={batch_size:,}, {os.cpu_count()} CPUs, "
            f"{implementation_name(asyncio.get_event_loop_policy())} event loop)",
            results,
        )
    )
    problems = check_floors(results)
    print()
    print(f"floors: {'all met' if not problems else '; '.join(problems)}")
    print(
        f"run: python -m benchmarks relay, {elapsed:.0f} s; load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (other processes share the CPUs)"
    )
    print(json.dumps({"relay": [r.__dict__ for r in results]}), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--consume"]:
        _consume_arrivals(*sys.argv[2:5])
        raise SystemExit(0)
    raise SystemExit(main())
