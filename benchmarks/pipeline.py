"""Pipeline benchmark: events topic -> pipeline -> processed_events. `make bench`.

One run, one table, all figures measured on the same machine in the same run:

(1) ceiling: a plain aiokafka consumer's ``getmany`` over the same pre-produced topic
    (no parsing, no database);
(2) the pipeline with the default handler (its effect is the processed_events row):
    (a) in-process, PipelineConsumer + EventProcessor as the worker wires them, from
        start (group join included) and from the first processed row until
        processed_events holds N rows;
    (b) real worker processes (`faust -A holdwall_stream worker`, one at a time, each in a
        group of its own), from process start and from the first processed row until
        processed_events holds N rows; the best of BENCH_PIPELINE_WORKER_RUNS is reported
        (the machine is shared: the other runs are listed next to it).
The ratio pipeline/ceiling is printed for each. Floor: >= 20,000 events/s per worker,
effects included (one worker, from its first processed row).

PostgreSQL: a fresh database it creates and drops (TEST_DATABASE_URL or PG*). Kafka: an
EmbeddedBroker (Tansu) it starts. Knobs (environment): BENCH_PIPELINE_EVENTS (200000),
BENCH_PIPELINE_WORKER_RUNS (2), BENCH_PROFILE (0; 1 adds an in-process run and a worker
run under `py-spy record`, not counted in the table, with flame graphs in
BENCH_PROFILE_DIR, default ./profiles; BENCH_PROFILE_FORMAT=txt writes py-spy's raw
collapsed stacks instead of SVG).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from benchmarks.common import (
    PARTITIONS,
    Measurement,
    bench_settings,
    render_table,
    worker_environment,
)
from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.embedded import EmbeddedBroker, stop_process_group, worker_command
from holdwall_stream.event_loop import implementation_name
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.messaging.topics import ensure_topics
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.pipeline.consumer import PipelineConsumer
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER, EventEnvelope, encode_envelope
from holdwall_stream.pipeline.handlers import HandlerRegistry
from holdwall_stream.pipeline.processor import EventProcessor
from holdwall_stream.settings import Settings
from tests.support.pg import admin_url, fresh_database

N_EVENTS = int(os.environ.get("BENCH_PIPELINE_EVENTS", "200000"))
N_KEYS = 1000
PAYLOAD_BYTES = 300
FLOOR_EVENTS_PER_S = 20_000
DRAIN_TIMEOUT_S = 300.0
POLL_S = 0.05
WORKER_RUNS = int(os.environ.get("BENCH_PIPELINE_WORKER_RUNS", "2"))
PROFILE = os.environ.get("BENCH_PROFILE", "0") not in ("", "0", "false")
PROFILE_DIR = Path(os.environ.get("BENCH_PROFILE_DIR", "profiles"))
# svg: flame graphs; txt: py-spy's raw collapsed stacks (for grep and scripts)
PROFILE_FORMAT = os.environ.get("BENCH_PROFILE_FORMAT", "svg")
_BATCH_OVERHEAD = 64 * 1024


def _log(message: str) -> None:
    print(f"[pipeline bench] {message}", file=sys.stderr, flush=True)


def _envelopes(count: int) -> list[tuple[bytes, bytes, bytes]]:
    """(key, value, event id) of ``count`` valid envelopes of about PAYLOAD_BYTES."""
    now = datetime.now(UTC)

    def envelope(index: int, pad: str) -> EventEnvelope:
        return EventEnvelope(
            id=uuid.uuid4(),
            type="bench.event",
            aggregate_id=f"key-{index % N_KEYS:04d}",
            occurred_at=now,
            data={"n": index, "pad": pad},
        )

    pad = "x" * max(0, PAYLOAD_BYTES - len(encode_envelope(envelope(count, ""))))
    out = []
    for index in range(count):
        env = envelope(index, pad)
        out.append((env.aggregate_id.encode(), encode_envelope(env), str(env.id).encode()))
    return out


async def produce(settings: Settings, messages: list[tuple[bytes, bytes, bytes]]) -> float:
    """Batch-produces the messages to the events topic, partitioned by key; returns s."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=0,
        max_batch_size=1024 * 1024,
        max_request_size=1024 * 1024 + _BATCH_OVERHEAD,
    )
    await producer.start()
    topic = settings.kafka_events_topic
    partitioner = DefaultPartitioner()
    partitions = list(range(settings.kafka_partitions))
    by_partition: dict[int, list[tuple[bytes, bytes, bytes]]] = defaultdict(list)
    for message in messages:
        by_partition[partitioner(message[0], partitions, partitions)].append(message)
    started = time.perf_counter()
    try:
        pending = []
        for partition, items in by_partition.items():
            batch = producer.create_batch()
            for key, value, event_id in items:
                headers = [(EVENT_ID_HEADER, event_id)]
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def consumer_ceiling(settings: Settings, expected: int) -> float:
    """A plain aiokafka consumer reading the whole topic with getmany; returns msg/s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        topic = settings.kafka_events_topic
        consumer.assign([TopicPartition(topic, p) for p in range(settings.kafka_partitions)])
        await consumer.seek_to_beginning()
        count = 0
        started = time.perf_counter()
        while count < expected:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            count += sum(len(records) for records in batches.values())
            if time.perf_counter() - started > DRAIN_TIMEOUT_S:
                raise TimeoutError(f"ceiling consumer read {count}/{expected}")
        return count / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def processed_count(conn: psycopg.AsyncConnection) -> int:  # type: ignore[type-arg]
    cursor = await conn.execute("SELECT count(*) FROM processed_events")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def truncate_processed(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("TRUNCATE processed_events")
        await conn.execute("VACUUM ANALYZE processed_events")


async def wait_processed(
    database_url: str, expected: int, *, on_first: list[float] | None = None
) -> float:
    """Polls until processed_events holds ``expected`` rows; returns that moment."""
    deadline = time.perf_counter() + DRAIN_TIMEOUT_S
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            count = await processed_count(conn)
            now = time.perf_counter()
            if on_first is not None and count and not on_first:
                on_first.append(now)
            if count >= expected:
                if count != expected:
                    raise AssertionError(
                        f"processed_events holds {count} rows, expected {expected}"
                    )
                return now
            if now > deadline:
                raise TimeoutError(f"only {count}/{expected} events processed")
            await asyncio.sleep(POLL_S)


async def in_process(
    settings: Settings, database_url: str, profile_to: Path | None
) -> tuple[float, float]:
    """PipelineConsumer + EventProcessor in this process, wired as the worker wires them;
    returns (events/s from start, events/s from the first processed row)."""
    metrics = Metrics()
    engine = create_engine(settings)
    producer = KafkaProducer(settings, metrics)
    processor = EventProcessor(settings, engine, HandlerRegistry(), producer, metrics)
    consumer = PipelineConsumer(settings, processor, metrics)
    spy = _py_spy(os.getpid(), profile_to) if profile_to else None
    first: list[float] = []
    started = time.perf_counter()
    try:
        await consumer.start()
        finished = await wait_processed(database_url, N_EVENTS, on_first=first)
    finally:
        if spy is not None:
            _stop_py_spy(spy)
        await consumer.stop()
        await producer.stop()
        await engine.dispose()
    return N_EVENTS / (finished - started), N_EVENTS / (finished - first[0])


async def worker_process(
    settings: Settings, database_url: str, workdir: Path, profile_to: Path | None
) -> tuple[float, float, float]:
    """One `faust -A holdwall_stream worker`; returns (events/s from start, events/s from
    the first processed row, seconds to the first processed row)."""
    env = {
        **os.environ,
        **worker_environment(settings),
        "KAFKA_GROUP_ID": f"{settings.kafka_group_id}-{workdir.name}",  # a group per run
        "WEB_PORT": str(_free_port()),
        "FAUST_DATA_DIR": str(workdir / "data"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p
        ),
    }
    env.pop("PIPELINE_HANDLERS", None)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "worker.log"
    first: list[float] = []
    with log_path.open("ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            worker_command(["-l", "warn"]),
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    spy = None
    try:
        waiter = asyncio.ensure_future(wait_processed(database_url, N_EVENTS, on_first=first))
        while not waiter.done():
            if spy is None and profile_to is not None and first:
                spy = _py_spy(process.pid, profile_to)
            if process.poll() is not None:
                waiter.cancel()
                tail = log_path.read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"worker exited {process.returncode}:\n" + "\n".join(tail))
            await asyncio.sleep(0.05)
        finished = waiter.result()
    finally:
        if spy is not None:
            _stop_py_spy(spy)
        stop_process_group(process, 30.0)
    return (
        N_EVENTS / (finished - started),
        N_EVENTS / (finished - first[0]),
        first[0] - started,
    )


def _free_port() -> int:
    from holdwall_stream.embedded import free_port

    return free_port()


def _py_spy(pid: int, output: Path) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(binary).exists():
        _log("py-spy not installed (pip install py-spy); not profiling")
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    _log(f"py-spy recording pid {pid} into {output}")
    return subprocess.Popen(
        [binary, "record", "--nonblocking", "-r", "200", "-o", str(output), "--pid", str(pid)]
        + (["--format", "raw"] if output.suffix == ".txt" else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    spy.send_signal(2)  # SIGINT: py-spy writes the flame graph and exits
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


async def run(tmp: Path) -> list[Measurement]:
    results: list[Measurement] = []
    with (
        EmbeddedBroker(log_path=tmp / "tansu.log") as broker,
        fresh_database(admin_url(), "holdwall_bench_pipeline") as database_url,
    ):
        suffix = uuid.uuid4().hex[:8]
        settings = bench_settings(database_url, broker.bootstrap, suffix)
        await ensure_topics(settings)
        engine = create_engine(settings)
        await init_schema(engine)
        await engine.dispose()

        _log(f"building {N_EVENTS:,} envelopes")
        messages = _envelopes(N_EVENTS)
        seconds = await produce(settings, messages)
        del messages
        _log(f"produced {N_EVENTS:,} in {seconds:.1f} s")

        ceiling = await consumer_ceiling(settings, N_EVENTS)
        _log(f"ceiling {ceiling:,.0f} msg/s")
        results.append(
            Measurement("ceiling", "aiokafka consumer getmany, no processing", ceiling, "msg/s")
        )

        def ratio(rate: float) -> str:
            return f"{rate / ceiling:.0%}"

        profile_dir = PROFILE_DIR.resolve() if PROFILE else None
        rate, steady = await in_process(
            bench_settings(
                database_url, broker.bootstrap, suffix, kafka_group_id=f"bench-{suffix}-a"
            ),
            database_url,
            None,
        )
        _log(f"in-process {rate:,.0f} events/s from start, {steady:,.0f} from first row")
        results.append(
            Measurement(
                "pipeline",
                "in-process PipelineConsumer + EventProcessor, from start",
                rate,
                "events/s",
                ratio(rate),
                "includes the group join",
            )
        )
        results.append(
            Measurement(
                "pipeline",
                "in-process PipelineConsumer + EventProcessor, from first row",
                steady,
                "events/s",
                ratio(steady),
            )
        )
        if profile_dir is not None:
            await truncate_processed(database_url)
            await in_process(
                bench_settings(
                    database_url, broker.bootstrap, suffix, kafka_group_id=f"bench-{suffix}-p"
                ),
                database_url,
                profile_dir / f"pipeline-in-process.{PROFILE_FORMAT}",
            )

        runs = []
        for run_index in range(WORKER_RUNS):
            await truncate_processed(database_url)
            runs.append(
                await worker_process(settings, database_url, tmp / f"worker-{run_index}", None)
            )
            _log(
                f"worker run {run_index + 1}/{WORKER_RUNS}: {runs[-1][0]:,.0f} events/s from "
                f"start, {runs[-1][1]:,.0f} from first row"
            )
        if profile_dir is not None:
            await truncate_processed(database_url)
            profiled = await worker_process(
                settings,
                database_url,
                tmp / "worker-profiled",
                profile_dir / f"pipeline-worker.{PROFILE_FORMAT}",
            )
            _log(f"profiled worker (py-spy attached): {profiled[1]:,.0f} events/s from first row")
        from_start, steady, startup = max(runs, key=lambda run: run[1])
        all_runs = ", ".join(f"{run[1]:,.0f}" for run in runs)
        results.append(
            Measurement(
                "pipeline",
                "1 worker process, default handler, from process start",
                from_start,
                "events/s",
                ratio(from_start),
                f"includes {startup:.1f} s start-up and two group joins",
            )
        )
        results.append(
            Measurement(
                "pipeline",
                "1 worker process, default handler, from first processed row",
                steady,
                "events/s",
                ratio(steady),
                f"best of {len(runs)} runs ({all_runs}); floor >= {FLOOR_EVENTS_PER_S:,}",
            )
        )
    return results


def check_floors(results: list[Measurement]) -> list[str]:
    problems = []
    for result in results:
        steady = result.section == "pipeline" and "first processed row" in result.name
        if steady and result.value < FLOOR_EVENTS_PER_S:
            problems.append(f"{result.name}: {result.value:,.0f} < {FLOOR_EVENTS_PER_S:,} events/s")
    return problems


def main() -> int:
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="holdwall-bench-pipeline-") as tmp:
        started = time.perf_counter()
        results = asyncio.run(run(Path(tmp)))
        elapsed = time.perf_counter() - started
    print(
        render_table(
            f"Pipeline ({N_EVENTS:,} events of ~{PAYLOAD_BYTES} bytes, {N_KEYS:,} keys, "
            f"{PARTITIONS} partitions, PostgreSQL, {os.cpu_count()} CPUs, "
            f"{implementation_name(asyncio.get_event_loop_policy())} event loop, "
            f"load average {load_at_start:.1f} at start)",
            results,
        )
    )
    problems = check_floors(results)
    print()
    print(f"floors: {'all met' if not problems else '; '.join(problems)}")
    print(f"command: python -m benchmarks pipeline ({elapsed:.0f} s)")
    print(json.dumps({"pipeline": [r.__dict__ for r in results]}), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
