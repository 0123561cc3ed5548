"""Helpers for the relay guarantee tests: keyed writers, a topic reader, order checks.

Writers give every event a per-key sequence number in ``data.seq``. Writes of one key are
serialised (an asyncio lock per key, held until the commit returned), so per key the
sequence number is the commit order; transactions that touch several keys take the locks
in sorted order. Readers consume the topic for real (never end offsets, Tansu's can lag)
and return the records in partition/offset order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from holdwall_stream.db.engine import create_engine
from holdwall_stream.db.schema import init_schema
from holdwall_stream.messaging.topics import ensure_topics
from holdwall_stream.outbox.writer import NewEvent, OutboxTarget, partition_for_key, store_events
from holdwall_stream.settings import Settings, load_settings
from tests.support.processes import WorkerProcess
from tests.support.worker_env import get_json, post_json

EVENT_TYPE = "relay.guarantee"


# --- databases, settings, engines ------------------------------------------------------


def settings_from_env(env: dict[str, str]) -> Settings:
    """The Settings a worker started with ``env`` reads (field names are the lower case)."""
    return load_settings(**{name.lower(): value for name, value in env.items()})


@contextlib.asynccontextmanager
async def engine_for(env: dict[str, str]) -> AsyncIterator[AsyncEngine]:
    """An async engine on the workers' database, with the schema created."""
    engine = create_engine(settings_from_env(env))
    try:
        await init_schema(engine)
        yield engine
    finally:
        await engine.dispose()


async def declare_topics(env: dict[str, str]) -> None:
    """Creates the events and DLQ topics with KAFKA_PARTITIONS, before anything reads them
    (the broker would otherwise auto-create them with its own partition count)."""
    await ensure_topics(settings_from_env({**env, "KAFKA_ENABLED": "true"}))


# --- writers ---------------------------------------------------------------------------


@dataclass
class KeyedWriter:
    """Writes events carrying ``data = {"key": key, "seq": n}``, n = 1, 2, ... per key."""

    target: OutboxTarget
    written: dict[str, tuple[str, int]] = field(default_factory=dict)  # event id -> key, seq
    _next_seq: dict[str, int] = field(default_factory=lambda: defaultdict(lambda: 1))
    _locks: dict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    def _events(self, plan: Sequence[tuple[str, int]], pad: int = 0) -> list[NewEvent]:
        events = []
        for key, count in plan:
            for _ in range(count):
                seq = self._next_seq[key]
                self._next_seq[key] = seq + 1
                data: dict[str, Any] = {"key": key, "seq": seq}
                if pad:
                    data["pad"] = "x" * pad
                events.append(
                    NewEvent(type=EVENT_TYPE, aggregate_id=key, data=data, id=uuid.uuid4())
                )
        return events

    @contextlib.asynccontextmanager
    async def _holding(self, keys: Iterable[str]) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(keys)):
                await stack.enter_async_context(self._locks[key])
            yield

    def _record(self, events: Sequence[NewEvent]) -> None:
        for event in events:
            self.written[str(event.id)] = (event.aggregate_id, int(event.data["seq"]))

    async def write_db(
        self, engine: AsyncEngine, plan: Sequence[tuple[str, int]], pad: int = 0
    ) -> list[str]:
        """One transaction with ``count`` events for each ``(key, count)`` in ``plan``."""
        async with self._holding(key for key, _ in plan):
            events = self._events(plan, pad)
            async with AsyncSession(engine) as session, session.begin():
                await store_events(session, events, self.target)
            self._record(events)
        return [str(e.id) for e in events]

    async def write_http(
        self, base_url: str, plan: Sequence[tuple[str, int]], pad: int = 0
    ) -> list[str]:
        """The same over POST /api/events (one request, one transaction)."""
        async with self._holding(key for key, _ in plan):
            events = self._events(plan, pad)
            body = [
                {"id": str(e.id), "type": e.type, "aggregate_id": e.aggregate_id, "data": e.data}
                for e in events
            ]
            status, answer = await asyncio.to_thread(post_json, f"{base_url}/api/events", body)
            assert status == 201, (status, answer)
            self._record(events)
        return [str(e.id) for e in events]

    def random_plan(self, rng: random.Random, keys: Sequence[str]) -> list[tuple[str, int]]:
        """1-3 keys, 1-3 events each: transactions that interleave keys and ids."""
        return [(key, rng.randint(1, 3)) for key in rng.sample(list(keys), rng.randint(1, 3))]


async def keep_writing(
    stop: asyncio.Event,
    writer: KeyedWriter,
    keys: Sequence[str],
    *,
    engine: AsyncEngine | None = None,
    base_urls: Sequence[str] | None = None,
    interval_s: float = 0.01,
    seed: int = 0,
) -> int:
    """Writes random plans until ``stop`` is set (to the database, or over HTTP to one of
    ``base_urls`` in turn); returns how many transactions it committed."""
    rng = random.Random(seed)
    done = 0
    while not stop.is_set():
        plan = writer.random_plan(rng, keys)
        if engine is not None:
            await writer.write_db(engine, plan)
        else:
            assert base_urls
            await writer.write_http(base_urls[done % len(base_urls)], plan)
        done += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
    return done


# --- reading the topic -----------------------------------------------------------------


def event_id_of(record: ConsumerRecord) -> str:
    return dict(record.headers)["event-id"].decode()


async def consume_ids(
    bootstrap: str,
    topic: str,
    want: Collection[str],
    timeout: float = 60.0,
    settle_s: float = 0.0,
) -> list[ConsumerRecord]:
    """Reads ``topic`` from the start until every id in ``want`` arrived, then ``settle_s``
    longer (so late duplicates show up); records in (partition, offset) order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        request_timeout_ms=10_000,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    missing = set(want)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions and loop.time() < deadline:
            await asyncio.sleep(0.1)
            await consumer.topics()  # refreshes the cluster metadata (never creates topics)
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        settle_until: float | None = None
        while loop.time() < deadline:
            if not missing:
                settle_until = settle_until or loop.time() + settle_s
                if loop.time() >= settle_until:
                    break
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for batch in batches.values():
                for record in batch:
                    records.append(record)
                    missing.discard(event_id_of(record))
    finally:
        await consumer.stop()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


async def topic_is_empty(bootstrap: str, topic: str, wait_s: float = 1.5) -> bool:
    """True if nothing arrives from ``topic`` (read from the start) within ``wait_s``."""
    records = await consume_ids(bootstrap, topic, want={"never"}, timeout=wait_s)
    return not records


# --- checks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicReport:
    total: int
    distinct: int
    duplicates: int  # records beyond the first of their event id
    missing: list[str]
    unknown: list[str]  # ids on the topic that the test never wrote
    order_violations: list[str]
    wrong_partition: list[str]


def analyse(
    records: Sequence[ConsumerRecord], written: dict[str, tuple[str, int]], partitions: int
) -> TopicReport:
    """Loss, duplicates, per-key order (of first occurrences) and partitioning."""
    counts = Counter(event_id_of(r) for r in records)
    seen: set[str] = set()
    last_seq: dict[str, int] = {}
    violations: list[str] = []
    wrong_partition: list[str] = []
    for record in records:
        event_id = event_id_of(record)
        if event_id in seen or event_id not in written:
            continue
        seen.add(event_id)
        key, seq = written[event_id]
        if record.key != key.encode():
            violations.append(f"{event_id}: message key {record.key!r} != {key!r}")
        expected = last_seq.get(key, 0) + 1
        if seq != expected:
            violations.append(f"key {key}: seq {seq} arrived where {expected} was due")
        last_seq[key] = max(last_seq.get(key, 0), seq)
        if record.partition != partition_for_key(key.encode(), partitions):
            wrong_partition.append(f"{key} on partition {record.partition}")
    return TopicReport(
        total=len(records),
        distinct=len(counts),
        duplicates=sum(n - 1 for n in counts.values()),
        missing=sorted(set(written) - set(counts)),
        unknown=sorted(set(counts) - set(written)),
        order_violations=violations,
        wrong_partition=wrong_partition,
    )


def envelope_data(record: ConsumerRecord) -> dict[str, Any]:
    return dict(json.loads(record.value)["data"])


# --- workers ---------------------------------------------------------------------------


async def wait_healthy(
    workers: Sequence[WorkerProcess], timeout: float = 90.0, kafka_ok: bool = True
) -> None:
    """Until every worker answers /api/health with 200 and, with ``kafka_ok``, a Kafka check
    of ``ok`` and events-topic partitions assigned to it (the relay drains the partitions
    its pipeline consumer holds); fails early with the log tail if one dies."""

    async def one(worker: WorkerProcess) -> None:
        await worker.wait_for_http_async("/api/health", timeout=timeout, status={200})
        if not kafka_ok:
            return
        deadline = time.monotonic() + timeout
        while True:
            status, body = await asyncio.to_thread(get_json, f"{worker.base_url}/api/health")
            checks = body.get("checks", {}) if isinstance(body, dict) else {}
            if (
                status == 200
                and checks.get("kafka", {}).get("status") == "ok"
                and checks.get("consumer", {}).get("assigned_partitions")
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker} never reported kafka ok: {body}")
            if not worker.is_running():
                raise RuntimeError(f"{worker} died:\n{worker.log_tail()}")
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one(w) for w in workers))


async def write_while_workers_join(
    workers: Sequence[WorkerProcess],
    writer: KeyedWriter,
    keys: Sequence[str],
    engine: AsyncEngine,
    *,
    database_writers: int,
    stop_within_s: float,
) -> int:
    """The first worker starts; ``database_writers`` writers straight into the database and
    one over HTTP to it begin; the other workers join while they write, so partitions move
    between workers mid-flow; writing stops 2 s after they are healthy. Returns how many
    transactions the writers committed."""
    workers[0].start()
    await wait_healthy(workers[:1])
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            keep_writing(stop, writer, keys, engine=engine, interval_s=0.02, seed=i)
        )
        for i in range(database_writers)
    ]
    tasks.append(
        asyncio.create_task(
            keep_writing(stop, writer, keys, base_urls=[workers[0].base_url], interval_s=0.05)
        )
    )
    await asyncio.sleep(1.0)
    for worker in workers[1:]:
        worker.start()
    await wait_healthy(workers[1:])
    await asyncio.sleep(2.0)  # writing on across the rebalance, then stop
    stop.set()
    return sum(await asyncio.wait_for(asyncio.gather(*tasks), stop_within_s))


def stop_all(workers: Sequence[WorkerProcess]) -> None:
    """SIGTERM to every worker at once, then wait for each (SIGKILL after the grace)."""
    for worker in workers:
        if worker.is_running():
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()


async def health(worker: WorkerProcess) -> tuple[int | None, dict[str, Any]]:
    """GET /api/health; (None, {}) when the worker does not answer within 5 s."""
    try:
        return await asyncio.to_thread(get_json, f"{worker.base_url}/api/health", 5.0)
    except OSError:
        return None, {}
